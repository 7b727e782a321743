"""Smoke test of the MetaRM rows of bench/ood.py on tiny models: rounds, targets, figure."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from bench.metarm_rows import VANILLA, metarm_targets, plot_variance, run_rounds, variance_curves
from bench.ood.cli import main
from bench.ood.report import aggregate
from bench.ood.settings import METHODS, Settings
from training.data import PreferencePair, PromptSamples

ROWS = [PromptSamples(p, ["good great", "bad awful", "fine ok"]) for p in ("hello", "how are you?")]
PAIRS = [PreferencePair(p, "good great excellent", "bad awful terrible") for p in ("hi", "day?", "dog?")]
PARAMS = SimpleNamespace(max_new_tokens=4, temperature=1.0, top_p=1.0)


def test_rounds_targets_and_figure(tiny_policy, tiny_encoder_rm, tmp_path):
    s = replace(Settings.quick(), policy=str(tiny_policy), lora_r=4, responses_per_prompt=2,
                adapt_steps=2, adapt_batch_prompts=2, outer_batch_pairs=2, metarm_steps=1,
                metarm_meta_prompts=2, metarm_diag_pairs=3)
    records, rows = [], []
    for method in (VANILLA, "metarm+adapt"):
        policy, recs = run_rounds(method, task="toy", domain="d", seed=0, s=s, rm_start=tiny_encoder_rm,
                                  source_pairs=PAIRS, train_rows=ROWS, chat=False, params=PARAMS,
                                  out=tmp_path / method)
        assert policy.is_lora and [r["round"] for r in recs] == [1, 2]
        assert all(r["diff_var_after"] is not None for r in recs)
        assert recs[0]["meta_lr"] == (0.0 if method == VANILLA else s.metarm_meta_lr)
        records += recs
        rows.append({"task": "toy", "domain": "d", "method": method, "seed": 0, "gold": 0.5,
                     "pl_accuracy": 0.5})
    rows.append({"task": "toy", "domain": "d", "method": "bt", "seed": 0, "gold": 0.4, "pl_accuracy": 0.5})
    found = metarm_targets(rows, records, ("toy",))
    assert [t["measured"] for t in found[:2]] == [0, 1]  # PL tie is not a win; gold is
    # bt has seeds the MetaRM rows lack (they ran apart): compared on the shared seed only
    more_bt = [{**rows[-1], "seed": seed, "gold": 0.9} for seed in (1, 2)]
    paired = metarm_targets(rows + more_bt, records, ("toy",))
    assert paired[1]["measured"] == 1 and paired[1]["paired_seeds"] == {"d": [0]}
    means = {r["method"]: r["gold_mean"] for r in aggregate(rows + more_bt)}
    assert means["bt"] > means["metarm+adapt"]  # unpaired means would have said bt won
    assert {"name", "measured", "threshold", "met"} <= set(found[2])
    curves = variance_curves(records)["toy"]
    assert len(curves["metarm+adapt"]) == s.metarm_rounds + 1
    plot_variance(records, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_methods_flag_rejects_unknown_methods():
    assert "metarm+adapt" in METHODS and "bt" in METHODS
    with pytest.raises(SystemExit):
        main(["--quick", "--methods", "nope"])
