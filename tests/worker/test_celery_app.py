"""The Celery configuration of DESIGN §5 and the worker command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.celery_app import RUN_JOB_TASK, make_celery, route_by_kind
from worker.cli import parse_args
from worker.settings import WorkerSettings as Settings


def test_celery_settings_guard_long_jobs() -> None:
    app = make_celery(Settings(redis_url="redis://example:6379/3", visibility_timeout_seconds=86400))
    conf = app.conf
    assert conf.broker_url == conf.result_backend == "redis://example:6379/3"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_max_tasks_per_child == 1
    assert conf.broker_transport_options["visibility_timeout"] == 86400
    queues = {q.name: q for q in conf.task_queues}
    assert set(queues) == {"train", "adapt", "multi"}
    assert {q.routing_key for q in queues.values()} == {"train", "adapt", "multi"}, "one queue per key"


def test_messages_are_routed_by_job_kind() -> None:
    assert route_by_kind(RUN_JOB_TASK, [], {"job_id": "x", "kind": "train_rm"}, {}) == {"queue": "train"}
    assert route_by_kind("other.task", [], {}, {}) is None


def test_worker_command_line() -> None:
    args = parse_args(["-Q", "adapt", "-c", "2"])
    assert (args.queues, args.concurrency) == ("adapt", 2)
    assert parse_args([]).queues == "train,adapt,multi"
    with pytest.raises(SystemExit):
        parse_args(["--queues", "gpu"])


def test_the_worker_parent_and_the_client_never_import_torch() -> None:
    code = ("import sys, worker, worker.tasks, worker.client, worker.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
