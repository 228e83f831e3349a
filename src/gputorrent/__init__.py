"""GPU Torrent: pool many GPU machines behind one inference endpoint."""

__version__ = "0.1.0"

from gputorrent.client import APIClient, AsyncAPIClient
from gputorrent.protocol import InferenceOptions, InferenceRequest, JobResult

__all__ = ["APIClient", "AsyncAPIClient", "InferenceOptions", "InferenceRequest", "JobResult", "__version__"]
