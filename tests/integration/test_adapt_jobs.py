"""OOD-PL and MetaRM job kinds end to end: the real HTTP app, real Redis, a real worker
process, tiny real models. POST /adapt (with and without MetaRM rounds), and the
``metarm`` and ``meta_train`` kinds through POST /jobs; bad requests are 422s that say why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.stack import serving_production_rm
from tests.worker.harness import JobHarness, wait_for, write_tiny_preferences
from training.registry import Registry

pytestmark = pytest.mark.integration

PROMPTS = ["how are you today?", "what does this word mean?", "hello, how are you?"]
TINY_ADAPT = {  # a few seconds of compute on the tiny models
    "steps": 2, "responses_per_prompt": 2, "max_new_tokens": 4, "batch_prompts": 2,
    "sample_batch_size": 8, "eval_prompts": 2, "eval_responses_per_prompt": 2, "eval_pairs": 6,
    "lora_r": 4, "lora_alpha": 8, "max_prompt_tokens": 32, "max_response_tokens": 16,
    "rm_max_tokens": 64, "learning_rate": 1e-2, "device": "cpu",
}
TINY_METARM = {"meta_lr": 1e-2, "lr": 1e-3, "responses_per_prompt": 2, "batch_size": 4,
               "meta_batch_size": 2, "max_steps": 2, "max_input_tokens": 64,
               "max_diagnostic_pairs": 8, "max_diagnostic_prompts": 4, "device": "cpu"}
FINISHED = {"succeeded", "failed", "cancelled"}


def _samples(path: Path, domains: list[str], k: int = 3) -> Path:
    responses = ["good great nice", "bad awful sad", "happy love wonderful", "poor hate"]
    rows = [{"prompt": prompt, "domain": d, "responses": responses[i: i + k]}
            for d in domains for i, prompt in enumerate(PROMPTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs_with_domains(path: Path, n: int, seed: int, domains: list[str]) -> Path:
    write_tiny_preferences(path, n, seed)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "domain": domains[i % len(domains)]}) + "\n"
                            for i, r in enumerate(rows)))
    return path


@pytest.fixture
def stack(tmp_path: Path, redis_server, tiny_encoder_rm: Path) -> Iterator[tuple[JobHarness, str]]:
    """API + (per test) worker on one Redis, artifacts and data dir; the API serves
    ``rm:production`` = ``rm@v1``, the untrained tiny encoder."""
    harness = JobHarness(tmp_path, redis_server.url)
    write_tiny_preferences(harness.data_dir / "cooking.pairs.jsonl", 6, seed=1)
    _pairs_with_domains(harness.data_dir / "source.pairs.jsonl", 12, 2, ["greetings", "words"])
    _samples(harness.data_dir / "source.samples.jsonl", ["greetings", "words"])
    _samples(harness.data_dir / "shifted.samples.jsonl", ["cooking"])
    (harness.data_dir / "cooking.prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    with serving_production_rm(harness, tiny_encoder_rm, model_poll_seconds=0.5) as url:
        yield harness, url
    harness.close()


def _run(url: str, path: str, body: dict, worker, timeout: float = 300) -> dict:
    submitted = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]

    def finished():
        record = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        return record if record["status"] in FINISHED else None

    record = wait_for(finished, timeout, f"job {job_id} did not finish", worker, interval=0.2)
    assert record["status"] == "succeeded", (record["error"], worker.log()[-3000:])
    return record


def _listed(url: str, name: str) -> dict:
    models = httpx.get(f"{url}/models", timeout=30).json()["models"]
    (model,) = [m for m in models if m["name"] == name]
    return model


def test_adapt_over_http_publishes_a_policy(stack, tiny_policy: Path) -> None:
    harness, url = stack
    worker = harness.start_worker()
    record = _run(url, "/adapt", {
        "domain": "Cooking", "prompts": PROMPTS, "pairs": "cooking.pairs.jsonl",
        "policy": str(tiny_policy), "params": TINY_ADAPT,
    }, worker)
    assert record["kind"] == "adapt"
    assert record["spec"]["reward_model"] == "rm@v1"  # the served RM, pinned to its version
    assert record["artifacts"]["model"] == "policy-Cooking@v1"
    metrics = record["metrics"]
    for key in ("reward_before", "reward_after", "kl_to_reference", "pl_accuracy_before",
                "pl_accuracy_after", "pl_margin_improved", "train_reward_before",
                "train_reward_after", "train_kl_to_reference"):
        assert isinstance(metrics[key], float), key
    assert 0.0 <= metrics["pl_accuracy_after"] <= 1.0 and metrics["kl_to_reference"] > -1e-3
    assert 0.0 <= metrics["pl_margin_improved"] <= 1.0
    assert metrics["num_prompts"] == len(PROMPTS) and metrics["steps"] == 2
    # the default eval_holdout (0.2) holds one of the three prompts out of training
    assert (metrics["heldout_prompts"], metrics["train_prompts"]) == (1, 2)

    listed = _listed(url, "policy-Cooking")
    assert listed["kind"] == "policy" and listed["aliases"] == {"latest": "v1"}
    (version,) = listed["versions"]
    meta = version["metadata"]
    assert meta["kind"] == "policy" and meta["algorithm"] == "ood-pl-adapt"
    assert (meta["base_model"], meta["reward_model"], meta["domain"], meta["job_id"]) == (
        str(tiny_policy), "rm@v1", "Cooking", record["id"])
    assert meta["data_fingerprint"].startswith("sha256:")
    assert meta["metrics"]["reward_after"] == metrics["reward_after"]
    assert httpx.get(f"{url}/models", timeout=30).json()["served"] == "rm@v1"  # RM untouched

    # the published policy loads and generates
    from training.policy import Policy

    policy = Policy.from_pretrained(version["path"], device="cpu", max_prompt_tokens=32,
                                    max_response_tokens=8)
    (samples,) = policy.sample(PROMPTS[:1], 2, max_new_tokens=3, seed=0)
    assert len(samples) == 2 and all(isinstance(s, str) for s in samples)


def test_adapt_with_metarm_rounds_publishes_policy_and_rm(stack, tiny_policy: Path) -> None:
    harness, url = stack
    worker = harness.start_worker()
    record = _run(url, "/adapt", {
        "domain": "cooking", "dataset": "cooking.prompts.jsonl", "policy": str(tiny_policy),
        "reward_model": "rm:production",
        "params": {**TINY_ADAPT, "metarm": {**TINY_METARM, "pairs_file": "source.pairs.jsonl",
                                            "rounds": 2}},
    }, worker)
    assert record["artifacts"]["policy"] == "policy-cooking@v1"
    assert record["artifacts"]["reward_model"] == "rm-cooking@v1"
    metrics = record["metrics"]
    assert metrics["rounds"] == 2 and [r["round"] for r in metrics["by_round"]] == [1, 2]
    assert metrics["rm_shifted_diff_var_after_by_round"] == [
        r["rm_shifted_diff_var_after"] for r in metrics["by_round"]]
    assert all(v > 0 for v in metrics["rm_shifted_diff_var_after_by_round"])  # no collapse to 0
    assert isinstance(metrics["reward_after"], float)
    assert 0.0 <= metrics["rm_source_accuracy_after"] <= 1.0

    rm = _listed(url, "rm-cooking")
    (rm_version,) = rm["versions"]
    rm_meta = rm_version["metadata"]
    assert rm["kind"] == "reward_model" and rm_meta["algorithm"] == "metarm"
    assert (rm_meta["parent_version"], rm_meta["domain"], rm_meta["job_id"]) == (
        "rm@v1", "cooking", record["id"])
    assert [d["round"] for d in rm_meta["diagnostics_by_round"]] == [1, 2]
    # every round's diagnostics, in the registry as in the job's metrics
    for stored, measured in zip(rm_meta["diagnostics_by_round"], metrics["by_round"], strict=True):
        for name in ("shifted_diff_mean", "shifted_diff_var", "source_accuracy"):
            for when in ("before", "after"):
                key = f"{name}_{when}"
                assert isinstance(stored[key], float) and stored[key] == measured[f"rm_{key}"], key
        assert 0.0 <= stored["source_accuracy_after"] <= 1.0
    assert set(rm_meta["reward_stats"]) == {"mean", "std"}

    policy = _listed(url, "policy-cooking")
    (version,) = policy["versions"]
    assert version["metadata"]["reward_model"] == "rm-cooking@v1"  # lineage: the adapted RM
    assert version["metadata"]["algorithm"] == "ood-pl-adapt+metarm"
    assert version["metadata"]["reward_model_base_version"] == "rm@v1"
    # the served RM's model is untouched: the domain-adapted RM is a model of its own
    assert [v["version"] for v in _listed(url, "rm")["versions"]] == ["v1"]

    # a re-run of the finished job (a worker died before recording success) publishes nothing
    from training.callbacks import NullCallback
    from worker.jobs import adapt
    from worker.specs import JobContext

    registry = Registry.from_artifacts(harness.artifacts)
    again = adapt.run(JobContext(
        job_id=record["id"], spec=record["spec"], run_dir=harness.artifacts / "jobs" / record["id"],
        settings=harness.settings, callback=NullCallback(), attempt=2, registry=registry))
    assert (again.artifacts["policy"], again.artifacts["reward_model"]) == (
        "policy-cooking@v1", "rm-cooking@v1")
    assert [v.version for v in registry.versions("policy-cooking")] == ["v1"]
    assert [v.version for v in registry.versions("rm-cooking")] == ["v1"]

    # the domain-adapted RM loads and scores
    from training.reward_model import RewardModel

    adapted = RewardModel.from_pretrained(rm_version["path"], device="cpu", max_input_tokens=64)
    (reward,) = adapted.score([{"prompt": PROMPTS[0], "response": "good great nice"}])
    assert isinstance(reward, float)


def test_metarm_job_publishes_an_rm_version_with_diagnostics(stack) -> None:
    harness, url = stack
    worker = harness.start_worker()
    record = _run(url, "/jobs", {"kind": "metarm", "spec": {
        "model": "rm@v1", "pairs_file": "source.pairs.jsonl",
        "samples_file": "shifted.samples.jsonl", "params": TINY_METARM,
    }}, worker)
    assert record["artifacts"]["model"] == "rm@v2"
    metrics = record["metrics"]
    assert metrics["steps"] == 2
    for key in ("shifted_diff_var_before", "shifted_diff_var_after", "source_accuracy_after"):
        assert isinstance(metrics[key], float), key
    (v2,) = [v for v in _listed(url, "rm")["versions"] if v["version"] == "v2"]
    meta = v2["metadata"]
    assert (meta["algorithm"], meta["parent_version"], meta["job_id"]) == (
        "metarm", "rm@v1", record["id"])
    assert meta["diagnostics"]["after"]["shifted_diff_var"] == metrics["shifted_diff_var_after"]
    assert meta["reward_stats"]["std"] > 0
    # promoted, it serves normalized rewards from the statistics stored with it
    promoted = httpx.post(f"{url}/models/rm/aliases/production", json={"version": "v2"}, timeout=30)
    assert promoted.status_code == 200, promoted.text

    def normalized():
        response = httpx.post(f"{url}/score", timeout=60, json={"normalize": True, "items": [
            {"prompt": PROMPTS[0], "response": "good great nice"}]})
        return response if response.json().get("model") == "rm@v2" else None

    assert wait_for(normalized, 60, "rm@v2 was not served").status_code == 200


def test_meta_train_job_publishes_an_rm_version(stack, tiny_policy: Path) -> None:
    harness, url = stack
    worker = harness.start_worker()
    record = _run(url, "/jobs", {"kind": "meta_train", "spec": {
        "reward_model": "rm@v1", "policy": str(tiny_policy), "name": "meta-rm",
        "samples_file": "source.samples.jsonl", "pairs_file": "source.pairs.jsonl",
        "params": {"outer_steps": 2, "inner_steps": 1, "responses_per_prompt": 2,
                   "inner_batch_prompts": 2, "outer_batch_pairs": 2, "eval_pairs": 2,
                   "policy_lora_r": 4, "policy_lora_alpha": 8, "rm_max_tokens": 64,
                   "max_prompt_tokens": 32, "max_response_tokens": 16, "device": "cpu"},
    }}, worker)
    assert record["artifacts"]["model"] == "meta-rm@v1"
    metrics = record["metrics"]
    assert metrics["steps"] == 2 and 0.0 <= metrics["outer_pl_accuracy"] <= 1.0
    listed = _listed(url, "meta-rm")
    meta = listed["versions"][0]["metadata"]
    assert (meta["kind"], meta["algorithm"], meta["parent_version"], meta["job_id"]) == (
        "reward_model", "ood-pl-meta-train", "rm@v1", record["id"])
    assert sorted(meta["domains"]) == ["greetings", "words"]
    assert meta["data_fingerprint"].startswith("sha256:")
    assert set(meta["reward_stats"]) == {"mean", "std"}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"domain": "x"}, "prompts"),
        ({"domain": "x", "prompts": PROMPTS, "dataset": "cooking.prompts.jsonl"}, "not both"),
        ({"domain": "x", "prompts": PROMPTS, "params": {"stepz": 2}}, "stepz"),
        ({"domain": "x", "prompts": PROMPTS, "params": {"eval_holdout": 1.5}}, "eval_holdout"),
        ({"domain": "x", "dataset": "../../etc/passwd"}, "outside the data directory"),
        ({"domain": "x", "prompts": PROMPTS, "reward_model": "nosuch:production"}, "reward_model"),
        ({"domain": "x", "prompts": PROMPTS, "params": {"metarm": {"rounds": 1}}},
         "params.metarm.pairs_file: required"),
        ({"domain": "x", "prompts": PROMPTS, "params": {"metarm": {"pairs_file": "../x.jsonl"}}},
         "outside the data directory"),
        ({"prompts": PROMPTS}, "domain"),
    ],
)
def test_bad_adapt_requests_are_422(stack, body: dict, says: str) -> None:
    harness, url = stack
    response = httpx.post(f"{url}/adapt", json=body, timeout=30)
    assert response.status_code == 422, response.text
    assert says in response.json()["error"]["message"]
    assert harness.client.list() == []  # nothing was queued


def test_bad_job_specs_are_422(stack) -> None:
    _, url = stack
    for kind, spec, says in [
        ("meta_train", {"task": "imdb"}, "task: must be one of"),
        ("meta_train", {"samples_file": "source.samples.jsonl"}, "both required"),
        ("metarm", {"pairs_file": "source.pairs.jsonl"}, "samples_file: required"),
        ("metarm", {"pairs_file": "/etc/hosts", "samples_file": "shifted.samples.jsonl"},
         "outside the data directory"),
    ]:
        response = httpx.post(f"{url}/jobs", json={"kind": kind, "spec": spec}, timeout=30)
        assert response.status_code == 422, response.text
        assert says in response.json()["error"]["message"], (kind, spec)
