"""Job store transitions against a real redis-server: claim, lease, cancel, reap."""

from __future__ import annotations

import time

import pytest

from tests.conftest import free_port
from tests.worker.harness import JobHarness, wait_for
from worker.client import JobClient, JobStoreUnavailable
from worker.reaper import reap_stale
from worker.settings import WorkerSettings as Settings
from worker.store import JobStore


def _create(store: JobStore, job_id: str = "job-1", max_attempts: int = 2) -> dict:
    return store.create(job_id, "sleep_steps", "train", {"steps": 3}, max_attempts)


def test_only_one_worker_can_claim_a_job(jobs: JobHarness) -> None:
    store = jobs.client.store
    _create(store)
    first = store.claim("job-1", "token-a", 5, 2, "worker-a")
    second = store.claim("job-1", "token-b", 5, 2, "worker-b")
    assert (first.outcome, first.attempt) == ("claimed", 1)
    assert second.outcome == "owned"
    assert store.get("job-1")["status"] == "running"
    assert store.update_if_owner("job-1", "token-a", progress={"step": 1, "total": 3})
    assert not store.update_if_owner("job-1", "token-b", progress={"step": 99, "total": 3})
    assert not store.finish_if_owner("job-1", "token-b", "succeeded")
    assert store.get("job-1")["progress"] == {"step": 1, "total": 3}
    assert store.finish_if_owner("job-1", "token-a", "succeeded", metrics={"loss": float("nan")})
    record = store.get("job-1")
    assert record["status"] == "succeeded" and record["metrics"] == {"loss": None}
    # a message delivered again later finds the job finished and does nothing
    assert store.claim("job-1", "token-c", 5, 2, "worker-c").outcome == "finished"
    assert store.active_ids() == []


def test_cancel_of_a_queued_job_is_immediate_and_final(jobs: JobHarness) -> None:
    store = jobs.client.store
    _create(store)
    assert store.cancel("job-1") == "cancelled"
    assert store.get("job-1")["status"] == "cancelled"
    assert store.claim("job-1", "token-a", 5, 2, "worker-a").outcome == "finished"
    assert store.cancel("job-1") == "ended:cancelled"
    assert store.cancel("nope") == "missing"


def test_cancel_of_a_running_job_sets_the_key_the_trainer_reads(jobs: JobHarness) -> None:
    store = jobs.client.store
    _create(store)
    store.claim("job-1", "token-a", 5, 2, "worker-a")
    assert store.cancel("job-1") == "cancelling"
    record = store.get("job-1")
    assert record["status"] == "running" and record["cancel_requested"] is True
    assert store.cancel_requested("job-1")
    store.finish_if_owner("job-1", "token-a", "cancelled")
    assert not store.cancel_requested("job-1"), "the key goes with the job"


def test_a_stale_job_is_requeued_then_failed_at_the_attempt_cap(jobs: JobHarness) -> None:
    store = jobs.client.store
    settings = jobs.settings.model_copy(update={"job_stale_seconds": 0.3})
    _create(store, max_attempts=2)
    sent: list[str] = []

    def enqueue(job_id: str, kind: str, queue: str) -> None:
        sent.append(job_id)

    store.claim("job-1", "dead-worker-1", 0.3, 2, "w1")  # the lease is never renewed
    assert reap_stale(store, settings, enqueue) == [], "lease still valid: alive"
    wait_for(lambda: store.lease_holder("job-1") is None, 5, "lease did not expire")
    assert reap_stale(store, settings, enqueue) == [{"id": "job-1", "action": "requeued"}]
    assert sent == ["job-1"] and store.get("job-1")["status"] == "queued"
    assert reap_stale(store, settings, enqueue) == [], "requeued once, not at every pass"

    assert store.claim("job-1", "dead-worker-2", 0.3, 2, "w2").attempt == 2
    wait_for(lambda: store.lease_holder("job-1") is None, 5, "lease did not expire")
    assert reap_stale(store, settings, enqueue) == [{"id": "job-1", "action": "failed"}]
    record = store.get("job-1")
    assert record["status"] == "failed" and record["error"]["type"] == "WorkerLost"
    assert "giving up" in record["error"]["message"]
    assert sent == ["job-1"]


def test_a_stale_job_with_a_cancel_request_is_cancelled(jobs: JobHarness) -> None:
    store = jobs.client.store
    _create(store)
    store.claim("job-1", "dead", 0.2, 2, "w")
    store.cancel("job-1")
    wait_for(lambda: store.lease_holder("job-1") is None, 5, "lease did not expire")
    assert reap_stale(store, jobs.settings, lambda *a: None) == [{"id": "job-1", "action": "cancelled"}]


def test_claim_past_the_attempt_cap_fails_the_job(jobs: JobHarness) -> None:
    store = jobs.client.store
    _create(store, max_attempts=1)
    store.claim("job-1", "a", 0.2, 1, "w")
    wait_for(lambda: store.lease_holder("job-1") is None, 5, "lease did not expire")
    claim = store.claim("job-1", "b", 5, 1, "w")  # e.g. the original message redelivered
    assert claim.outcome == "exhausted"
    assert store.get("job-1")["error"]["type"] == "AttemptsExhausted"


def test_running_processes_follow_every_transition(jobs: JobHarness) -> None:
    """/metrics' process gauge: a job counts its processes while it runs, whichever way it
    stops running (finished, handed back, reaped), and a lost launch spends its attempt."""
    store = jobs.client.store
    store.create("multi", "train_rm", "multi", {}, 3, processes=4)
    _create(store, "single", max_attempts=3)
    assert store.gauges().processes == 0
    store.claim("multi", "token-a", 5, 3, "worker-a")
    store.claim("single", "token-b", 5, 3, "worker-b")
    assert store.gauges().processes == 5 and store.gauges().counts["running"] == 2
    assert store.release_if_owner("multi", "token-a", count_attempt=True)
    assert store.get("multi")["attempt"] == 1 and store.get("multi")["status"] == "queued"
    assert store.gauges().processes == 1
    store.claim("multi", "token-c", 0.2, 3, "worker-c")
    assert store.get("multi")["attempt"] == 2 and store.gauges().processes == 5
    time.sleep(0.3)  # worker-c's lease expires: the reaper hands the job back
    assert store.reap("multi", 3, 0.2) == "requeued" and store.gauges().processes == 1
    assert store.release_if_owner("single", "token-b")  # a shutdown: the attempt is refunded
    assert store.get("single")["attempt"] == 0 and store.gauges().processes == 0
    store.claim("single", "token-d", 5, 3, "worker-d")
    store.finish_if_owner("single", "token-d", "succeeded")
    gauges = store.gauges()
    assert gauges.processes == 0 and gauges.counts == {
        "queued": 1, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0}


def test_list_newest_first_with_status_filter(jobs: JobHarness) -> None:
    store = jobs.client.store
    for i in range(5):
        _create(store, f"job-{i}")
        time.sleep(0.002)
    store.cancel("job-1")
    assert [r["id"] for r in jobs.client.list(limit=3)] == ["job-4", "job-3", "job-2"]
    assert [r["id"] for r in jobs.client.list(status="cancelled")] == ["job-1"]
    assert jobs.client.counts() == {"queued": 4, "running": 0, "succeeded": 0, "failed": 0,
                                    "cancelled": 1}
    with pytest.raises(ValueError):
        jobs.client.list(status="done")


def test_every_call_raises_job_store_unavailable_without_redis(tmp_path) -> None:
    client = JobClient(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0",
                                artifacts_dir=tmp_path, data_dir=tmp_path))
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    calls = [client.ping, lambda: client.get("x"), client.list, lambda: client.cancel("x"),
             client.reap_stale, lambda: client.submit("train_rm", {"train_file": "d.jsonl",
                                                                    "model": str(tmp_path)})]
    for call in calls:
        with pytest.raises(JobStoreUnavailable, match="cannot reach Redis"):
            call()


def test_finished_at_is_set_once_a_job_reaches_a_final_status(jobs: JobHarness) -> None:
    store = jobs.client.store
    assert _create(store)["finished_at"] is None
    store.claim("job-1", "token-a", 5, 2, "worker-a")
    assert store.get("job-1")["finished_at"] is None  # running is not final
    store.finish_if_owner("job-1", "token-a", "succeeded")
    done = store.get("job-1")
    assert done["finished_at"] == done["updated_at"] and done["finished_at"] >= done["created_at"]
    _create(store, "job-2")
    store.cancel("job-2")  # queued: cancelled at once
    assert store.get("job-2")["finished_at"] is not None
    _create(store, "job-3", max_attempts=1)
    store.claim("job-3", "token-a", 0.05, 1, "worker-a")
    time.sleep(0.2)  # the lease expires: the worker is presumed dead, at the attempt cap
    assert store.reap("job-3", 1, 0.05) == "failed"
    assert store.get("job-3")["finished_at"] is not None
