"""OOD-PL against the number of source domains (bench/evidence/oodpl.py): the 4 / 8 subsets
are nested and fixed, ``bt@k`` and ``oodpl_meta@k`` train on those domains only, and the
subsets read the all-domain coefficient table (no extra precompute); the BT weight beside the
meta term is picked on source val, and every meta row uses the pick.

The coefficient table here is a seeded random d_j per sample, written where ``coefficients``
caches ``MetaTrainer.precompute``'s output: the precompute itself (SmolLM2 JVPs) is exercised
by test_cli's quick run with the tiny policy; these tests are about which domains a row uses.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from bench.evidence.data import load_task
from bench.evidence.methods import METHODS, Fitted, RunSettings
from bench.evidence.oodpl import (
    COEFFICIENTS,
    domain_order,
    domain_subset,
    meta_tasks,
    oodpl_targets,
    select_bt_weight,
)
from bench.evidence.run import Options, build_contexts
from bench.evidence.stats import Interval
from tests.bench.evidence.fixture import gold_features, write_task


def twelve_domain_context(tmp_path):
    write_task(tmp_path, "csg", prompts=6, source_domains=12)
    data = load_task("csg", tmp_path)
    ctx = build_contexts(data, gold_features(data), Options(run=RunSettings(oodpl_prompts_per_domain=2)))["cls"]
    return ctx


def random_coefficients(ctx, seed: int = 0) -> dict:
    rng = random.Random(seed)
    table = {t.name: [[s.prompt, r, rng.gauss(0, 1)] for s in t.samples for r in s.responses]
             for t in meta_tasks(ctx)}
    return {"table": table, "samples": sum(len(v) for v in table.values())}


def swap_outside(ctx, keep: set[str]):
    """Every training pair outside ``keep`` reversed: a row that reads them learns otherwise."""
    return [p if p.domain in keep else replace(p, chosen=p.rejected, rejected=p.chosen) for p in ctx.train_pairs]


def same_head(a: Fitted, b: Fitted) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.heads[0].state_dict().values(),
                                                  b.heads[0].state_dict().values(), strict=True))


def test_subsets_are_fixed_nested_and_of_the_asked_size(tmp_path):
    ctx = twelve_domain_context(tmp_path)
    order = domain_order(ctx.data.source_domains, "csg")
    assert order == domain_order(list(reversed(ctx.data.source_domains)), "csg")  # seeded, not input order
    assert sorted(order) == sorted(ctx.data.source_domains) and order != sorted(order)
    four, eight, every = domain_subset(ctx, 4), domain_subset(ctx, 8), domain_subset(ctx, None)
    assert (len(four), len(eight), len(every)) == (4, 8, 12) and four < eight < every
    assert METHODS["oodpl_meta@4"].baseline == "bt@4" and METHODS["oodpl_meta@8"].baseline == "bt@8"


def test_bt_on_a_subset_trains_only_on_its_domains(tmp_path):
    ctx = twelve_domain_context(tmp_path)
    four = domain_subset(ctx, 4)
    fitted = METHODS["bt@4"].fit(ctx, 0)
    assert set(fitted.info["domains"]) == four
    assert fitted.info["train_pairs"] == sum(p.domain in four for p in ctx.train_pairs) < len(ctx.train_pairs)
    ctx_swapped = replace(ctx, train_pairs=swap_outside(ctx, four), fits={})
    assert same_head(METHODS["bt@4"].fit(ctx_swapped, 0), fitted)
    assert not same_head(METHODS["bt"].fit(ctx_swapped, 0), METHODS["bt"].fit(ctx, 0))  # the check can fail


def test_meta_on_a_subset_uses_its_domains_and_the_full_coefficient_table(tmp_path):
    ctx = twelve_domain_context(tmp_path)
    ctx.settings = replace(ctx.settings, oodpl_bt_weight=1.0)  # no pick: the poisoned pairs would move it
    coefficients = random_coefficients(ctx)
    ctx.fits[(COEFFICIENTS, 0)] = Fitted([], info=coefficients)
    eight = domain_subset(ctx, 8)
    fitted = METHODS["oodpl_meta@8"].fit(ctx, 0)
    assert set(fitted.info["domains"]) == eight
    # other domains' pairs reversed and coefficients negated: the 8-domain row is unchanged
    poisoned = {name: [[p, r, d if name in eight else -d] for p, r, d in rows]
                for name, rows in coefficients["table"].items()}
    ctx_poisoned = replace(ctx, train_pairs=swap_outside(ctx, eight),
                           fits={(COEFFICIENTS, 0): Fitted([], info={**coefficients, "table": poisoned})})
    assert same_head(METHODS["oodpl_meta@8"].fit(ctx_poisoned, 0), fitted)
    assert not same_head(METHODS["oodpl_meta"].fit(ctx_poisoned, 0), METHODS["oodpl_meta"].fit(ctx, 0))


def test_bt_weight_is_picked_on_source_val_and_used_by_every_meta_row(tmp_path):
    ctx = twelve_domain_context(tmp_path)
    ctx.settings = replace(ctx.settings, oodpl_bt_weight_grid=(0.01, 1.0), oodpl_select_seeds=1)
    gold = {(ps.prompt, c): g for ps in ctx.data.source for c, g in zip(ps.candidates, ps.gold, strict=True)}
    # coefficients that push the softmax weight away from high gold, large enough to outweigh a
    # BT term of weight 0.01 at α = 1e-3: the pick must be the BT-heavy weight
    table = {t.name: [[s.prompt, r, 1e5 * gold[(s.prompt, r)]] for s in t.samples for r in s.responses]
             for t in meta_tasks(ctx)}
    ctx.fits[(COEFFICIENTS, 0)] = Fitted([], info={"table": table, "samples": 0})
    picked = select_bt_weight(ctx)
    scores = {w: picked["scores"][str(w)]["source_val_M1"] for w in (0.01, 1.0)}
    assert picked["chosen"] == 1.0 and scores[0.01] < scores[1.0], scores
    for name in ("oodpl_meta", "oodpl_meta@4", "oodpl_meta@8"):
        assert METHODS[name].fit(ctx, 0).info["bt_weight"] == 1.0
    # the held-out side is never read: its gold reversed, the same scores
    heldout = [replace(ps, gold=tuple(-g for g in ps.gold)) for ps in ctx.data.heldout]
    other = replace(ctx, data=replace(ctx.data, heldout=heldout),
                    fits={(COEFFICIENTS, 0): ctx.fits[(COEFFICIENTS, 0)]})
    assert select_bt_weight(other)["scores"] == picked["scores"]


def test_targets_from_rows():
    def row(name, m1, low=0.001, domains=None, baseline="bt"):
        return {"method": name, "baseline": baseline, "contrast": {"M1": {"pooled": Interval(m1, low, m1 + 0.01)}},
                "info": [{"domains": domains}] if domains else []}

    rows = [row("positive_control", 0.04), row("oodpl_meta", 0.03, domains=list("abcdefghijkl")),
            row("oodpl_meta@4", 0.01, domains=list("abcd"), baseline="bt@4"),
            row("oodpl_meta@8", 0.02, domains=list("abcdefgh"), baseline="bt@8")]
    close, grow = oodpl_targets("csg", rows)
    assert abs(close["measured"] - 0.75) < 1e-9 and close["met"]
    assert abs(grow["measured"] - 0.02) < 1e-9 and grow["met"] and "4 to 12" in grow["name"]
    rows[1] = row("oodpl_meta", 0.03, low=-0.001, domains=list("abcdefghijkl"))
    assert not oodpl_targets("csg", rows)[0]["met"]  # the ratio alone is not enough: CI must be > 0
    # growth is decided like every claim: a rise whose paired interval contains 0 is not growth
    assert oodpl_targets("csg", rows, growth_interval=Interval(0.02, 0.005, 0.035))[1]["met"]
    assert not oodpl_targets("csg", rows, growth_interval=Interval(0.02, -0.01, 0.05))[1]["met"]


def test_growth_interval_is_the_paired_difference_of_gains():
    import numpy as np

    from bench.evidence.run import difference_of_gains

    rng = np.random.default_rng(0)
    domains = np.array(["h0"] * 6 + ["h1"] * 6)

    def runs(shift):
        return [{"values": {"M1": (rng.normal(shift, 0.01, 12), np.ones(12)),
                            "M2": (np.ones(12), np.full(12, 2.0))}} for _ in range(3)]

    results = {"oodpl_meta": runs(0.30), "bt": runs(0.20), "oodpl_meta@4": runs(0.25), "bt@4": runs(0.20)}
    iv = difference_of_gains(results, ("oodpl_meta", "bt"), ("oodpl_meta@4", "bt@4"), "M1", domains, 200)
    means = {k: np.mean([r["values"]["M1"][0] for r in v]) for k, v in results.items()}
    expected = means["oodpl_meta"] - means["bt"] - means["oodpl_meta@4"] + means["bt@4"]
    assert abs(iv.estimate - expected) < 1e-12 and iv.low < expected < iv.high and iv.low > 0
    assert difference_of_gains(results, ("oodpl_meta", "bt"), ("oodpl_meta@4", "bt@4"), "M2", domains, 50) is None
    assert difference_of_gains(results, ("oodpl_meta", "bt"), ("oodpl_meta@8", "bt@8"), "M1", domains, 50) is None
