"""Jobs over several processes: real redis-server, real ``python -m worker`` processes, and the
trainer launched with ``accelerate launch`` over 2 CPU processes (gloo) on the tiny RM.

The tiny encoder here has no dropout and the runs are fp32 (``bf16: false``), so a run is a
function of its data alone and the loss curves of 1 and 2 processes can be compared value by
value. Tolerance: the largest per-step difference of the training loss may be
``CURVE_TOLERANCE``; what differs is float rounding (each rank pads its share to its own
length; the gradient is summed over two ranks). bf16 autocast: ``tests/training/test_launch.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from tests import tiny
from tests.integration.stack import serving_production_rm
from tests.worker.harness import JobHarness, wait_for, write_tiny_preferences
from training.bt.trainer import LOSS_HISTORY_FILE
from training.registry import Registry
from training.reward_model import RewardModel
from worker.specs import latest_checkpoint_step

pytestmark = pytest.mark.integration

CURVE_TOLERANCE = 1e-5  # measured: 8e-8 over 24 steps
META_TOLERANCE = 1e-4  # relative; measured: 1e-6 (tests/training/oodpl/test_launch_oodpl.py)
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def still_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny encoder RM without dropout."""
    return tiny.build_encoder_rm(tmp_path_factory.mktemp("tiny-encoder-no-dropout"), dropout=0.0)


def _spec(model: Path, name: str, processes: int = 1, **params) -> dict:
    spec = {"train_file": "train.jsonl", "eval_file": "eval.jsonl", "model": str(model),
            "name": name,
            "params": {"batch_size": 8, "max_length": 32, "learning_rate": 1e-3,
                       "warmup_ratio": 0.0, "device": "cpu", "bf16": False, **params}}
    if processes > 1:
        spec["resources"] = {"processes": processes, "strategy": "ddp"}
    return spec


def _curve(jobs: JobHarness, job_id: str) -> list[float]:
    return json.loads((jobs.artifacts / "jobs" / job_id / LOSS_HISTORY_FILE).read_text())


def _alive(pid: int) -> bool:
    """A process that runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _ranks_running(jobs: JobHarness, job_id: str, attempt: int) -> dict | None:
    record = jobs.client.get(job_id)
    attempts = record["attempts"]
    if len(attempts) >= attempt and attempts[attempt - 1].get("ranks"):
        return record
    return None


def _versions(jobs: JobHarness, name: str) -> list[str]:
    return [v.version for v in Registry.from_artifacts(jobs.artifacts).versions(name)]


def test_two_processes_train_the_one_process_curve_and_publish_once(
    jobs: JobHarness, still_encoder: Path
) -> None:
    worker = jobs.start_worker()
    one = jobs.client.submit("train_rm", _spec(still_encoder, "rm-one", max_steps=24))["id"]
    submitted = jobs.client.submit("train_rm", _spec(still_encoder, "rm-two", 2, max_steps=24))
    assert (submitted["processes"], submitted["queue"]) == (2, "multi")
    two = submitted["id"]
    # /metrics reads this hash: while the 2-process job runs it counts both of its processes
    wait_for(lambda: jobs.client.gauges().processes == 2, 300, "2 running processes", worker)
    done_one = jobs.wait_status(one, FINAL, 300, worker)
    done_two = jobs.wait_status(two, FINAL, 300, worker)
    assert done_one["status"] == done_two["status"] == "succeeded", done_two["error"]

    curve_one, curve_two = _curve(jobs, one), _curve(jobs, two)
    assert len(curve_one) == len(curve_two) == 24
    assert curve_one[0] > curve_one[-1], "it learned something"
    assert max(abs(a - b) for a, b in zip(curve_one, curve_two, strict=True)) <= CURVE_TOLERANCE
    assert done_two["metrics"]["eval_accuracy"] == done_one["metrics"]["eval_accuracy"]
    assert done_two["metrics"]["eval_reward_diff_mean"] == pytest.approx(
        done_one["metrics"]["eval_reward_diff_mean"], abs=1e-4)

    attempt = done_two["attempts"][0]
    assert attempt["processes"] == 2 and [r["rank"] for r in attempt["ranks"]] == [0, 1]
    pids = [r["pid"] for r in attempt["ranks"]]
    assert len(set(pids)) == 2 and worker.pid not in pids
    wait_for(lambda: not any(_alive(p) for p in pids), 60, "the ranks outlived their job", worker)
    assert jobs.client.gauges().processes == 0

    # one version, ordinary safetensors (never shards), that loads and scores
    assert _versions(jobs, "rm-two") == ["v1"]
    version = Registry.from_artifacts(jobs.artifacts).resolve("rm-two")
    assert version.metadata["job_id"] == two
    assert version.metadata["resources"] == {"processes": 2, "strategy": "ddp"}
    files = sorted(p.name for p in version.path.iterdir())
    assert "model.safetensors" in files and not any("index" in f for f in files), files
    assert len(RewardModel.from_pretrained(version.path, device="cpu").score(
        [{"prompt": "how are you today?", "response": "good great nice"}])) == 1


def _meta_data(data_dir: Path) -> None:
    """Two source domains of D_xy rows and D_PL pairs (positive words beat negative ones)."""
    good, bad = ["good great nice", "happy love wonderful"], ["bad awful sad", "poor hate"]
    prompts = ["how are you today?", "what does this word mean?", "hello, how are you?"]
    samples = [{"prompt": p, "domain": d, "responses": good + bad}
               for d in ("greetings", "words") for p in prompts]
    pairs = [{"prompt": p, "chosen": g, "rejected": b, "domain": d}
             for d in ("greetings", "words") for p in prompts for g in good for b in bad]
    for name, rows in (("source.samples", samples), ("source.pairs", pairs)):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _meta_spec(rm: Path, policy: Path, name: str, processes: int = 1) -> dict:
    spec = {"reward_model": str(rm), "policy": str(policy), "name": name,
            "samples_file": "source.samples.jsonl", "pairs_file": "source.pairs.jsonl",
            "params": {"outer_steps": 4, "responses_per_prompt": 3, "inner_batch_prompts": 3,
                       "outer_batch_pairs": 4, "bt_weight": 0.5, "eval_pairs": 4,
                       "precompute_pairs": 6, "hypergradient_checks": 1, "inner_lr": 0.1,
                       "outer_lr": 1e-3, "beta": 0.5, "policy_lora_r": 4, "policy_lora_alpha": 8,
                       "rm_max_tokens": 64, "max_prompt_tokens": 32, "max_response_tokens": 16,
                       "device": "cpu", "dtype": "float32", "bf16": False}}
    if processes > 1:
        spec["resources"] = {"processes": processes}
    return spec


def test_meta_train_over_two_processes_publishes_one_version(
    jobs: JobHarness, still_encoder: Path, tiny_policy: Path
) -> None:
    """The precomputed hypergradient over 2 processes: the job succeeds, its ranks are recorded
    and gone after, and rank 0 publishes exactly one RM version, whose numbers are the
    one-process job's (META_TOLERANCE, as in tests/training/oodpl/test_launch_oodpl.py)."""
    _meta_data(jobs.data_dir)
    worker = jobs.start_worker()
    submitted = jobs.client.submit("meta_train", _meta_spec(still_encoder, tiny_policy,
                                                            "meta-two", 2))
    assert (submitted["processes"], submitted["queue"]) == (2, "multi")
    one = jobs.client.submit("meta_train", _meta_spec(still_encoder, tiny_policy, "meta-one"))
    done_two = jobs.wait_status(submitted["id"], FINAL, 300, worker)
    done_one = jobs.wait_status(one["id"], FINAL, 300, worker)
    assert done_two["status"] == done_one["status"] == "succeeded", done_two["error"]

    attempt = done_two["attempts"][0]
    assert attempt["processes"] == 2 and [r["rank"] for r in attempt["ranks"]] == [0, 1]
    pids = [r["pid"] for r in attempt["ranks"]]
    wait_for(lambda: not any(_alive(p) for p in pids), 60, "the ranks outlived their job", worker)
    assert _versions(jobs, "meta-two") == ["v1"]
    version = Registry.from_artifacts(jobs.artifacts).resolve("meta-two")
    assert (version.metadata["algorithm"], version.metadata["job_id"]) == (
        "ood-pl-meta-train", submitted["id"])
    assert version.metadata["resources"] == {"processes": 2, "strategy": "ddp"}
    two, alone = done_two["metrics"], done_one["metrics"]
    assert two["hypergradient"] == "precomputed" and two["steps"] == 4
    for key in ("outer_loss", "initial_outer_loss"):
        assert two[key] == pytest.approx(alone[key], rel=META_TOLERANCE), key
    assert len(RewardModel.from_pretrained(version.path, device="cpu").score(
        [{"prompt": "how are you today?", "response": "good great nice"}])) == 1


def test_a_killed_rank_sends_the_job_back_and_it_resumes_from_the_checkpoint(
    jobs: JobHarness, still_encoder: Path
) -> None:
    worker = jobs.start_worker()
    steps = 300
    job_id = jobs.client.submit("train_rm", _spec(still_encoder, "rm-two", 2, max_steps=steps,
                                                  checkpoint_every=20))["id"]
    run_dir = jobs.artifacts / "jobs" / job_id
    first = wait_for(lambda: _ranks_running(jobs, job_id, 1), 300, "ranks not recorded", worker)
    first_pids = [r["pid"] for r in first["attempts"][0]["ranks"]]
    wait_for(lambda: latest_checkpoint_step(run_dir) >= 20, 300, "no checkpoint", worker,
             interval=0.01)
    os.kill(first_pids[1], signal.SIGKILL)  # rank 1 dies (as under the OOM killer)

    done = jobs.wait_status(job_id, FINAL, 300, worker)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 2, "the lost rank spent an attempt, as a dead worker does"
    lost, resumed = done["attempts"]
    assert "rank(s) [1] of 2" in lost["lost"], lost
    assert 20 <= resumed["resumed_from_step"] < steps
    assert resumed["processes"] == 2 and len(resumed["ranks"]) == 2
    assert not any(_alive(p) for p in first_pids), "rank 0 of the lost attempt was stopped too"
    assert _versions(jobs, "rm-two") == ["v1"]

    # the resumed run is the uninterrupted one: its curve is the one-process curve
    reference = jobs.client.submit("train_rm", _spec(still_encoder, "rm-one", max_steps=steps,
                                                     checkpoint_every=20))["id"]
    assert jobs.wait_status(reference, FINAL, 300, worker)["status"] == "succeeded"
    curve, expected = _curve(jobs, job_id), _curve(jobs, reference)
    assert len(curve) == len(expected) == steps
    assert max(abs(a - b) for a, b in zip(curve, expected, strict=True)) <= CURVE_TOLERANCE


def test_sigterm_hands_the_job_over_and_a_cancel_stops_every_rank(
    jobs: JobHarness, still_encoder: Path
) -> None:
    first = jobs.start_worker()
    job_id = jobs.client.submit("train_rm", _spec(still_encoder, "rm-two", 2, max_steps=100_000,
                                                  checkpoint_every=0))["id"]
    run_dir = jobs.artifacts / "jobs" / job_id
    wait_for(lambda: (r := _ranks_running(jobs, job_id, 1)) and r["progress"].get("step", 0) >= 5,
             300, "training did not start", first)
    first_pids = [r["pid"] for r in jobs.client.get(job_id)["attempts"][0]["ranks"]]
    first.stop()  # SIGTERM, as `docker compose stop` sends
    record = jobs.client.get(job_id)
    assert record["status"] == "queued" and record["attempt"] == 0, record
    stopped_at = latest_checkpoint_step(run_dir)
    assert stopped_at >= 5, "every rank stopped at one step boundary and rank 0 checkpointed"
    assert not any(_alive(p) for p in first_pids)
    assert jobs.client.gauges().processes == 0

    second = jobs.start_worker()
    wait_for(lambda: (r := _ranks_running(jobs, job_id, 2)) and
             r["progress"].get("step", 0) > stopped_at, 300, "not resumed", second)
    record = jobs.client.get(job_id)
    assert record["attempts"][-1]["resumed_from_step"] == stopped_at
    second_pids = [r["pid"] for r in record["attempts"][-1]["ranks"]]
    jobs.client.cancel(job_id)
    done = jobs.wait_status(job_id, FINAL, 120, second)
    assert done["status"] == "cancelled"
    assert done["artifacts"]["cancelled_at_step"] > stopped_at
    assert (Path(done["artifacts"]["checkpoint"]) / "MANIFEST.json").is_file()
    assert latest_checkpoint_step(run_dir) == done["artifacts"]["cancelled_at_step"]
    wait_for(lambda: not any(_alive(p) for p in second_pids), 60, "ranks outlived the cancel",
             second)
    assert _versions(jobs, "rm-two") == []


def test_kill_9_of_the_worker_leaves_no_rank_running(jobs: JobHarness, still_encoder: Path) -> None:
    """The launcher runs in a session of its own (out of reach of the worker's process group),
    so it and its ranks must die with the job process by themselves."""
    worker = jobs.start_worker()
    job_id = jobs.client.submit("train_rm", _spec(still_encoder, "rm-two", 2, max_steps=100_000,
                                                  checkpoint_every=0))["id"]
    record = wait_for(lambda: _ranks_running(jobs, job_id, 1), 300, "ranks not recorded", worker)
    pids = [r["pid"] for r in record["attempts"][0]["ranks"]]
    launcher = int(Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert launcher != worker.pid and _alive(launcher)
    worker.kill9()
    wait_for(lambda: not any(_alive(p) for p in [*pids, launcher]), 30,
             "the launcher or a rank outlived the killed worker")


def test_a_rank_that_raises_fails_the_job_at_once(jobs: JobHarness, still_encoder: Path,
                                                   tmp_path: Path) -> None:
    model = shutil.copytree(still_encoder, tmp_path / "damaged-later")
    job_id = jobs.client.submit("train_rm", _spec(model, "rm-two", 2, max_steps=10))["id"]
    (model / "config.json").write_text("{ not json")  # the ranks find it so when they load it
    worker = jobs.start_worker()
    done = jobs.wait_status(job_id, FINAL, 300, worker)
    assert done["status"] == "failed" and done["attempt"] == 1, "not retried: it would fail again"
    assert done["error"]["type"] == "RankFailed"
    assert "of 2 raised" in done["error"]["message"]
    assert _versions(jobs, "rm-two") == []


def test_metrics_count_the_processes_of_running_jobs(tmp_path: Path, redis_server,
                                                      tiny_encoder_rm: Path) -> None:
    harness = JobHarness(tmp_path, redis_server.url)
    write_tiny_preferences(harness.data_dir / "train.jsonl", 8, seed=0)
    try:
        with serving_production_rm(harness, tiny_encoder_rm) as url:
            spec = {"train_file": "train.jsonl", "model": "rm@v1",
                    "resources": {"processes": 3}, "params": {"device": "cpu"}}
            accepted = httpx.post(f"{url}/jobs", json={"kind": "train_rm", "spec": spec})
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["job_id"]
            store = harness.client.store
            assert store.claim(job_id, "token", 30, 3, "a-worker").outcome == "claimed"
            assert "generalrm_job_processes 3.0" in httpx.get(f"{url}/metrics").text
            store.finish_if_owner(job_id, "token", "succeeded")
            assert "generalrm_job_processes 0.0" in httpx.get(f"{url}/metrics").text
            refused = httpx.post(f"{url}/jobs", json={"kind": "train_rm", "spec": {
                **spec, "resources": {"processes": 2, "strategy": "fsdp"}}})
            assert refused.status_code == 422 and "fsdp needs GPUs" in refused.text
    finally:
        harness.close()
