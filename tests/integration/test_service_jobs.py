"""The API with a real worker and real Redis: jobs over HTTP, promotion while scoring,
a broken version, and a Redis outage that jobs notice and scoring does not."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.stack import live_server_for, serving_production_rm
from tests.worker.harness import JobHarness, wait_for, write_tiny_preferences
from training.registry import Registry

pytestmark = pytest.mark.integration

ITEM = {"prompt": "how are you today?", "response": "good great nice"}


@pytest.fixture
def stack(tmp_path: Path, redis_server, tiny_encoder_rm: Path) -> Iterator[tuple[JobHarness, str]]:
    """Worker + API sharing Redis, artifacts and data dir; the API serves ``rm:production``
    whose first version (v1) is the untrained tiny encoder."""
    harness = JobHarness(tmp_path, redis_server.url)
    write_tiny_preferences(harness.data_dir / "train.jsonl", 48, seed=0)
    write_tiny_preferences(harness.data_dir / "eval.jsonl", 16, seed=1)
    with serving_production_rm(harness, tiny_encoder_rm, enable_diagnostic_jobs=True,
                               model_poll_seconds=0.2) as url:
        yield harness, url
    harness.close()


def _score(url: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/score", json={"items": [ITEM], **extra}, timeout=60)


def test_train_rm_over_http_then_promote_while_scoring(stack) -> None:
    harness, url = stack
    worker = harness.start_worker()
    assert _score(url).json()["model"] == "rm@v1"

    spec = {"train_file": "train.jsonl", "eval_file": "eval.jsonl", "model": "rm@v1", "name": "rm",
            "params": {"max_steps": 120, "batch_size": 4, "max_length": 32, "learning_rate": 1e-3,
                       "warmup_ratio": 0.0, "checkpoint_every": 40, "device": "cpu"}}
    submitted = httpx.post(f"{url}/jobs", json={"kind": "train_rm", "spec": spec})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    assert submitted.json()["status_url"].endswith(f"/jobs/{job_id}")
    statuses, steps = [], []

    def finished():
        record = httpx.get(f"{url}/jobs/{job_id}").json()
        statuses.append(record["status"])
        if record["status"] == "running":
            steps.append(record["progress"].get("step") or 0)
        return record if record["status"] in ("succeeded", "failed", "cancelled") else None

    record = wait_for(finished, 300, "train_rm did not finish", worker, interval=0.05)
    assert record["status"] == "succeeded", record["error"]
    assert statuses[0] in ("queued", "running") and "running" in statuses
    assert len(set(steps)) >= 2 and steps == sorted(steps)
    assert record["artifacts"]["model"] == "rm@v2"
    assert any(j["id"] == job_id for j in httpx.get(f"{url}/jobs").json()["jobs"])

    models = httpx.get(f"{url}/models").json()
    (rm,) = [m for m in models["models"] if m["name"] == "rm"]
    assert [v["version"] for v in rm["versions"]] == ["v1", "v2"]
    assert rm["aliases"] == {"production": "v1", "latest": "v2"}
    assert models["served"] == "rm@v1"  # latest moved; production (what we serve) did not

    before = _score(url).json()["rewards"][0]
    errors: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                response = client.post(f"{url}/score", json={"items": [ITEM] * 4})
                if response.status_code != 200:
                    errors.append(response.text)
                else:
                    seen.add(response.json()["model"])

    streams = [threading.Thread(target=stream) for _ in range(3)]
    for t in streams:
        t.start()
    try:
        promoted = httpx.post(f"{url}/models/rm/aliases/production", json={"version": "v2"}, timeout=120)
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["served"] == "rm@v2" and promoted.json()["swap"] == "swapped"
        wait_for(lambda: "rm@v2" in seen, 30, "the stream never saw rm@v2")
    finally:
        stop.set()
        for t in streams:
            t.join()
    assert errors == []
    assert seen == {"rm@v1", "rm@v2"}
    after = _score(url).json()
    assert after["model"] == "rm@v2" and after["rewards"][0] != pytest.approx(before, abs=1e-6)

    # a trained version carries reward statistics: normalize works and means (r - mu) / sigma
    stats = Registry.from_artifacts(harness.artifacts).resolve("rm@v2").reward_stats
    normalized = _score(url, normalize=True).json()["rewards"][0]
    assert normalized == pytest.approx((after["rewards"][0] - stats["mean"]) / stats["std"], rel=1e-5)

    # roll back
    rolled = httpx.post(f"{url}/models/rm/aliases/production", json={"version": 1}, timeout=120).json()
    assert rolled["served"] == "rm@v1" and _score(url).json()["model"] == "rm@v1"


def test_a_version_that_cannot_load_is_refused_and_the_alias_does_not_move(stack, tmp_path) -> None:
    harness, url = stack
    registry = Registry.from_artifacts(harness.artifacts)
    broken_source = tmp_path / "broken"
    shutil.copytree(registry.resolve("rm@v1").path, broken_source)
    weights = next(broken_source.glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    registry.publish("rm", broken_source, {"kind": "reward_model"})

    response = httpx.post(f"{url}/models/rm/aliases/production", json={"version": "v2"}, timeout=120)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["type"] == "promotion_failed" and "rm@v2" in error["message"]
    assert registry.alias_target("rm", "production") == "v1"  # the next start serves v1 too
    assert _score(url).json()["model"] == "rm@v1"
    assert httpx.get(f"{url}/ready").status_code == 200


def test_damaged_weights_fail_their_digest_and_a_broken_alias_falls_back_loudly(
        tmp_path: Path, redis_server, tiny_encoder_rm: Path) -> None:
    harness = JobHarness(tmp_path, redis_server.url)
    registry = Registry.from_artifacts(harness.artifacts)
    try:
        with serving_production_rm(harness, tiny_encoder_rm) as url:
            assert _score(url).json()["model"] == "rm@v1"  # v1 served: the fallback on record
            v2 = registry.publish("rm", tiny_encoder_rm, {"kind": "reward_model"})
            weights = next(v2.path.glob("*.safetensors"))
            weights.write_bytes(b"\0" * weights.stat().st_size)  # zero-filled after publication
            refused = httpx.post(f"{url}/models/rm/aliases/production", json={"version": 2},
                                 timeout=120)
            assert refused.status_code == 409 and "digest" in refused.json()["error"]["message"]
        # another process moves the alias anyway; the next start must not be an outage
        registry.set_alias("rm", "production", "v2")
        with live_server_for(harness, model="rm:production") as server:
            ready = httpx.get(f"{server.url}/ready").json()
            assert ready["model"] == "rm@v1" and "rm@v2" in ready["fallback"]
            assert _score(server.url).json()["model"] == "rm@v1"
            assert "rm@v2" in httpx.get(f"{server.url}/models").json()["fallback"]
            assert "generalrm_model_fallback 1.0" in httpx.get(f"{server.url}/metrics").text
    finally:
        harness.close()


def test_bad_specs_are_422_and_unknown_jobs_404(stack) -> None:
    _, url = stack
    cases = [
        ({"kind": "bake_cake", "spec": {}}, "unknown job kind"),
        ({"kind": "train_rm", "spec": {}}, "train_file"),
        ({"kind": "train_rm", "spec": {"train_file": "missing.jsonl"}}, "missing.jsonl"),
        ({"kind": "train_rm", "spec": {"train_file": "../../etc/passwd"}}, "data"),
        ({"kind": "train_rm", "spec": {"train_file": "train.jsonl", "params": {"learning_rat": 1}}}, "learning_rat"),
        ({"kind": "train_rm", "spec": {"train_file": "train.jsonl", "params": {"batch_size": -3}}}, "batch_size"),
        ({"kind": "train_rm", "spec": {"train_file": "train.jsonl", "model": "nope@v7"}}, "nope"),
    ]
    for body, fragment in cases:
        response = httpx.post(f"{url}/jobs", json=body)
        assert response.status_code == 422, (body, response.text)
        assert fragment in response.json()["error"]["message"], (body, response.text)
    assert httpx.get(f"{url}/jobs").json()["jobs"] == []  # nothing was accepted
    assert httpx.get(f"{url}/jobs/not-a-job").status_code == 404
    assert httpx.delete(f"{url}/jobs/not-a-job").status_code == 404


def test_redis_outage_leaves_scoring_up_and_job_routes_503(stack, redis_server) -> None:
    _, url = stack
    assert httpx.get(f"{url}/jobs").status_code == 200
    redis_server.stop()
    try:
        assert _score(url).status_code == 200
        for response in (httpx.get(f"{url}/jobs"), httpx.post(f"{url}/jobs", json={"kind": "train_rm", "spec": {"train_file": "train.jsonl"}})):
            assert response.status_code == 503, response.text
            assert "Redis" in response.json()["error"]["message"]
        assert _score(url).status_code == 200
    finally:
        redis_server.start()
    wait_for(lambda: httpx.get(f"{url}/jobs").status_code == 200, 30, "job routes did not come back")


def test_a_server_started_before_its_model_exists_serves_it_once_promoted(
    tmp_path: Path, redis_server, tiny_encoder_rm: Path
) -> None:
    harness = JobHarness(tmp_path, redis_server.url)
    s = harness.settings
    try:
        with live_server_for(harness, wait=False, model="rm:production", model_poll_seconds=60) as server:
            wait_for(lambda: "no alias 'production'" in httpx.get(f"{server.url}/ready").text,
                     30, "the not-ready reason was never reported")
            assert httpx.get(f"{server.url}/ready").status_code == 503
            assert _score(server.url).status_code == 503
            Registry.from_artifacts(s.artifacts_dir).publish("rm", tiny_encoder_rm, {"kind": "reward_model"})
            promoted = httpx.post(f"{server.url}/models/rm/aliases/production", json={"version": "v1"}, timeout=120)
            assert promoted.json()["served"] == "rm@v1", promoted.text  # at once, not at the next poll
            assert httpx.get(f"{server.url}/ready").status_code == 200
            assert _score(server.url).json()["model"] == "rm@v1"
    finally:
        harness.close()
