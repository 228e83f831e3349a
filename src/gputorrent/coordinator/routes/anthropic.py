"""The Anthropic-compatible Messages API: `/v1/messages`."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1", tags=["anthropic"])
