"""The fast-track methods on features that encode gold: the trainer pieces they reuse do what
the papers say (bench/evidence/methods.py, head.py)."""

from __future__ import annotations

from dataclasses import replace

import torch

from bench.evidence.data import TaskData, load_task
from bench.evidence.head import FeatureRewardModel, new_head
from bench.evidence.methods import METHODS, RunSettings, as_preference_pairs, combo_selection
from bench.evidence.run import Options, build_contexts, evaluate
from tests.bench.evidence.fixture import gold_features, write_task
from training.metarm.config import MetaRMConfig
from training.metarm.trainer import MetaRMTrainer, difference_objective, source_scale


def context(tmp_path, noise: float = 0.0):
    write_task(tmp_path, "csg", prompts=15)
    data = load_task("csg", tmp_path)
    options = Options(noise=noise, run=RunSettings(strength_members=3, metarm_steps=5))
    return build_contexts(data, gold_features(data), options)["cls"]


def test_flip_finds_planted_noise_and_bt_learns_gold(tmp_path):
    ctx = context(tmp_path, noise=0.2)
    flip = METHODS["flip"].fit(ctx, 0)
    assert flip.info["planted_flips_caught"] >= 0.8
    bt = evaluate(ctx, METHODS["bt"].fit(ctx, 0), ctx.data.heldout_part("eval"))
    correct, pairs = bt["values"]["M2"]
    assert correct.sum() / pairs.sum() > 0.8


def test_metarm_rules_on_a_head_differ_by_the_ascent(tmp_path):
    """alternating − first_order = η·ĝ after one SGD step from the same φ (the ascent kept)."""
    ctx = context(tmp_path)
    pairs = as_preference_pairs(ctx.train_pairs)
    prompts = ctx.data.heldout_part("control")
    samples = [{"prompt": ps.prompt, "responses": list(ps.candidates[:4])} for ps in prompts]
    after = {}
    for update in ("first_order", "alternating", "second_order"):
        head = new_head(ctx.features.shape[1], ctx.settings.head, seed=0)
        head.eval()
        config = MetaRMConfig.from_dict({"meta_lr": 0.5, "update": update, "optimizer": "sgd",
                                         "learning_rate": 0.1, "max_grad_norm": None,
                                         "meta_max_grad_norm": None, "batch_size": 8, "meta_batch_size": 2})
        trainer = MetaRMTrainer(config, pairs=pairs, samples=samples)
        params = list(head.parameters())
        rm = FeatureRewardModel(head, ctx.features, ctx.table.rows)
        meta_batch = trainer._meta_batch([(s["prompt"], s["responses"]) for s in samples], 0)
        stats = trainer.meta_step(rm, params, trainer._optimizer(params), trainer._pair_batch(pairs, 0), meta_batch)
        assert stats["meta_grad_norm"] > 0
        after[update] = [p.detach().clone() for p in params]
    # ĝ at the start: recompute J's gradient on a fresh head
    head = new_head(ctx.features.shape[1], ctx.settings.head, seed=0)
    head.eval()
    rm = FeatureRewardModel(head, ctx.features, ctx.table.rows)
    trainer = MetaRMTrainer(MetaRMConfig.from_dict({"batch_size": 8, "meta_batch_size": 2}), pairs=pairs, samples=samples)
    meta_batch = trainer._meta_batch([(s["prompt"], s["responses"]) for s in samples], 0)
    objective = difference_objective(rm, meta_batch, source_scale(rm, trainer._pair_batch(pairs, 0)))
    ascent = torch.autograd.grad(objective, list(head.parameters()))
    for alt, first, g in zip(after["alternating"], after["first_order"], ascent, strict=True):
        torch.testing.assert_close(alt - first, 0.5 * g, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(after["second_order"], after["first_order"], strict=True))


def reversed_gold(data: TaskData, *, source_val: bool = False, heldout_eval: bool = False) -> TaskData:
    """``data`` with the gold of one part negated (every pair of it re-ranked)."""
    def flip(ps):
        hit = (source_val and ps.group == "val") or (heldout_eval and ps.group == "eval")
        return replace(ps, gold=tuple(-g for g in ps.gold)) if hit else ps

    return TaskData(data.task, data.manifest, [flip(ps) for ps in data.source], data.source_pairs,
                    [flip(ps) for ps in data.heldout], data.root)


def recording_scores(ctx, seen: list[int]):
    """``ctx`` whose scoring also records every feature row it scores (the real scores)."""
    score = ctx.score

    def recorded(fitted, rows):
        seen.extend(rows.tolist())
        return score(fitted, rows)

    ctx.score = recorded
    return ctx


def test_combo_is_picked_on_source_val_only(tmp_path):
    """Reversing the held-out eval part's gold leaves combo's selection exactly as it was;
    reversing the source val part's gold changes it (so the check has teeth). And no
    feature row of a held-out eval candidate is scored while selecting."""
    write_task(tmp_path, "csg", prompts=15)
    data = load_task("csg", tmp_path)
    table = gold_features(data)  # one feature table for all three: only the labels differ
    options = Options(noise=0.3, run=RunSettings(strength_members=3, combo_selection_seeds=2))
    selections, scored = [], []
    for variant in (data, reversed_gold(data, heldout_eval=True), reversed_gold(data, source_val=True)):
        ctx = build_contexts(variant, table, options)["cls"]
        selections.append(combo_selection(recording_scores(ctx, seen := [])))
        scored.append(set(seen))
    original, heldout_reversed, val_reversed = selections
    assert heldout_reversed["source_val_M2"] == original["source_val_M2"]
    assert heldout_reversed["components"] == original["components"]
    assert val_reversed["source_val_M2"]["bt"] < 0.5 < original["source_val_M2"]["bt"]
    eval_rows = set(table.index([(ps.prompt, c) for ps in data.heldout_part("eval") for c in ps.candidates]).tolist())
    val_rows = set(table.index([(ps.prompt, c) for ps in data.source_split("val") for c in ps.candidates]).tolist())
    assert val_rows <= scored[0] and not scored[0] & eval_rows
    # the combo row trains the chosen components (or is BT's own head when none qualify)
    ctx = build_contexts(data, table, options)["cls"]
    chosen = combo_selection(ctx)
    combo = METHODS["combo"].fit(ctx, 0)
    assert combo.info["components"] == chosen["components"]
    assert sum(c in chosen["components"] for c in ("smooth_negative", "smooth_all")) <= 1
    assert all(chosen["source_val_M2"][c] > chosen["source_val_M2"]["bt"] for c in chosen["components"])
    if not chosen["components"]:
        assert combo.heads == ctx.fitted("bt", 0).heads
