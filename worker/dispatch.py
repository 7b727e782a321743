"""A job's message in the broker: sending it (the client and the reaper) and finding it (the
reaper, to re-send a queued job whose message a Redis crash lost).

The broker is Celery's Redis transport: each queue is a Redis list (plus one list per
non-zero priority, named ``{queue}\\x06\\x16{priority}``), and a message a worker has taken but
not yet acknowledged sits in the ``unacked`` hash. Every message names its job in its
``kwargsrepr`` header.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable
from typing import Any

import redis
from celery import Celery

from worker.celery_app import QUEUES, RUN_JOB_TASK

PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)  # kombu's default steps beyond 0
UNACKED_KEY = "unacked"


def enqueue(app: Celery, job_id: str, kind: str, queue: str) -> None:
    app.send_task(RUN_JOB_TASK, kwargs={"job_id": job_id, "kind": kind}, queue=queue)


def _job_of(message: Any) -> str | None:
    try:
        headers = message.get("headers") or {}
        kwargs = ast.literal_eval(headers.get("kwargsrepr") or "{}")
    except (AttributeError, ValueError, SyntaxError):
        return None
    job_id = kwargs.get("job_id") if isinstance(kwargs, dict) else None
    return job_id if isinstance(job_id, str) else None


def jobs_in_broker(client: redis.Redis, queues: Iterable[str] = QUEUES) -> set[str]:
    """Ids of the jobs that have a message waiting in a queue or held unacknowledged."""
    found: set[str] = set()
    keys = [q for queue in queues
            for q in (queue, *(f"{queue}{PRIORITY_SEPARATOR}{p}" for p in PRIORITY_STEPS))]
    raw = [m for key in keys for m in client.lrange(key, 0, -1)]
    raw += [json.loads(entry)[0] for entry in client.hvals(UNACKED_KEY)]
    for message in raw:
        try:
            job_id = _job_of(json.loads(message) if isinstance(message, bytes | str) else message)
        except ValueError:
            continue
        if job_id is not None:
            found.add(job_id)
    return found
