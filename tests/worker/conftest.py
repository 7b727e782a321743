from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.worker.harness import JobHarness


@pytest.fixture
def jobs(tmp_path: Path, redis_server) -> Iterator[JobHarness]:
    harness = JobHarness(tmp_path, redis_server.url)
    yield harness
    harness.close()
