"""The Secrets-II job kinds through a real worker: strength, then train_rm that uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.worker.harness import JobHarness, write_tiny_preferences
from worker.specs import SpecError

pytestmark = pytest.mark.integration


def _plant_flips(path: Path, every: int) -> list[bool]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    planted = []
    for i, row in enumerate(rows):
        flip = i % every == 0
        if flip:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        row["flipped"] = flip
        planted.append(flip)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return planted


def test_strength_job_then_train_rm_with_flip_and_adaptive_margin(
    tmp_path: Path, redis_server, tiny_encoder_rm: Path
) -> None:
    jobs = JobHarness(tmp_path, redis_server.url)
    try:
        train = write_tiny_preferences(jobs.data_dir / "noisy.jsonl", 40, seed=3)
        planted = _plant_flips(train, every=5)
        write_tiny_preferences(jobs.data_dir / "eval.jsonl", 16, seed=4)
        worker = jobs.start_worker()
        common = {"batch_size": 4, "max_length": 32, "learning_rate": 1e-3, "device": "cpu"}
        record = jobs.client.submit("strength", {
            "train_file": "noisy.jsonl", "model": str(tiny_encoder_rm),
            "params": {"num_models": 2, "epochs": 3, "trainer_options": {"warmup_ratio": 0.0}, **{
                k: v for k, v in common.items() if k != "max_length"}, "max_length": 32},
        })
        done = jobs.wait_status(record["id"], {"succeeded", "failed", "cancelled"}, 300, worker)
        assert done["status"] == "succeeded", done["error"]
        strength_file = jobs.data_dir / done["artifacts"]["strength_file"]
        rows = [json.loads(line) for line in strength_file.read_text().splitlines()]
        assert len(rows) == len(planted) and all(len(r["diffs"]) == 2 for r in rows)
        assert 0.0 <= done["metrics"]["share_mu_negative"] <= 1.0
        assert Path(done["artifacts"]["summary_png"]).stat().st_size > 0

        record = jobs.client.submit("train_rm", {
            "train_file": "noisy.jsonl", "eval_file": "eval.jsonl", "model": str(tiny_encoder_rm),
            "name": "denoised", "params": {**common, "max_steps": 20, "warmup_ratio": 0.0,
                                           "flip": "fraction", "flip_fraction": 0.2,
                                           "margin": "adaptive", "label_smoothing": 0.05},
        })
        done = jobs.wait_status(record["id"], {"succeeded", "failed", "cancelled"}, 300, worker)
        assert done["status"] == "succeeded", done["error"]
        assert done["metrics"]["flipped_pairs"] == 8
        assert done["artifacts"]["model"] == "denoised@v1"
    finally:
        jobs.close()


def test_strength_spec_errors_name_the_problem(tmp_path: Path, redis_server) -> None:
    jobs = JobHarness(tmp_path, redis_server.url)
    try:
        write_tiny_preferences(jobs.data_dir / "p.jsonl", 4, seed=0)
        for spec, fragment in [
            ({}, "train_file"),
            ({"train_file": "p.jsonl", "params": {"num_models": 1}}, "num_models"),
            ({"train_file": "p.jsonl", "output_file": "../out.jsonl"}, "outside"),
            ({"train_file": "p.jsonl", "params": {"output_dir": "/tmp"}}, "output_dir"),
        ]:
            with pytest.raises(SpecError, match=fragment):
                jobs.client.submit("strength", spec)
    finally:
        jobs.close()
