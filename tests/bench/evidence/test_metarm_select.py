"""MetaRM's η is picked on the source side only (bench/evidence/metarm_select.py): the choice
and every score it is made from must not move when the held-out domains are poisoned, and
must move when the pseudo-held-out *source* domains' gold does (so the test can fail)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from bench.evidence.data import load_task
from bench.evidence.features import FeatureTable
from bench.evidence.metarm_select import (
    SOURCE_TOLERANCE,
    choose_meta_lr,
    metarm_targets,
    pseudo_heldout_domains,
    pseudo_parts,
    select_meta_lr,
)
from bench.evidence.methods import METHODS, RunSettings
from bench.evidence.run import Options, build_contexts
from bench.evidence.stats import Interval
from tests.bench.evidence.fixture import gold_features, write_task

SETTINGS = RunSettings(metarm_steps=4, metarm_meta_lr_grid=(0.0, 1.0, 10.0), metarm_select_seeds=1)


def noisy_gold_features(data, noise: float = 0.6) -> FeatureTable:
    """Gold plus noise in feature 0: the heads are imperfect, so accuracies can differ."""
    table = gold_features(data)
    x = table.pooled["cls"].clone()
    x[:, 0] += noise * torch.randn(len(x), generator=torch.Generator().manual_seed(1))
    return FeatureTable(table.rows, {"cls": x, "mean": x})


def contexts(data, table):
    return build_contexts(data, table, Options(run=SETTINGS))["cls"]


def poison(ps, rng):
    return replace(ps, gold=tuple(rng.uniform(-1, 1) for _ in ps.gold))


def test_choice_ignores_heldout_domains_and_follows_source_gold(tmp_path):
    write_task(tmp_path, "csg", prompts=15, source_domains=8)
    data = load_task("csg", tmp_path)
    table = noisy_gold_features(data)
    clean = select_meta_lr(contexts(data, table), ["first_order", "alternating"])
    assert clean["pseudo_heldout_domains"] == pseudo_heldout_domains(data.source_domains, "csg")
    assert len(clean["pseudo_heldout_domains"]) == 2  # a quarter of 8
    assert (clean["meta_prompts"], clean["eval_prompts"]) == (10, 20)  # of 2 × 15 prompts, 1/3 : 2/3
    assert {s["meta_lr"] for s in clean["scores"]["first_order"]} == {0.0, 1.0, 10.0}
    meta, evaluation = pseudo_parts(data.source, clean["pseudo_heldout_domains"], "csg")
    assert not {ps.id for ps in meta} & {ps.id for ps in evaluation}  # M3 on prompts not in the meta set
    assert {ps.domain for ps in [*meta, *evaluation]} == set(clean["pseudo_heldout_domains"])
    assert not {p.domain for p in data.pairs("train")} - set(data.source_domains)

    # held-out domains poisoned: random gold, and their items' features replaced by noise
    rng = random.Random(0)
    heldout_items = [table.rows[(ps.prompt, c)] for ps in data.heldout for c in ps.candidates]
    x = table.pooled["cls"].clone()
    x[heldout_items] = torch.randn(len(heldout_items), x.shape[1], generator=torch.Generator().manual_seed(2))
    poisoned = replace(data, heldout=[poison(ps, rng) for ps in data.heldout])
    again = select_meta_lr(contexts(poisoned, FeatureTable(table.rows, {"cls": x, "mean": x})),
                           ["first_order", "alternating"])
    assert again["scores"] == clean["scores"] and again["chosen"] == clean["chosen"]

    # the pseudo-held-out source domains' gold poisoned: the scores must move
    pseudo = set(clean["pseudo_heldout_domains"])
    source = [poison(ps, rng) if ps.domain in pseudo else ps for ps in data.source]
    moved = select_meta_lr(contexts(replace(data, source=source), table), ["first_order", "alternating"])
    assert moved["scores"] != clean["scores"]


def test_rule_needs_equal_source_accuracy_and_breaks_ties_to_smaller_eta():
    scores = [{"meta_lr": 0.0, "shifted_accuracy": 0.60, "source_val_accuracy": 0.80},
              {"meta_lr": 1.0, "shifted_accuracy": 0.65, "source_val_accuracy": 0.80 - SOURCE_TOLERANCE / 2},
              {"meta_lr": 3.0, "shifted_accuracy": 0.65, "source_val_accuracy": 0.81},
              {"meta_lr": 10.0, "shifted_accuracy": 0.90, "source_val_accuracy": 0.80 - 2 * SOURCE_TOLERANCE}]
    assert choose_meta_lr(scores) == 1.0  # 10 is better shifted but loses source accuracy; 1 and 3 tie
    assert choose_meta_lr(scores[:1] + scores[3:]) == 0.0
    with pytest.raises(StopIteration):
        choose_meta_lr(scores[1:])  # η = 0 (vanilla) is the reference and must be in the grid


def test_rows_use_the_selected_eta(tmp_path):
    write_task(tmp_path, "csg", prompts=12)
    data = load_task("csg", tmp_path)
    ctx = contexts(data, noisy_gold_features(data))
    ctx.settings = replace(ctx.settings, metarm_meta_lr_by_update={"first_order": 3.0, "second_order": 0.3})
    assert METHODS["metarm"].fit(ctx, 0).info["meta_lr"] == 3.0
    assert METHODS["metarm_second_order"].fit(ctx, 0).info["meta_lr"] == 0.3
    assert METHODS["metarm_alternating"].fit(ctx, 0).info["meta_lr"] == ctx.settings.metarm_meta_lr
    assert METHODS["vanilla_rounds"].fit(ctx, 0).info["meta_lr"] == 0.0


def test_targets_read_the_contrasts_and_say_when_the_row_is_vanilla():
    def row(name, m3, m1_low, meta_lr, baseline="vanilla_rounds"):
        return {"method": name, "baseline": baseline, "scalars": {"source_val_accuracy": 0.7},
                "absolute": {"var_dr": Interval(1.0, 0.9, 1.1)}, "info": [{"meta_lr": meta_lr}],
                "contrast": {"M3": {"pooled": Interval(m3, m3 - 0.02, m3 + 0.02)},
                             "M1": {"pooled": Interval(m1_low + 0.01, m1_low, m1_low + 0.02)}}}

    rows = [row("vanilla_rounds", 0.0, 0.0, 0.0, baseline="bt"), row("metarm", 0.06, 0.001, 3.0),
            row("metarm_second_order", 0.0, 0.0, 0.0)]
    first_m3, first_m1, second_m3, second_m1 = metarm_targets("csg", rows)
    assert first_m3["met"] and first_m1["met"] and "note" not in first_m3
    assert first_m3["conditions"]["baseline_source_val_accuracy"] == 0.7
    assert not second_m3["met"] and not second_m1["met"] and "is 0" in second_m3["note"]
