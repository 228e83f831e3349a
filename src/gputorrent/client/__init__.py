"""The Python client: `APIClient` (sync) and `AsyncAPIClient`."""

from gputorrent.client._async import AsyncAPIClient
from gputorrent.client._sync import APIClient

__all__ = ["APIClient", "AsyncAPIClient"]
