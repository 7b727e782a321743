"""Jobs end to end: real redis-server, real ``python -m worker`` processes, the tiny RM."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.harness import JobHarness, wait_for
from training.registry import Registry
from training.reward_model import RewardModel
from worker.dispatch import enqueue
from worker.specs import latest_checkpoint_step

pytestmark = pytest.mark.integration


def _train_spec(model: Path, **params) -> dict:
    return {"train_file": "train.jsonl", "eval_file": "eval.jsonl", "model": str(model),
            "name": "tiny-rm",
            "params": {"batch_size": 4, "max_length": 32, "learning_rate": 1e-3,
                       "warmup_ratio": 0.0, "device": "cpu", **params}}


def _registry(jobs: JobHarness) -> Registry:
    return Registry.from_artifacts(jobs.artifacts)


def _parent_maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_train_rm_runs_to_a_new_registry_version(jobs: JobHarness, tiny_encoder_rm: Path) -> None:
    worker = jobs.start_worker()
    record = jobs.client.submit("train_rm", _train_spec(tiny_encoder_rm, max_steps=300,
                                                        checkpoint_every=50))
    assert record["status"] == "queued"
    job_id = record["id"]
    steps_seen: list[int] = []

    def finished() -> dict | None:
        current = jobs.client.get(job_id)
        step = current["progress"].get("step")
        if current["status"] == "running" and step is not None:
            steps_seen.append(step)
        return current if current["status"] in ("succeeded", "failed", "cancelled") else None

    done = wait_for(finished, 300, "train_rm did not finish", worker, interval=0.02)
    assert done["status"] == "succeeded", done["error"]
    assert len(set(steps_seen)) >= 2 and steps_seen == sorted(steps_seen), steps_seen
    assert done["progress"]["step"] == done["progress"]["total"] == 300
    assert done["attempt"] == 1 and done["error"] is None
    assert 0.0 <= done["metrics"]["eval_accuracy"] <= 1.0

    version = _registry(jobs).resolve("tiny-rm")
    assert done["artifacts"]["model"] == version.reference == "tiny-rm@v1"
    meta = version.metadata
    assert meta["job_id"] == job_id and meta["kind"] == "reward_model"
    assert meta["algorithm"] == "bradley_terry" and meta["base_model"] == str(tiny_encoder_rm)
    assert meta["data_fingerprint"].startswith("sha256:")
    assert meta["metrics"]["eval_accuracy"] == done["metrics"]["eval_accuracy"]
    assert set(meta["reward_stats"]) == {"mean", "std"}
    assert _registry(jobs).alias_target("tiny-rm", "latest") == "v1"
    rewards = RewardModel.from_pretrained(version.path, device="cpu").score(
        [{"prompt": "how are you today?", "response": "good great nice"}])
    assert len(rewards) == 1
    # the worker's parent process never loaded torch; the job ran in a child
    assert worker.alive() and not _parent_maps_torch(worker.pid)


def test_cancel_mid_job_keeps_the_checkpoint_and_publishes_nothing(
    jobs: JobHarness, tiny_encoder_rm: Path
) -> None:
    worker = jobs.start_worker()
    job_id = jobs.client.submit("train_rm", _train_spec(tiny_encoder_rm, max_steps=100_000,
                                                        checkpoint_every=0))["id"]
    wait_for(lambda: jobs.client.get(job_id)["progress"].get("step", 0) >= 10, 300,
             "training did not start", worker)
    asked = jobs.client.cancel(job_id)
    assert asked["cancel_requested"] is True and asked["status"] in ("running", "cancelled")
    done = jobs.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 120, worker)
    assert done["status"] == "cancelled"
    checkpoint = Path(done["artifacts"]["checkpoint"])
    assert (checkpoint / "MANIFEST.json").is_file()
    assert done["artifacts"]["cancelled_at_step"] >= 10
    assert _registry(jobs).versions("tiny-rm") == []
    assert jobs.client.cancel(job_id)["status"] == "cancelled", "cancelling again changes nothing"


def test_kill_9_mid_job_resumes_from_checkpoint_and_publishes_once(
    jobs: JobHarness, tiny_encoder_rm: Path
) -> None:
    first = jobs.start_worker()
    job_id = jobs.client.submit("train_rm", _train_spec(tiny_encoder_rm, max_steps=400,
                                                        checkpoint_every=20))["id"]
    run_dir = jobs.artifacts / "jobs" / job_id
    wait_for(lambda: latest_checkpoint_step(run_dir) >= 40, 300, "no checkpoint", first)
    first.kill9()
    killed_at = jobs.client.get(job_id)
    assert killed_at["status"] == "running" and killed_at["progress"]["step"] < 400

    second = jobs.start_worker()  # the old message stays unacked: the reaper re-queues the job
    done = jobs.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 300, second)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 2
    resumed = done["attempts"][-1]["resumed_from_step"]
    assert resumed >= 40, "the second attempt started from the checkpoint, not step 0"
    versions = _registry(jobs).versions("tiny-rm")
    assert [v.version for v in versions] == ["v1"] and versions[0].metadata["job_id"] == job_id

    # the original message delivered again (as after its visibility timeout): nothing happens
    enqueue(jobs.client.celery, job_id, "train_rm", "train")
    wait_for(lambda: "not run (finished)" in second.log(), 60, "duplicate not consumed", second)
    again = jobs.client.get(job_id)
    assert again["status"] == "succeeded" and again["attempt"] == 2
    assert len(_registry(jobs).versions("tiny-rm")) == 1


def test_a_job_that_kills_its_worker_fails_at_the_attempt_cap(jobs: JobHarness) -> None:
    worker = jobs.start_worker()
    job_id = jobs.client.submit("sleep_steps", {"steps": 5, "step_seconds": 0.05,
                                                "crash_at_step": 3})["id"]
    done = jobs.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 120, worker)
    assert done["status"] == "failed"
    assert done["attempt"] == done["max_attempts"] == 3
    assert done["error"]["type"] in ("WorkerLost", "AttemptsExhausted")
    assert "giving up" in done["error"]["message"]
    assert [a["resumed_from_step"] for a in done["attempts"]] == [0, 2, 2]
    assert worker.alive(), "the worker survives its poison job"


def test_two_workers_never_run_the_same_job(jobs: JobHarness) -> None:
    workers = [jobs.start_worker(), jobs.start_worker()]
    job_id = jobs.client.submit("sleep_steps", {"steps": 15, "step_seconds": 0.1})["id"]
    wait_for(lambda: jobs.client.get(job_id)["status"] == "running", 60, "not started", workers[0])
    enqueue(jobs.client.celery, job_id, "sleep_steps", "train")  # a duplicate message
    wait_for(lambda: any("not run (owned)" in w.log() for w in workers), 60,
             "the duplicate was not refused", workers[1])
    done = jobs.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 60, workers[0])
    assert done["status"] == "succeeded" and done["attempt"] == 1 and len(done["attempts"]) == 1


def test_a_queued_job_cancelled_before_any_worker_never_runs(jobs: JobHarness) -> None:
    job_id = jobs.client.submit("sleep_steps", {"steps": 3, "step_seconds": 0.01})["id"]
    assert jobs.client.cancel(job_id)["status"] == "cancelled"
    worker = jobs.start_worker()
    wait_for(lambda: "not run (finished)" in worker.log(), 60, "message not consumed", worker)
    record = jobs.client.get(job_id)
    assert record["status"] == "cancelled" and record["attempt"] == 0
    assert not (jobs.artifacts / "jobs" / job_id).exists()


def test_job_routes_fail_clearly_while_redis_restarts(jobs: JobHarness, redis_server) -> None:
    from worker.client import JobStoreUnavailable

    job_id = jobs.client.submit("sleep_steps", {"steps": 2})["id"]
    redis_server.stop()
    try:
        for call in (lambda: jobs.client.get(job_id), jobs.client.list, jobs.client.ping):
            with pytest.raises(JobStoreUnavailable, match="cannot reach Redis"):
                call()
    finally:
        redis_server.start()
    # back: the record survived the restart (append-only file) and calls work again
    assert wait_for(lambda: _try_get(jobs, job_id), 30, "Redis did not come back")["status"] == "queued"


def _try_get(jobs: JobHarness, job_id: str):
    from worker.client import JobStoreUnavailable

    try:
        return jobs.client.get(job_id)
    except JobStoreUnavailable:
        return None


def test_sigterm_checkpoints_and_hands_the_job_to_the_next_worker(jobs: JobHarness) -> None:
    first = jobs.start_worker()
    job_id = jobs.client.submit("sleep_steps", {"steps": 40, "step_seconds": 0.1})["id"]
    wait_for(lambda: jobs.client.get(job_id)["progress"].get("step", 0) >= 3, 60, "not started", first)
    first.stop()  # SIGTERM, as `docker compose stop` sends
    record = jobs.client.get(job_id)
    assert record["status"] == "queued" and record["attempt"] == 0, record
    stopped_at = latest_checkpoint_step(jobs.artifacts / "jobs" / job_id)
    assert 3 <= stopped_at < 40

    second = jobs.start_worker()
    done = jobs.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 60, second)
    assert done["status"] == "succeeded" and done["attempt"] == 1
    assert done["attempts"][-1]["resumed_from_step"] == stopped_at
