"""The evaluate job kind through a real worker: a RewardBench-format file, a registry model
(results stored with its version) and a local directory (results in the job only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.training.test_rewardbench import SAMPLE, expected_accuracy
from tests.worker.harness import JobHarness
from training.registry import Registry
from training.rewardbench import section_scores
from worker.specs import SpecError

pytestmark = pytest.mark.integration
FINAL = {"succeeded", "failed", "cancelled"}


def test_evaluate_a_registry_version_and_a_local_model(tmp_path: Path, redis_server,
                                                       tiny_encoder_rm: Path) -> None:
    jobs = JobHarness(tmp_path, redis_server.url)
    try:
        shutil.copy(SAMPLE, jobs.data_dir / "rewardbench.jsonl")
        registry = Registry.from_artifacts(jobs.artifacts)
        registry.publish("rm", tiny_encoder_rm, {"kind": "reward_model", "algorithm": "none"})
        worker = jobs.start_worker()
        spec = {"eval_file": "rewardbench.jsonl", "model": "rm@v1",
                "params": {"max_length": 64, "batch_size": 8}}
        record = jobs.client.submit("evaluate", spec)
        done = jobs.wait_status(record["id"], FINAL, 300, worker)
        assert done["status"] == "succeeded", done["error"]
        assert done["finished_at"] is not None and done["finished_at"] >= done["created_at"]

        expected, _ = expected_accuracy(tiny_encoder_rm)
        metrics = done["metrics"]
        assert metrics["accuracy_by_subset"] == pytest.approx(expected)
        assert metrics["rewardbench_sections"] == pytest.approx(section_scores(expected))
        assert done["artifacts"]["evaluation_stored_with"] == "rm@v1"
        assert Path(done["artifacts"]["scores_file"]).is_file()

        (entry,) = registry.get("rm", "v1").metadata["evaluations"]
        assert entry["job_id"] == record["id"] and entry["eval_file"] == "rewardbench.jsonl"
        assert entry["data_fingerprint"].startswith("sha256:")
        assert entry["rewardbench_score"] == pytest.approx(metrics["rewardbench_score"])
        assert registry.get("rm", "v1").metadata["algorithm"] == "none"  # the rest is untouched

        local = jobs.client.submit("evaluate", {**spec, "model": str(tiny_encoder_rm)})
        done = jobs.wait_status(local["id"], FINAL, 300, worker)
        assert done["status"] == "succeeded", done["error"]
        assert done["metrics"]["accuracy"] == pytest.approx(metrics["accuracy"])
        assert "evaluation_stored_with" not in done["artifacts"]
        assert len(registry.get("rm", "v1").metadata["evaluations"]) == 1
    finally:
        jobs.close()


def test_evaluate_specs_are_checked_at_submission(tmp_path: Path, redis_server) -> None:
    jobs = JobHarness(tmp_path, redis_server.url)
    try:
        (jobs.data_dir / "bad.jsonl").write_text(
            json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
            + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
        shutil.copy(SAMPLE, jobs.data_dir / "good.jsonl")
        for spec, fragment in [
            ({"model": "minilm"}, "eval_file"),
            ({"eval_file": "bad.jsonl", "model": "minilm"}, "line 2 of bad.jsonl: missing field 'rejected'"),
            ({"eval_file": "nope.jsonl", "model": "minilm"}, "nope.jsonl"),
            ({"eval_file": "good.jsonl", "model": "nope@v3"}, "model: .*nope"),
            ({"eval_file": "good.jsonl", "model": "minilm", "params": {"batch_size": 0}}, "batch_size"),
            ({"eval_file": "good.jsonl", "model": "minilm", "params": {"output_dir": "/x"}}, "output_dir"),
        ]:
            with pytest.raises(SpecError, match=fragment):
                jobs.client.submit("evaluate", spec)
    finally:
        jobs.close()
