"""Specs are validated at submission: a bad one is a SpecError saying what to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.worker.harness import write_tiny_preferences
from worker.client import JobClient, SpecError
from worker.settings import WorkerSettings as Settings


@pytest.fixture
def client(tmp_path: Path, tiny_encoder_rm: Path) -> JobClient:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_tiny_preferences(data / "train.jsonl", 8, seed=0)
    write_tiny_preferences(data / "sub" / "eval.jsonl", 4, seed=1)
    (data / "broken.jsonl").write_text('{"prompt": "p", "chosen": "c"}\n')
    (data / "not-json.jsonl").write_text("prompt,chosen,rejected\n")
    write_tiny_preferences(tmp_path / "outside.jsonl", 4, seed=2)
    # nothing listens on port 1: submission must fail on the spec before touching Redis
    settings = Settings(redis_url="redis://127.0.0.1:1/0", artifacts_dir=tmp_path / "artifacts",
                        data_dir=data)
    return JobClient(settings)


def _spec(tiny_encoder_rm: Path, **changes) -> dict:
    spec = {"train_file": "train.jsonl", "eval_file": "sub/eval.jsonl",
            "model": str(tiny_encoder_rm), "name": "rm", "params": {"max_steps": 3}}
    spec.update(changes)
    return {k: v for k, v in spec.items() if v is not ...}


def test_a_good_spec_gets_its_defaults(client: JobClient, tiny_encoder_rm: Path) -> None:
    spec = client.validate("train_rm", {"train_file": "train.jsonl"})
    assert spec == {"train_file": "train.jsonl", "eval_file": None, "model": "minilm",
                    "name": "rm", "params": {}, "resources": {"processes": 1, "strategy": "ddp"}}
    assert client.validate("train_rm", _spec(tiny_encoder_rm))["eval_file"] == "sub/eval.jsonl"


@pytest.mark.parametrize(
    ("kind", "changes", "says"),
    [
        ("train_rm_v2", {}, "unknown job kind"),
        ("sleep_steps", {}, "unknown job kind"),  # diagnostic kinds are off by default
        ("train_rm", {"epochs": 2}, "unknown spec key"),
        ("train_rm", {"train_file": ...}, "train_file: required"),
        ("train_rm", {"train_file": "missing.jsonl"}, "does not exist"),
        ("train_rm", {"train_file": "../outside.jsonl"}, "outside the data directory"),
        ("train_rm", {"train_file": "/etc/passwd"}, "outside the data directory"),
        ("train_rm", {"eval_file": "sub/../../outside.jsonl"}, "outside the data directory"),
        ("train_rm", {"train_file": "broken.jsonl"}, "line 1 of broken.jsonl: missing field 'rejected'"),
        ("train_rm", {"train_file": "not-json.jsonl"}, "line 1 of not-json.jsonl: invalid JSON"),
        ("train_rm", {"train_file": 3}, "train_file"),
        ("train_rm", {"params": {"max_step": 3}}, "max_step"),
        ("train_rm", {"params": {"learning_rate": "fast"}}, "learning_rate"),
        ("train_rm", {"params": {"batch_size": 0}}, "batch_size"),
        ("train_rm", {"params": {"output_dir": "/tmp/x"}}, "set by the spec"),
        ("train_rm", {"params": {"strength_file": "../outside.jsonl"}}, "outside the data"),
        ("train_rm", {"params": []}, "params"),
        ("train_rm", {"name": "../../etc"}, "name"),
        ("train_rm", {"model": "rm@v7"}, "model"),
        ("train_rm", {"model": "/no/such/model/dir"}, "not a directory"),
        ("train_rm", {"resources": {"processes": 0}}, "resources.processes"),
        ("train_rm", {"resources": {"processes": "2"}}, "resources.processes"),
        ("train_rm", {"resources": {"processes": 2, "gpus": 2}}, "resources.gpus"),
        ("train_rm", {"resources": {"processes": 9}}, "GENERALRM_JOB_MAX_PROCESSES=8"),
        ("train_rm", {"resources": {"processes": 2, "strategy": "zero3"}}, "resources.strategy"),
        ("train_rm", {"resources": {"processes": 2, "strategy": "fsdp"},
                      "params": {"device": "cpu"}}, "fsdp needs GPUs"),
        ("train_rm", {"resources": {"processes": 2, "strategy": "fsdp"},
                      "params": {"finetune": "lora"}}, "use strategy ddp with finetune lora"),
        ("train_rm", {"resources": {"processes": 2}, "params": {"simcse_weight": 0.1}},
         "SimCSE in one process"),
        ("train_rm", {"resources": {"processes": 4}, "params": {"batch_size": 2}},
         "batch_size of at least the number of processes"),
        ("strength", {"resources": {"processes": 2, "strategy": "fsdp"}, "name": ...,
                      "eval_file": ..., "params": {}}, "use strategy ddp"),
        ("metarm", {"resources": {"processes": 2}}, "unknown spec key"),
    ],
)
def test_bad_specs_raise_spec_error(client: JobClient, tiny_encoder_rm: Path,
                                    kind: str, changes: dict, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        client.submit(kind, _spec(tiny_encoder_rm, **changes))


def test_a_spec_must_be_an_object(client: JobClient) -> None:
    with pytest.raises(SpecError, match="JSON object"):
        client.submit("train_rm", ["train.jsonl"])
    assert issubclass(SpecError, ValueError)


def test_trl_formats_are_accepted_as_the_trainer_reads_them(client: JobClient, tmp_path: Path) -> None:
    user = {"role": "user", "content": "Name a colour."}
    rows = [{"chosen": [user, {"role": "assistant", "content": "Blue."}],  # implicit prompt
             "rejected": [user, {"role": "assistant", "content": "Seven."}], "margin": 0.5},
            {"prompt": [user], "chosen": [{"role": "assistant", "content": "Red."}],
             "rejected": [{"role": "assistant", "content": "Nine."}]}]
    (tmp_path / "data" / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert client.validate("train_rm", {"train_file": "trl.jsonl"})["train_file"] == "trl.jsonl"


def test_messages_name_the_data_directory_never_a_server_path(client: JobClient, tmp_path: Path) -> None:
    for spec in ({"train_file": "../outside.jsonl"}, {"train_file": "missing.jsonl"}):
        with pytest.raises(SpecError) as refused:
            client.validate("train_rm", spec)
        assert str(tmp_path) not in str(refused.value) and "data directory" in str(refused.value)


def test_a_multi_process_job_goes_to_the_multi_queue(jobs, tiny_encoder_rm: Path) -> None:
    """The record says how many processes the job runs on; its message waits in ``multi``,
    which only workers that see enough GPUs need consume."""
    write_tiny_preferences(jobs.data_dir / "train.jsonl", 8, seed=0)
    spec = {"train_file": "train.jsonl", "model": str(tiny_encoder_rm),
            "params": {"batch_size": 4, "device": "cpu"}}
    one = jobs.client.submit("train_rm", spec)
    two = jobs.client.submit("train_rm", {**spec, "resources": {"processes": 2}})
    assert (one["queue"], one["processes"]) == ("train", 1)
    assert (two["queue"], two["processes"]) == ("multi", 2)
    assert jobs.client.get(two["id"])["spec"]["resources"] == {"processes": 2, "strategy": "ddp"}
    assert jobs.client.queue_depths() == {"train": 1, "adapt": 0, "multi": 1}
