"""GPU Torrent: pool many GPU machines behind one inference endpoint."""

__version__ = "0.1.0"

from gputorrent.client import APIClient, AsyncAPIClient  # noqa: E402
from gputorrent.protocol import InferenceOptions, InferenceRequest, JobResult  # noqa: E402

__all__ = ["APIClient", "AsyncAPIClient", "InferenceOptions", "InferenceRequest", "JobResult", "__version__"]
