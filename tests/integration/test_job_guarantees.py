"""What the job system promises when things go wrong: an accepted job is never silently lost
(a message lost in a Redis crash is sent again), a job never writes over a file, a spec that
cannot run is refused at submission, a late cancel is said to be late, and finished records
expire while the counts /metrics reads stay right."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisServer
from tests.worker.harness import JobHarness, wait_for, write_tiny_preferences
from worker.client import SpecError
from worker.dispatch import jobs_in_broker
from worker.specs import JobContext
from worker.store import CANCEL_TOO_LATE, JobStore

pytestmark = pytest.mark.integration
FINAL = {"succeeded", "failed", "cancelled"}


def test_a_queued_job_whose_message_was_lost_is_sent_again(jobs: JobHarness) -> None:
    job_id = jobs.client.submit("sleep_steps", {"steps": 2, "step_seconds": 0.01})["id"]
    broker = redis.Redis.from_url(jobs.settings.redis_url)
    assert job_id in jobs_in_broker(broker)
    broker.delete("train")  # the message is gone, the record says queued: as after a crash
    assert job_id not in jobs_in_broker(broker)
    worker = jobs.start_worker()
    done = jobs.wait_status(job_id, FINAL, 60, worker)
    assert done["status"] == "succeeded" and done["attempt"] == 1
    assert "sent again" in worker.log()


def test_kill_9_of_redis_right_after_submission_never_leaves_a_job_queued_forever(
        tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    server.start()
    try:
        for attempt in range(4):
            harness = JobHarness(tmp_path / f"try{attempt}", server.url)
            job_id = harness.client.submit("sleep_steps", {"steps": 1, "step_seconds": 0.0})["id"]
            server.process.kill()  # kill -9: no chance to flush the append-only file
            server.process.wait(timeout=10)
            server.start()  # same port, same directory: what the AOF kept
            record = harness.client.get(job_id)
            if record is not None:  # kept: it must run, whatever became of its message
                worker = harness.start_worker()
                assert harness.wait_status(job_id, FINAL, 60, worker)["status"] == "succeeded"
            harness.close()
    finally:
        server.stop()


def test_a_strength_job_never_writes_over_a_file(jobs: JobHarness) -> None:
    train = write_tiny_preferences(jobs.data_dir / "train.jsonl", 8, seed=0)
    original = train.read_bytes()
    for spec, says in [
        ({"train_file": "train.jsonl", "output_file": "train.jsonl"}, "already exists"),
        ({"train_file": "train.jsonl", "output_file": "../elsewhere.jsonl"}, "outside"),
    ]:
        with pytest.raises(SpecError, match=says):
            jobs.client.submit("strength", spec)
    (jobs.data_dir / "train.strength.jsonl").write_text("{}\n")  # the default target, taken
    with pytest.raises(SpecError, match="train.strength.jsonl already exists"):
        jobs.client.submit("strength", {"train_file": "train.jsonl"})
    assert train.read_bytes() == original


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"params": {"learning_rate": math.nan}}, "learning_rate"),
        ({"params": {"learning_rate": math.inf}}, "learning_rate"),
        ({"params": {"max_steps": 1e18}}, "max_steps"),
        ({"params": {"batch_size": 1e9}}, "batch_size"),
        ({"params": {"batch_size": 10**9}}, "batch_size"),
        ({"params": {"max_length": 10**9}}, "max_length"),
        ({"params": {"device": "cuda:99"}}, "params.device"),
        ({"model": "nope/nope"}, "local Hugging Face cache"),
        ({"model": "/"}, "outside the directories jobs may load models from"),
        ({"train_file": "train.jsonl\x00x"}, "NUL"),
    ],
)
def test_specs_that_would_fail_on_the_worker_are_refused_at_submission(
        jobs: JobHarness, spec: dict, says: str) -> None:
    write_tiny_preferences(jobs.data_dir / "train.jsonl", 4, seed=0)
    with pytest.raises(SpecError, match=says):
        jobs.client.submit("train_rm", {"train_file": "train.jsonl", **spec})
    assert jobs.client.list() == []


def _claimed(store: JobStore, job_id: str = "job-1") -> None:
    store.create(job_id, "sleep_steps", "train", {}, 3)
    assert store.claim(job_id, "token", 30, 3, "w").outcome == "claimed"


def test_a_cancel_before_publishing_stops_the_job_and_after_it_is_said_to_be_late(
        jobs: JobHarness, tmp_path: Path) -> None:
    store = jobs.client.store
    _claimed(store)
    jobs.client.cancel("job-1")
    context = JobContext(job_id="job-1", spec={}, run_dir=tmp_path, settings=jobs.settings,
                         callback=None, attempt=1, registry=None,
                         stop_requested=lambda: store.cancel_requested("job-1"))
    from training.callbacks import TrainingCancelled

    with pytest.raises(TrainingCancelled):
        context.before_publish()  # the last step is done, nothing published yet: honoured

    _claimed(store, "job-2")
    jobs.client.cancel("job-2")  # arrives while the job publishes: too late
    assert store.finish_if_owner("job-2", "token", "succeeded", metrics={})
    record = jobs.client.get("job-2")
    assert record["status"] == "succeeded" and record["cancel_outcome"] == CANCEL_TOO_LATE
    again = jobs.client.cancel("job-2")
    assert again["status"] == "succeeded" and again["cancel_outcome"].startswith("too late")


def test_finished_records_expire_and_the_counts_stay_right(jobs: JobHarness) -> None:
    store = JobStore(jobs.client.store.redis, retention_seconds=1)
    for job_id in ("a", "b", "c"):
        store.create(job_id, "sleep_steps", "train", {}, 3)
    assert store.claim("a", "t", 30, 3, "w").outcome == "claimed"
    assert store.finish_if_owner("a", "t", "succeeded")
    assert store.cancel("b") == "cancelled"
    assert store.counts() == {"queued": 1, "running": 0, "succeeded": 1, "failed": 0,
                              "cancelled": 1}
    assert store.get("a")["finished_at"] is not None
    wait_for(lambda: store.get("a") is None and store.get("b") is None, 10, "records not expired")
    assert store.get("c")["status"] == "queued"  # unfinished records never expire
    assert store.counts()["succeeded"] == 1  # the count outlives the record
    assert [r["id"] for r in store.list()] == ["c"]


def test_the_resumed_step_survives_progress_writes(jobs: JobHarness) -> None:
    first = jobs.start_worker()
    job_id = jobs.client.submit("sleep_steps", {"steps": 30, "step_seconds": 0.1})["id"]
    wait_for(lambda: jobs.client.get(job_id)["progress"].get("step", 0) >= 3, 60, "not started", first)
    first.stop()
    second = jobs.start_worker()
    wait_for(lambda: jobs.client.get(job_id)["progress"].get("step", 0) >= 10, 60, "no progress", second)
    progress = jobs.client.get(job_id)["progress"]
    assert progress["resumed_from_step"] >= 3 and progress["step"] > progress["resumed_from_step"]
    jobs.wait_status(job_id, FINAL, 60, second)
