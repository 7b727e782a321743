"""Real worker processes and a job client of a test's own (redis-server from conftest).

A worker is ``python -m worker`` in its own session, so ``kill9`` takes down its parent and
its job process at once, like a machine or container dying.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from worker.client import JobClient
from worker.settings import WorkerSettings as Settings

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_SECONDS = 0.3
STALE_SECONDS = 2.0
RESEND_SECONDS = 1.0
MAX_ATTEMPTS = 3


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.env, self.log_path, self.name = env, log_path, name
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker", "--loglevel", "info", "--hostname", self.name],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: " ready." in self.log_path.read_text(errors="replace"), timeout,
                 f"worker {self.name} did not become ready", self)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL the worker and its job process: no chance to checkpoint or ack."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            # the main process only, as `docker stop` does (PID 1); it drains its job child
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        # nothing of this worker may outlive the test (an orphaned job process)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_for(predicate: Callable[[], Any], timeout: float, message: str,
             worker: WorkerProcess | None = None, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tail = worker.log()[-4000:] if worker is not None else ""
    raise AssertionError(f"{message} within {timeout}s\n--- worker log ---\n{tail}")


class JobHarness:
    """Settings, a client, and workers for one test, on a flushed Redis database."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        self.tmp_path = tmp_path
        self.artifacts = tmp_path / "artifacts"
        self.data_dir = tmp_path / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.env_vars = {
            "GENERALRM_REDIS_URL": redis_url,
            "GENERALRM_ARTIFACTS_DIR": str(self.artifacts),
            "GENERALRM_DATA_DIR": str(self.data_dir),
            "GENERALRM_JOB_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "GENERALRM_JOB_STALE_SECONDS": str(STALE_SECONDS),
            "GENERALRM_JOB_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "GENERALRM_JOB_RESEND_SECONDS": str(RESEND_SECONDS),
            "GENERALRM_VISIBILITY_TIMEOUT_SECONDS": "3600",
            "GENERALRM_ENABLE_DIAGNOSTIC_JOBS": "1",
            "GENERALRM_DEVICE": "cpu",
        }
        redis.Redis.from_url(redis_url).flushdb()
        self.settings = Settings(
            redis_url=redis_url, artifacts_dir=self.artifacts, data_dir=self.data_dir,
            job_heartbeat_seconds=HEARTBEAT_SECONDS, job_stale_seconds=STALE_SECONDS,
            job_max_attempts=MAX_ATTEMPTS, visibility_timeout_seconds=3600,
            job_resend_seconds=RESEND_SECONDS,
            enable_diagnostic_jobs=True, device="cpu",
        )
        self.client = JobClient(self.settings)
        self.workers: list[WorkerProcess] = []

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENERALRM_")}
        env.update(self.env_vars, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        return env

    def start_worker(self) -> WorkerProcess:
        name = f"test{len(self.workers)}-{random.randrange(1 << 30)}@localhost"
        worker = WorkerProcess(self.env, self.tmp_path / f"worker{len(self.workers)}.log", name)
        self.workers.append(worker)
        return worker.start()

    def wait_status(self, job_id: str, statuses: set[str], timeout: float = 180.0,
                    worker: WorkerProcess | None = None) -> dict[str, Any]:
        return wait_for(lambda: (r := self.client.get(job_id)) and r["status"] in statuses and r,
                        timeout, f"job {job_id} did not reach {statuses}", worker)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.client.close()


def write_tiny_preferences(path: Path, pairs: int, seed: int) -> Path:
    """Pairs in the tiny tokenizer's vocabulary: positive words preferred over negative ones."""
    good = ["good", "great", "excellent", "wonderful", "happy", "love", "nice"]
    bad = ["bad", "awful", "terrible", "horrible", "sad", "hate", "poor"]
    prompts = ["how are you today?", "what does this word mean?", "hello, how are you?"]
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(pairs):
            handle.write(json.dumps({
                "prompt": rng.choice(prompts),
                "chosen": " ".join(rng.sample(good, 3)),
                "rejected": " ".join(rng.sample(bad, 3)),
            }) + "\n")
    return path
