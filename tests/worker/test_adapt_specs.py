"""Specs of meta_train, metarm and adapt are validated at submission (no worker, no Redis):
a bad one is a SpecError naming the problem, a good one gets its defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.worker.harness import write_tiny_preferences
from training.registry import Registry
from worker.client import JobClient, SpecError
from worker.jobs.adapt import registry_name
from worker.kinds import KINDS
from worker.settings import WorkerSettings as Settings


def _write_samples(path: Path, domains: list[str], k: int = 3) -> Path:
    rows = [{"prompt": f"how are you today? ({d} {i})", "domain": d,
             "responses": ["good great nice", "bad awful sad", "happy love"][:k]}
            for d in domains for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _with_domain(path: Path, domains: list[str]) -> Path:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["domain"] = domains[i % len(domains)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def client(tmp_path: Path, tiny_encoder_rm: Path, tiny_policy: Path) -> JobClient:
    data = tmp_path / "data"
    data.mkdir()
    _with_domain(write_tiny_preferences(data / "pairs.jsonl", 8, seed=0), ["a", "b"])
    _write_samples(data / "samples.jsonl", ["a", "b"])
    _write_samples(data / "other-domains.jsonl", ["c"])
    _write_samples(data / "one-response.jsonl", ["a"], k=1)
    (data / "prompts.jsonl").write_text('{"prompt": "hello, how are you?"}\n{"prompt": "hi"}\n')
    (data / "no-prompt.jsonl").write_text('{"text": "hello"}\n')
    write_tiny_preferences(tmp_path / "outside.jsonl", 4, seed=2)
    artifacts = tmp_path / "artifacts"
    Registry.from_artifacts(artifacts).publish("rm", tiny_encoder_rm, {"kind": "reward_model"})
    # nothing listens on port 1: validation must not need Redis
    return JobClient(Settings(redis_url="redis://127.0.0.1:1/0", artifacts_dir=artifacts,
                              data_dir=data))


@pytest.fixture
def adapt_spec(tiny_policy: Path) -> dict:
    return {"domain": "Cooking & Food!", "prompts": ["how are you today?"],
            "policy": str(tiny_policy), "reward_model": "rm@v1",
            "params": {"steps": 2, "responses_per_prompt": 2}}


def test_kinds_and_queues() -> None:
    assert {k: KINDS[k].queue for k in ("meta_train", "metarm", "adapt")} == {
        "meta_train": "train", "metarm": "train", "adapt": "adapt"}


def test_the_bundled_benchmark_is_found_from_any_working_directory(
        client: JobClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no benchdata/ below here: found through the installed package
    assert client.validate("meta_train", {"task": "ka"})["task"] == "ka"


def test_renamed_metarm_keys_are_accepted_and_reported(client: JobClient, adapt_spec: dict) -> None:
    old = {**adapt_spec, "params": {"metarm": {"pairs_path": "pairs.jsonl", "lr": 1e-4}}}
    assert client.validate("adapt", old)["params"]["metarm"]["pairs_path"] == "pairs.jsonl"
    said = client.deprecations("adapt", old)
    assert any("'pairs_path' is deprecated, use 'pairs_file'" in m for m in said)
    assert any("'lr' is deprecated, use 'learning_rate'" in m for m in said)
    assert client.deprecations("adapt", adapt_spec) == []


def test_registry_name_sanitises_the_domain() -> None:
    assert registry_name("policy", "Cooking & Food!") == "policy-Cooking-Food"
    assert registry_name("policy", "a/b/../c") == "policy-a-b-..-c"
    assert registry_name("policy", "***") == "policy"
    assert len(registry_name("policy", "x" * 500)) == 128


def test_adapt_defaults(client: JobClient, adapt_spec: dict) -> None:
    spec = client.validate("adapt", adapt_spec)
    assert spec["name"] == "policy-Cooking-Food"
    assert spec["rm_name"] is None
    with_metarm = {**adapt_spec, "params": {**adapt_spec["params"],
                                            "metarm": {"pairs_file": "pairs.jsonl", "rounds": 1}}}
    spec = client.validate("adapt", with_metarm)
    assert (spec["name"], spec["rm_name"]) == ("policy-Cooking-Food", "rm-Cooking-Food")
    spec = client.validate("adapt", {**adapt_spec, "prompts": None, "dataset": "prompts.jsonl"})
    assert spec["dataset"] == "prompts.jsonl"
    given = {**adapt_spec, "prompts": None, "dataset": "samples.jsonl",
             "params": {"steps": 2, "use_given_responses": True}}
    assert client.validate("adapt", given)["params"]["use_given_responses"] is True
    held = {**adapt_spec, "params": {**adapt_spec["params"], "eval_holdout": 0.5}}
    assert client.validate("adapt", held)["params"]["eval_holdout"] == 0.5


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"domain": None}, "domain: required"),
        ({"domain": "  "}, "domain: required"),
        ({"prompts": None}, "one of them is required"),
        ({"dataset": "prompts.jsonl"}, "not both"),
        ({"prompts": []}, "prompts: must be a non-empty list"),
        ({"prompts": ["ok", ""]}, "prompts: every prompt"),
        ({"prompts": None, "dataset": "../outside.jsonl"}, "dataset: .*outside the data directory"),
        ({"prompts": None, "dataset": "missing.jsonl"}, "dataset: .*does not exist"),
        ({"prompts": None, "dataset": "no-prompt.jsonl"}, "dataset: .*'prompt'"),
        ({"pairs": "/etc/passwd"}, "pairs: .*outside the data directory"),
        ({"pairs": "samples.jsonl"}, "pairs: line 1 of samples.jsonl: missing field 'chosen'"),
        ({"reward_model": "nosuch:production"}, "reward_model: "),
        ({"reward_model": "rm@v7"}, "reward_model: "),
        ({"policy": "/no/such/policy/dir"}, "policy: .*not a directory"),
        ({"name": "bad name!"}, "name: "),
        ({"name": "rm"}, "name: 'rm' holds reward_model versions"),
        ({"rm_name": "rm-x"}, "rm_name: only with params.metarm"),
        ({"epochs": 3}, "unknown spec key"),
        ({"params": {"stepz": 3}}, "stepz"),
        ({"params": {"steps": 0}}, "steps"),
        ({"params": {"responses_per_prompt": 1}}, "responses_per_prompt"),
        ({"params": {"eval_holdout": 1.0}}, "eval_holdout"),
        ({"params": {"eval_holdout": -0.1}}, "eval_holdout"),
        ({"params": {"eval_holdout": "some"}}, "eval_holdout"),
        ({"params": {"output_dir": "/tmp/x"}}, "set by the spec"),
        ({"params": {"bench_root": "/etc"}}, "set by the spec"),
        ({"params": {"prompts": ["x"]}}, "set by the spec"),
        ({"params": {"metarm": {"rounds": 1}}}, "params.metarm.pairs_file: required"),
        ({"params": {"metarm": {"pairs_file": "../outside.jsonl"}}},
         "params.metarm.pairs_file: .*outside the data directory"),
        ({"params": {"metarm": {"pairs_file": "samples.jsonl"}}},
         "params.metarm.pairs_file: line 1 of samples.jsonl: missing field"),
        ({"params": {"metarm": {"pairs_file": "pairs.jsonl", "rounds": 0}}}, "rounds"),
        ({"params": {"metarm": {"pairs_file": "pairs.jsonl", "meta_lrr": 1}}}, "meta_lrr"),
        ({"params": {"metarm": {"pairs_file": "pairs.jsonl", "samples_file": "x"}}},
         "samples_file"),
        ({"params": {"metarm": "yes"}}, "params.metarm: must be an object"),
        ({"params": {"metarm": {"pairs_file": "pairs.jsonl", "max_meta_prompts": "3"}}},
         "max_meta_prompts: Input should be a valid integer"),
        ({"params": {"metarm": {"pairs_file": "pairs.jsonl", "max_meta_prompts": 2.5}}},
         "max_meta_prompts: Input should be a valid integer"),
        ({"params": {"metarm": {"pairs_file": "pairs.jsonl", "rounds": "2"}}},
         "rounds: Input should be a valid integer"),
        ({"params": {"use_given_responses": True}}, "use_given_responses: inline prompts"),
        ({"prompts": None, "dataset": "prompts.jsonl", "params": {"use_given_responses": True}},
         "dataset: line 1 .*'responses' must be"),
        ({"prompts": None, "dataset": "one-response.jsonl", "params": {"use_given_responses": True}},
         "use_given_responses: row 1 of one-response.jsonl has fewer than 2"),
    ],
)
def test_adapt_spec_errors(client: JobClient, adapt_spec: dict, changes: dict, says: str) -> None:
    spec = {**adapt_spec, **changes}
    spec = {k: v for k, v in spec.items() if not (k in changes and v is None)}
    with pytest.raises(SpecError, match=says):
        client.validate("adapt", spec)


def test_meta_train_defaults_and_task(client: JobClient, tiny_encoder_rm: Path,
                                      tiny_policy: Path) -> None:
    spec = client.validate("meta_train", {"samples_file": "samples.jsonl",
                                          "pairs_file": "pairs.jsonl"})
    assert spec == {"reward_model": "minilm", "policy": "smollm2-135m", "name": "rm",
                    "params": {}, "samples_file": "samples.jsonl", "pairs_file": "pairs.jsonl",
                    "task": None, "resources": {"processes": 1, "strategy": "ddp"}}
    spec = client.validate("meta_train", {"task": "csg", "reward_model": "rm:latest",
                                          "policy": str(tiny_policy),
                                          "params": {"domains": ["art"], "outer_steps": 2}})
    assert spec["task"] == "csg"
    # over several processes: precomputed (the default) and first_order; 4 prompts for 4
    for params in ({}, {"hypergradient": "first_order", "inner_steps": 2}):
        spec = client.validate("meta_train", {"task": "csg", "resources": {"processes": 4},
                                              "params": params})
        assert spec["resources"] == {"processes": 4, "strategy": "ddp"}


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({}, "samples_file and pairs_file: both required"),
        ({"samples_file": "samples.jsonl"}, "both required"),
        ({"task": "csg", "samples_file": "samples.jsonl", "pairs_file": "pairs.jsonl"}, "not both"),
        ({"task": "imdb"}, "task: must be one of"),
        ({"task": "csg", "params": {"bench_root": "/tmp"}}, "set by the spec"),
        ({"task": "csg", "params": {"domains": ["art", "nosuch"]}}, "nosuch"),
        ({"samples_file": "../outside.jsonl", "pairs_file": "pairs.jsonl"}, "outside"),
        ({"samples_file": "prompts.jsonl", "pairs_file": "pairs.jsonl"}, "responses"),
        ({"samples_file": "other-domains.jsonl", "pairs_file": "pairs.jsonl"}, "no 'domain'"),
        ({"task": "csg", "reward_model": "rm@v9"}, "reward_model: "),
        ({"task": "csg", "params": {"outer_stepz": 1}}, "outer_stepz"),
        ({"task": "csg", "params": {"inner_steps": 0}}, "inner_steps"),
        ({"task": "csg", "name": "../x"}, "name: "),
        ({"task": "csg", "resources": {"processes": 9}}, "GENERALRM_JOB_MAX_PROCESSES=8"),
        ({"task": "csg", "resources": {"processes": 2}, "params": {"hypergradient": "exact"}},
         "hypergradient exact differentiates through the unrolled inner loop"),
        ({"task": "csg", "resources": {"processes": 2, "strategy": "fsdp"},
          "params": {"device": "cpu"}}, "fsdp needs GPUs"),
        ({"task": "csg", "resources": {"processes": 2, "strategy": "fsdp"}},
         "meta_train keeps a whole replica of its models on every process"),
        ({"task": "csg", "resources": {"processes": 4}, "params": {"inner_batch_prompts": 3}},
         "params.inner_batch_prompts is 3"),
        ({"task": "csg", "resources": {"processes": 4},
          "params": {"inner_steps": 2, "outer_batch_pairs": 2}}, "params.outer_batch_pairs is 2"),
        ({"task": "csg", "resources": {"processes": 4},
          "params": {"bt_weight": 0.5, "outer_batch_pairs": 2}}, "params.outer_batch_pairs is 2"),
    ],
)
def test_meta_train_spec_errors(client: JobClient, spec: dict, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        client.validate("meta_train", spec)


def test_metarm_defaults(client: JobClient) -> None:
    spec = client.validate("metarm", {"pairs_file": "pairs.jsonl", "samples_file": "samples.jsonl"})
    assert spec == {"model": "minilm", "name": "rm", "params": {}, "pairs_file": "pairs.jsonl",
                    "samples_file": "samples.jsonl"}
    # vanilla Bradley-Terry (meta_lr 0) needs no shifted samples
    client.validate("metarm", {"pairs_file": "pairs.jsonl", "params": {"meta_lr": 0.0}})


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"samples_file": "samples.jsonl"}, "pairs_file: required"),
        ({"pairs_file": "pairs.jsonl"}, "samples_file: required"),
        ({"pairs_file": "pairs.jsonl", "samples_file": "/etc/hosts"}, "outside"),
        ({"pairs_file": "pairs.jsonl", "samples_file": "one-response.jsonl"}, ">= 2 responses"),
        ({"pairs_file": "pairs.jsonl", "samples_file": "samples.jsonl", "model": "rm@v3"}, "model: "),
        ({"pairs_file": "pairs.jsonl", "samples_file": "samples.jsonl",
          "params": {"samples_path": "x"}}, "set by the spec"),
        ({"pairs_file": "pairs.jsonl", "samples_file": "samples.jsonl",
          "params": {"meta_lr": -1}}, "meta_lr"),
        ({"pairs_file": "pairs.jsonl", "samples_file": "samples.jsonl",
          "params": {"nonsense": 1}}, "nonsense"),
    ],
)
def test_metarm_spec_errors(client: JobClient, spec: dict, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        client.validate("metarm", spec)
