"""The fast-track methods on features that encode gold: the trainer pieces they reuse do what
the papers say (bench/evidence/methods.py, head.py)."""

from __future__ import annotations

import torch

from bench.evidence.data import load_task
from bench.evidence.head import FeatureRewardModel, new_head
from bench.evidence.methods import METHODS, RunSettings, as_preference_pairs
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
