"""The Celery application: Redis broker and backend, queues ``train`` and ``adapt`` (DESIGN §5),
and ``multi`` for jobs that run over several processes (one worker's GPUs).

Importing this module must stay cheap and torch-free: the worker's parent process imports it
and only forks children (one job each, ``worker_max_tasks_per_child=1``) that import torch
inside the task body.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from worker.settings import WorkerSettings

RUN_JOB_TASK = "generalrm.run_job"
MULTI_QUEUE = "multi"  # jobs with resources.processes > 1: for workers that see enough GPUs
QUEUES = ("train", "adapt", MULTI_QUEUE)


def route_by_kind(name, args, kwargs, options, task=None, **kw):
    """Celery router: a ``run_job`` message goes to the queue of its job kind."""
    if name != RUN_JOB_TASK:
        return None
    from worker.kinds import get_kind

    kind = (kwargs or {}).get("kind")
    try:
        return {"queue": get_kind(kind, diagnostics=True).queue}
    except KeyError:
        return {"queue": "train"}


def make_celery(settings: WorkerSettings | None = None) -> Celery:
    settings = settings or WorkerSettings()
    app = Celery("generalrm", broker=settings.redis_url, backend=settings.redis_url)
    transport = {"visibility_timeout": settings.visibility_timeout_seconds}
    app.conf.update(
        # each queue its own direct exchange and key: a message lands in exactly one queue
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="train",
        task_default_exchange="train",
        task_default_routing_key="train",
        task_routes=(route_by_kind,),
        # a job message is acknowledged only once the job is over, and given back to the
        # broker when its worker process dies; the job store decides whether it still runs
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,  # a fresh process per job: no CUDA state carried over
        worker_concurrency=1,  # one process per GPU; more GPUs, more workers
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        task_ignore_result=True,  # the job record in Redis is the result, not Celery's
        broker_connection_retry_on_startup=True,
        # submitting while Redis is down must fail fast (the API answers 503), not hang
        task_publish_retry_policy={
            "max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1,
        },
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = make_celery()
app.conf.include = ["worker.tasks"]
