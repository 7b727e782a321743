"""GET /metrics — Prometheus exposition of this app's registry."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from service.deps import EngineDep, JobsDep, MetricsDep
from worker.client import JobStoreUnavailable

router = APIRouter()


def _job_gauges(registry, jobs) -> None:
    try:
        gauges = jobs.gauges()
        depths = jobs.queue_depths()
    except JobStoreUnavailable:
        return  # scoring metrics stay available while Redis is down
    for status, count in gauges.counts.items():
        registry.jobs.labels(status).set(count)
    registry.job_processes.set(gauges.processes)
    for queue, depth in depths.items():
        registry.job_queue_depth.labels(queue).set(depth)


@router.get("/metrics")
async def metrics(registry: MetricsDep, engine: EngineDep, jobs: JobsDep) -> Response:
    registry.queue_depth.set(engine.queue_depth)
    await run_in_threadpool(_job_gauges, registry, jobs)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
