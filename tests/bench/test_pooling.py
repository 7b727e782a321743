"""bench.pooling: the Bradley–Terry probe, the prompt-resampling CI, and a smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.pooling import cluster_bootstrap_ci, correct, fit_probe, main


def test_the_probe_finds_the_direction_that_orders_the_pairs() -> None:
    generator = torch.Generator().manual_seed(0)
    direction = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
    rejected = torch.randn(200, 4, generator=generator, dtype=torch.float64)
    chosen = rejected + direction * torch.rand(200, 1, generator=generator, dtype=torch.float64)
    w = fit_probe(chosen, rejected, lam=1e-3)
    assert float(correct(w, chosen, rejected).mean()) == 1.0
    cosine = float(w @ direction / (w.norm() * direction.norm()))
    assert cosine > 0.9
    # L2 shrinks w: a stronger λ gives a shorter one
    assert float(fit_probe(chosen, rejected, lam=1.0).norm()) < float(w.norm())


def test_the_ci_resamples_whole_prompts() -> None:
    assert cluster_bootstrap_ci([0.5] * 10, [str(i % 3) for i in range(10)]) == [0.5, 0.5]
    # one prompt's pairs all right, the other's all wrong: the mean is 0 or 1 or in between,
    # and the interval spans nearly all of it (pairs resampled alone would give a narrow one)
    low, high = cluster_bootstrap_ci([1.0] * 20 + [0.0] * 20, ["a"] * 20 + ["b"] * 20)
    assert low == 0.0 and high == 1.0


@pytest.mark.slow
def test_a_smoke_run_writes_the_decision_and_targets(tmp_path: Path) -> None:
    out = tmp_path / "pooling.json"
    main(["--max-pairs", "16", "--seeds", "1", "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["decision"]["auto_pools_by"] in ("mean", "cls")
    assert {row["pooling"] for row in result["rows"]} == {"cls", "mean", "cls_raw"}
    assert all(0 <= row["heldout_all_accuracy"] <= 1 for row in result["rows"])
    assert len(result["targets"]) == 2 and all("measured" in t for t in result["targets"])
