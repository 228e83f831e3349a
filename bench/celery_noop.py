"""The Celery side of B3 (bench/dispatch.py): one no-op task on a Redis broker and result backend.

The broker and backend URL come from `BENCH_CELERY_REDIS`; the worker is started with
`celery -A celery_noop worker` from this folder.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS = os.environ.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/1")

app = Celery("bench", broker=REDIS, backend=REDIS)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"], result_expires=3600)


@app.task(name="noop")
def noop() -> None:
    return None
