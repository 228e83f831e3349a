"""Logging for every process: the request id on each line, plain text or JSON, secrets masked.

The coordinator sets `request_id` when it admits a request and the worker when it starts a job,
so `grep <request id>` (or a JSON query on `request_id`) follows one request across machines.
Every line passes through `redact` last, whatever logged it, so a key or password that
reaches a message (an exception text quoting a URL, say) is masked before it is written.

>>> redact("Authorization: Bearer gt_0123456789ab_c2VjcmV0c2VjcmV0c2VjcmV0")
'Authorization: Bearer ***'
>>> redact("cannot reach redis://:hunter2@db:6379/0")
'cannot reach redis://:***@db:6379/0'
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextvars import ContextVar
from typing import Literal

LogFormat = Literal["text", "json"]
FORMAT_VARIABLE = "GPUTORRENT_LOG_FORMAT"  # the CLI's `--log-format` when the flag is not given
_HANDLER_NAME = "gputorrent"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"

request_id: ContextVar[str | None] = ContextVar("gputorrent_request_id", default=None)
"""The request the current task works on (None outside a request)."""

_SECRETS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+"), r"\1 ***"),
    (re.compile(r"\bgt_([0-9a-f]{12})_[A-Za-z0-9_-]{8,}"), r"gt_\1_***"),  # GPU Torrent keys: the id stays
    (re.compile(r"(?i)(api[_-]?key|token|secret|password)([\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]+"), r"\1\2***"),
    (re.compile(r"(://[^/\s:@]*):[^@/\s]+@"), r"\1:***@"),  # credentials in a URL
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), "hf_***"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "sk-***"),
]


def redact(text: str) -> str:
    """`text` with API keys, bearer tokens, passwords in URLs and `token=...` values masked."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (`request_id`, and ` [id]` as `request_tag`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = getattr(record, "request_id", None) or request_id.get()
        record.request_id = current
        record.request_tag = f" [{current}]" if current else ""
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time`, `level`, `logger`, `message`, `request_id` when set, `exception` when any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),  # masked before encoding, so the line stays valid JSON
        }
        if current := getattr(record, "request_id", None):
            line["request_id"] = current
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


def configure(level: str = "info", log_format: LogFormat = "text") -> None:
    """Send every logger's records to stderr, in `log_format`, with request ids and secrets masked."""
    handler = logging.StreamHandler()
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:  # ours from an earlier call only
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
