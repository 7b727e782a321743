"""The API beside a test's worker: one Redis, one artifacts and data directory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from tests.service.conftest import LiveServer, live_server
from tests.worker.harness import JobHarness
from training.registry import Registry


def live_server_for(harness: JobHarness, **overrides) -> AbstractContextManager[LiveServer]:
    """A live API with the harness's Redis, directories and job limits."""
    s = harness.settings
    return live_server(
        redis_url=s.redis_url, artifacts_dir=s.artifacts_dir, data_dir=s.data_dir,
        job_max_attempts=s.job_max_attempts, job_stale_seconds=s.job_stale_seconds, **overrides,
    )


@contextmanager
def serving_production_rm(harness: JobHarness, reward_model: Path, **overrides) -> Iterator[str]:
    """Publish ``reward_model`` as ``rm@v1`` = ``rm:production`` and serve ``rm:production``;
    yields the API's URL."""
    registry = Registry.from_artifacts(harness.artifacts)
    registry.publish("rm", reward_model, {"kind": "reward_model", "algorithm": "none"})
    registry.set_alias("rm", "production", "v1")
    with live_server_for(harness, model="rm:production", **overrides) as server:
        yield server.url
