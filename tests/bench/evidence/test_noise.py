"""``python -m bench.evidence.noise --quick`` end to end on synthetic data v2 and the tiny
encoder: every condition's rows with intervals and decisions against BT, the Secrets-II
targets, the strength-M sweep, and selection on source val only (bench/evidence/noise.py)."""

from __future__ import annotations

import json

import pytest

from bench.evidence.noise import CONDITIONS, ROWS, main, strength_recall
from tests.bench.evidence.fixture import write_task


def test_strength_recall_by_hand():
    mu = [-1.0, 2.0, -0.5, 3.0, 0.1]
    assert strength_recall(mu, [True, False, True, False, False]) == 1.0  # the two lowest μ̂
    assert strength_recall(mu, [False, False, False, True, True]) == 0.0
    assert strength_recall(mu, [True, True, False, False, False]) == 0.5  # slice {0, 2}
    assert strength_recall(mu, [False] * 5) != strength_recall(mu, [False] * 5)  # NaN


@pytest.mark.slow
def test_quick_sweep_writes_conditions_targets_and_sweep(tmp_path, tiny_encoder_rm):
    for task in ("csg", "ka"):
        write_task(tmp_path / "data", task, seed={"csg": 0, "ka": 1}[task])
    output = tmp_path / "out" / "evidence_noise.json"
    assert main(["--quick", "--data-root", str(tmp_path / "data"), "--model", str(tiny_encoder_rm),
                 "--cache-dir", str(tmp_path / "cache"), "--output", str(output), "--seeds", "2",
                 "--reps", "100"]) == 0
    report = json.loads(output.read_text())
    assert "source-val M2" in report["selection"]["best_denoised"]
    assert "clean source-val labels" in report["selection"]["validation_labels"]
    for task in report["tasks"]:
        assert [c["name"] for c in task["conditions"]] == [name for name, _, _ in CONDITIONS]
        for condition in task["conditions"]:
            rows = {r["method"]: r for r in condition["rows"]}
            assert set(ROWS) <= set(rows)
            for name, row in rows.items():
                assert 0.0 <= row["source_val_M2"]["mean"] <= 1.0
                if name != "bt":
                    assert row["baseline"] == "bt" and row["decision"]["verdict"] in (
                        "shown", "shown worse", "refuted at this scale", "inconclusive")
            assert condition["best_denoised"]["method"] in ROWS[1:]
            assert "source val" in condition["best_denoised"]["picked_on"]
            assert set(condition["combo"]["source_val_M2"]) == {"bt", "flip", "margin", "smooth_negative",
                                                                "smooth_all", "simcse"}
            assert 0.5 <= condition["training_fit"]["bt_agrees_with_training_labels"] <= 1.0
            planted = condition["planted"]
            if condition["rate"] == 0:
                assert planted["flipped"] == 0 and condition["strength_recall"] is None
            else:
                assert planted["flipped"] > 0 and 0.0 <= condition["strength_recall"]["mean"] <= 1.0
            if condition["kind"] == "instance":
                assert planted["expected_rate"] == pytest.approx(condition["rate"], abs=1e-6)
    csg, ka = report["tasks"]
    assert [r["members"] for r in csg["strength_sweep"]["rows"]] == [2, 3] and ka["strength_sweep"] is None
    for row in csg["strength_sweep"]["rows"]:
        assert 0.0 <= row["in_sample_recall_mean"] <= 1.0 and 0.0 <= row["cross_fitted_recall_mean"] <= 1.0
    names = [t["name"] for t in report["targets"]]
    for task in ("csg", "ka"):
        assert sum(n.startswith(f"{task}: at 40% uniform noise the best denoised RM keeps") for n in names) == 1
        assert sum(n.startswith(f"{task}: strength (M = 3)") for n in names) == 2  # uniform 20%, 40%
        assert sum(n.startswith(f"{task}: under instance-dependent") for n in names) == 2  # 40%, 20%
    assert all({"name", "measured", "threshold", "met"} <= set(t) for t in report["targets"])
    assert "| uniform 40% |" in output.with_suffix(".md").read_text()
