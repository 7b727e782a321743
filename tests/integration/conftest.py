from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.worker.harness import JobHarness, write_tiny_preferences


@pytest.fixture
def jobs(tmp_path: Path, redis_server) -> Iterator[JobHarness]:
    """A job harness on the session's Redis, with tiny train/eval pairs in its data dir."""
    harness = JobHarness(tmp_path, redis_server.url)
    write_tiny_preferences(harness.data_dir / "train.jsonl", 48, seed=0)
    write_tiny_preferences(harness.data_dir / "eval.jsonl", 16, seed=1)
    yield harness
    harness.close()
