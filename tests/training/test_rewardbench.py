"""RewardBench's section weighting and the evaluation of a preference file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.__main__ import app
from training.evaluate import accuracy_report
from training.reward_model import RewardModel
from training.rewardbench import EXAMPLE_COUNTS, SUBSET_MAPPING, is_rewardbench, section_scores

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "data" / "rewardbench-sample.jsonl"


def expected_accuracy(model_dir: Path) -> tuple[dict[str, float], list[float]]:
    """Accuracy per subset of ``SAMPLE`` recomputed from the model's own scores (64 tokens),
    and the chosen responses' rewards."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    rm = RewardModel.from_pretrained(model_dir, max_input_tokens=64)
    chosen = rm.score([{"prompt": r["prompt"], "response": r["chosen"]} for r in rows])
    rejected = rm.score([{"prompt": r["prompt"], "response": r["rejected"]} for r in rows])
    by_subset: dict[str, list[bool]] = {}
    for row, c, r in zip(rows, chosen, rejected, strict=True):
        by_subset.setdefault(row["subset"], []).append(c > r)
    return {s: sum(v) / len(v) for s, v in by_subset.items()}, chosen


def test_sections_weigh_subsets_by_example_count_with_math_counted_984():
    assert EXAMPLE_COUNTS["math-prm"] == 984 == 6 * EXAMPLE_COUNTS["hep-python"]
    assert sum(len(v) for v in SUBSET_MAPPING.values()) == len(EXAMPLE_COUNTS) == 23
    sections = section_scores({"math-prm": 1.0, "hep-python": 0.0, "alpacaeval-easy": 0.5,
                               "mt-bench-easy": 1.0})
    assert sections["Reasoning"] == pytest.approx(984 / (984 + 164))
    assert sections["Chat"] == pytest.approx((0.5 * 100 + 1.0 * 28) / 128)
    assert set(sections) == {"Reasoning", "Chat"}  # absent sections are left out, not 0
    assert is_rewardbench(["math-prm", "donotanswer"])
    assert not is_rewardbench(["math-prm", "my-subset"]) and not is_rewardbench([])


def test_report_counts_ties_as_wrong_and_weights_only_rewardbench_subsets():
    report = accuracy_report([1.0, 0.0, 2.0], [0.0, 0.0, 3.0], ["math-prm", "math-prm", "hep-go"])
    assert report["accuracy"] == pytest.approx(1 / 3) and report["ties"] == 1
    assert report["accuracy_by_subset"] == {"hep-go": 0.0, "math-prm": 0.5}
    assert report["rewardbench_sections"] == {"Reasoning": pytest.approx(0.5 * 984 / (984 + 164))}
    assert report["rewardbench_missing_sections"] == ["Chat", "Chat Hard", "Safety"]
    mine = accuracy_report([1.0], [0.0], ["my-domain"])
    assert "rewardbench_score" not in mine and mine["accuracy_by_subset"] == {"my-domain": 1.0}


def test_python_m_training_evaluate_on_a_rewardbench_file(tmp_path: Path, tiny_encoder_rm: Path):
    data = tmp_path / "rb.jsonl"
    shutil.copy(SAMPLE, data)
    result = CliRunner().invoke(app, ["evaluate", "--set", f"eval_file={data}",
                                      "--set", f"model={tiny_encoder_rm}",
                                      "--set", f"output_dir={tmp_path / 'out'}",
                                      "--set", "device=cpu", "--set", "max_length=64"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    expected, chosen = expected_accuracy(tiny_encoder_rm)
    assert metrics["accuracy_by_subset"] == pytest.approx(expected)
    assert metrics["n_pairs"] == len(rows) == 18
    assert metrics["rewardbench_sections"] == pytest.approx(section_scores(expected))
    assert set(metrics["rewardbench_sections"]) == {"Chat", "Safety", "Reasoning"}
    assert metrics["rewardbench_score"] == pytest.approx(
        sum(section_scores(expected).values()) / 3)
    scores = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scores] == [str(r["id"]) for r in rows]
    assert [s["chosen_reward"] for s in scores] == pytest.approx(chosen, abs=1e-4)
