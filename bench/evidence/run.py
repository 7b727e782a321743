"""One task end to end: data → features → settings picked on the source validation split →
every registered method × seed → per-prompt metrics on the held-out eval part → paired
hierarchical bootstrap → the decision per row and the control targets."""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.evidence import controls, dpo, finetune, oodpl, oodpl_finetune  # noqa: F401 (they register rows)
from bench.evidence.data import PromptSet, TaskData, load_task, plant_noise
from bench.evidence.features import POOLINGS, FeatureTable, extract
from bench.evidence.head import train_head
from bench.evidence.metarm_select import metarm_targets, metarm_updates, select_meta_lr
from bench.evidence.methods import METHODS, Fitted, RunSettings, TaskContext, strength
from bench.evidence.metrics import (
    KL_TARGETS,
    best_of_n_gold,
    kind_class,
    matched_beta,
    mean_kl,
    oracle_fraction,
    pairwise_counts,
    pi_star_gold,
    standardized_difference_variance,
    top_k,
)
from bench.evidence.stats import Cells, Interval, bootstrap, decide

log = logging.getLogger(__name__)

PAIR_CLASSES = ("policy-policy", "gloss-gloss", "gloss-policy")
# Opt-in rows (minutes per run): a run that leaves them out lists them as not run, with why.
NOT_RUN = {
    "fine-tune track (bt, positive_control)": "not run: full MiniLM fine-tuning with training.bt's "
    "RMTrainer, 3 seeds, takes ~18 min for CSG alone on this CPU; opt in with --finetune",
    "oodpl_meta, oodpl_meta_only, oodpl_meta@k, bt@k": "not run: MetaTrainer.precompute (G_i and one "
    "SmolLM2 JVP per 16 source samples) takes 4-14 min per task on this CPU; opt in with --oodpl",
    "OOD-PL on the fine-tune track (ft_oodpl_bt, ft_oodpl_meta, ft_oodpl_meta_only)": "not run: MetaTrainer.train "
    "meta-trains the full MiniLM RM, 3 seeds per row; opt in with --oodpl and --finetune together",
    "dpo (implicit reward, OOD-PL's DPO baseline)": "not run: DPO trains the SmolLM2 policy itself "
    "(training.oodpl.dpo.DPOTrainer, LoRA, one epoch of 512 source pairs, 1 seed) and scores "
    "every candidate under the policy and its reference: minutes per seed on this CPU; opt in with --dpo",
}
NOT_RUN_ROWS = {"fine-tune track (bt, positive_control)": {"ft_bt", "ft_positive_control"},
                "oodpl_meta, oodpl_meta_only, oodpl_meta@k, bt@k": {"oodpl_meta", "oodpl_meta_only"},
                "OOD-PL on the fine-tune track (ft_oodpl_bt, ft_oodpl_meta, ft_oodpl_meta_only)": {
                    "ft_oodpl_bt", "ft_oodpl_meta", "ft_oodpl_meta_only"},
                "dpo (implicit reward, OOD-PL's DPO baseline)": {"dpo"}}


@dataclass
class Options:
    """What the command line sets (``bench.evidence.cli``)."""

    data_root: Path | None = None
    model: str = "minilm"
    max_length: int = 128
    bf16: bool = True
    cache_dir: Path | None = Path("artifacts/cache/evidence")
    seeds: int = 10
    reps: int = 2000
    methods: Sequence[str] | None = None
    noise: float = 0.0
    noise_kind: str = "uniform"  # or "instance" (bench.evidence.data.plant_noise)
    quick: bool = False
    prompts_per_domain: int | None = None  # --quick subsamples
    grid_learning_rates: Sequence[float] = (3e-4, 1e-3, 3e-3)
    grid_epochs: Sequence[float] = (2.0, 4.0, 8.0)
    grid_seeds: int = 2
    run: RunSettings = field(default_factory=RunSettings)


# ---------------------------------------------------------------------- evaluation
def source_std(ctx: TaskContext, fitted: Fitted, limit: int = 2000) -> float:
    """Std of the RM's rewards on source training pairs, both sides (the M3 scale)."""
    rows = ctx.pair_rows(ctx.train_pairs[:limit])
    rewards = np.concatenate([ctx.score(fitted, rows.chosen), ctx.score(fitted, rows.rejected)])
    return float(rewards.std()) or 1.0


def evaluate(ctx: TaskContext, fitted: Fitted, prompts: Sequence[PromptSet]) -> dict[str, Any]:
    """Per-prompt numerators/denominators of every metric (``"values"``), and scalars."""
    rewards = ctx.rewards(fitted, prompts)
    golds = [np.asarray(ps.gold) for ps in prompts]
    values: dict[str, tuple[list[float], list[float]]] = {}

    def put(name: str, num: float, den: float = 1.0) -> None:
        values.setdefault(name, ([], []))
        values[name][0].append(num)
        values[name][1].append(den)

    betas = {target: matched_beta(rewards, target) for target in KL_TARGETS}
    has_gloss = any(kind_class(k) == "gloss" for ps in prompts for k in ps.kinds)
    for ps, r, g in zip(prompts, rewards, golds, strict=True):
        put("M1", pi_star_gold(r, g, betas[1.0]))
        put("M1@2nats", pi_star_gold(r, g, betas[2.0]))
        put("M2", *pairwise_counts(r, g))
        if has_gloss:
            for cls in PAIR_CLASSES:
                put(f"M2:{cls}", *pairwise_counts(r, g, kinds=ps.kinds, only=cls))
        put("best_of_4", best_of_n_gold(r, g, 4))
        put("best_of_all", best_of_n_gold(r, g))
    scalars = {f"beta@{t:g}nats": b for t, b in betas.items()}
    scalars.update({f"kl@{t:g}nats": mean_kl(rewards, b) for t, b in betas.items() if math.isfinite(b)})
    scalars["M1_oracle_fraction"] = oracle_fraction(values["M1"][0], golds)
    scalars["source_val_accuracy"] = ctx.pair_accuracy(fitted, ctx.data.pairs("val"))
    if fitted.rounds:
        val_pairs = ctx.data.pairs("val")
        for r_index, round_fitted in enumerate(fitted.rounds):  # "at equal source accuracy", per round
            scalars[f"source_val_accuracy@round{r_index}"] = ctx.pair_accuracy(round_fitted, val_pairs)
        for r_index in range(1, len(fitted.rounds)):
            previous = ctx.rewards(fitted.rounds[r_index - 1], prompts)
            current = ctx.rewards(fitted.rounds[r_index], prompts)
            scale = source_std(ctx, fitted.rounds[r_index])
            suffix = "" if r_index == len(fitted.rounds) - 1 else f"@round{r_index}"
            for cur, prev, g in zip(current, previous, golds, strict=True):
                shifted = top_k(prev)
                put(f"M3{suffix}", *pairwise_counts(cur, g, subset=shifted))
                put(f"var_dr{suffix}", standardized_difference_variance(cur, shifted, scale))
    return {"values": {k: (np.array(v[0]), np.array(v[1])) for k, v in values.items()},
            "scalars": scalars, "info": fitted.info}


# ---------------------------------------------------------------------- settings
def val_accuracy(ctx: TaskContext, fitted: Fitted) -> float:
    """M2 on the source validation prompts' candidates (what settings are picked on)."""
    return ctx.source_val_accuracy(fitted)


def pick_settings(contexts: dict[str, TaskContext], options: Options) -> dict[str, Any]:
    """Pooling, learning rate and epochs of the heads, by BT's source-val M2 (mean over
    ``grid_seeds`` seeds); every candidate's score is kept for the report."""
    grid = []
    for pooling, ctx in contexts.items():
        for lr in options.grid_learning_rates:
            for epochs in options.grid_epochs:
                head = replace(options.run.head, learning_rate=lr, epochs=epochs)
                scores = []
                for seed in range(options.grid_seeds):
                    fitted = Fitted([train_head(ctx.features, ctx.pair_rows(ctx.train_pairs), head, 50_000 + seed)])
                    scores.append(val_accuracy(ctx, fitted))
                grid.append({"pooling": pooling, "learning_rate": lr, "epochs": epochs,
                             "source_val_M2": float(np.mean(scores))})
    best = max(grid, key=lambda g: g["source_val_M2"])
    by_pooling = {p: max((g for g in grid if g["pooling"] == p), key=lambda g: g["source_val_M2"])
                  for p in contexts}
    return {"best": best, "by_pooling": by_pooling, "grid": grid}


# ---------------------------------------------------------------------- one task
def build_contexts(data: TaskData, table: FeatureTable, options: Options) -> dict[str, TaskContext]:
    train = data.pairs("train")
    flipped = plant_noise(train, options.noise, seed=int(data.manifest.get("seed", 0)) + 7, kind=options.noise_kind)
    labelled = [replace(p, chosen=p.rejected, rejected=p.chosen) if f else p
                for p, f in zip(train, flipped, strict=True)]
    reference = table.index(sorted({(p.prompt, c) for p in train for c in (p.chosen, p.rejected)}))
    control = controls.control_pairs(data)
    return {pooling: TaskContext(data.task, data, table, table.standardized(pooling, reference),
                                 options.run, labelled, flipped, control)
            for pooling in POOLINGS}


def strength_deciles(ctx: TaskContext, seed: int = 0) -> list[dict[str, float]]:
    """μ̂ deciles of the training pairs (seed 0's ensemble): share of labels that agree with
    gold, and the mean gold gap of the label, per decile (the strength figure)."""
    mu, _ = strength(ctx, seed)
    order = np.argsort(mu)
    gaps = np.array([(p.gold_chosen - p.gold_rejected) * (-1 if f else 1)
                     for p, f in zip(ctx.data.pairs("train"), ctx.flipped, strict=True)])
    out = []
    for k, chunk in enumerate(np.array_split(order, 10)):
        out.append({"decile": k, "pairs": int(len(chunk)), "mu_mean": float(np.mean(np.asarray(mu)[chunk])),
                    "label_agrees_with_gold": float(np.mean(gaps[chunk] > 0)),
                    "gold_gap_mean": float(np.mean(gaps[chunk]))})
    return out


def contrast(results: dict[str, list[dict[str, Any]]], a: str, b: str | None, metric: str,
             domains: np.ndarray, reps: int) -> dict[str, Interval] | None:
    def cells(method: str) -> Cells | None:
        runs = results.get(method)
        if not runs or metric not in runs[0]["values"]:
            return None
        return Cells(np.stack([r["values"][metric][0] for r in runs]),
                     np.stack([r["values"][metric][1] for r in runs]))

    side_a = cells(a)
    side_b = cells(b) if b is not None else None
    if side_a is None or (b is not None and side_b is None):
        return None
    if side_b is not None and side_b.num.shape[0] != side_a.num.shape[0]:
        # a 3-seed row (DPO) against a 10-seed baseline: seed s against seed s, the first n
        n = min(side_a.num.shape[0], side_b.num.shape[0])
        side_a, side_b = (Cells(c.num[:n], c.den[:n]) for c in (side_a, side_b))
    if side_a.den.sum() == 0:
        return None
    return bootstrap(side_a, side_b, domains, reps=reps, seed=zlib.crc32(f"{a}|{b}|{metric}".encode()))


def difference_of_gains(results: dict[str, list[dict[str, Any]]], high: tuple[str, str], low: tuple[str, str],
                        metric: str, domains: np.ndarray, reps: int) -> Interval | None:
    """Pooled interval of (A − B) − (C − D) for ``high`` = (A, B), ``low`` = (C, D), paired by
    seed and prompt (one bootstrap draw for all four). Only for metrics with one unit of
    denominator per prompt (M1): then each ratio is a mean and the combination is linear."""
    names = [*high, *low]
    if any(not results.get(n) or metric not in results[n][0]["values"] for n in names):
        return None
    num = {n: np.stack([r["values"][metric][0] for r in results[n]]) for n in names}
    den = np.stack([r["values"][metric][1] for r in results[names[0]]])
    if not np.all(den == 1.0):
        return None
    combined = num[high[0]] - num[high[1]] - num[low[0]] + num[low[1]]
    return bootstrap(Cells(combined, den), None, domains, reps=reps,
                     seed=zlib.crc32(f"{high}|{low}|{metric}".encode()))["pooled"]


def load_with_features(task: str, options: Options) -> tuple[TaskData, FeatureTable]:
    """The task's data v2 (subsampled under --quick) and its encoder features (cached)."""
    data = load_task(task, options.data_root)
    if options.prompts_per_domain:
        data = data.subsample(options.prompts_per_domain)
    table = extract(data.items(), model=options.model, max_length=options.max_length, bf16=options.bf16,
                    cache_dir=options.cache_dir, name=task)
    return data, table


def run_task(task: str, options: Options) -> dict[str, Any]:
    started = time.monotonic()
    data, table = load_with_features(task, options)
    features_seconds = time.monotonic() - started
    contexts = build_contexts(data, table, options)
    picked = pick_settings(contexts, options)
    best = picked["best"]
    head = replace(options.run.head, learning_rate=best["learning_rate"], epochs=best["epochs"])
    ctx = contexts[best["pooling"]]
    ctx.settings = replace(options.run, head=head)
    prompts = data.heldout_part("eval")
    domains = np.array([ps.domain for ps in prompts])
    names = list(options.methods) if options.methods else [m for m, method in METHODS.items() if method.default]
    for required in ("bt", controls.POSITIVE, controls.NEGATIVE):
        if required not in names:
            names.insert(0, required)
    for name in list(names):  # every row's baseline runs too
        base = METHODS[name].baseline
        while base is not None and base not in names:
            names.insert(0, base)
            base = METHODS[base].baseline
    metarm_selection = None
    if metarm_updates(names) and ctx.settings.metarm_select_seeds > 0 and not ctx.settings.metarm_meta_lr_by_update:
        metarm_selection = select_meta_lr(ctx, metarm_updates(names))  # source side only
        ctx.settings = replace(ctx.settings, metarm_meta_lr_by_update=metarm_selection["chosen"])
        log.info("%s MetaRM η picked on source: %s (%.0f s)", task, metarm_selection["chosen"],
                 metarm_selection["seconds"])
    if any(name.startswith(("oodpl_meta", "ft_oodpl")) and not name.endswith("meta_only") for name in names) \
            and ctx.settings.oodpl_bt_weight is None:
        picked_weight = oodpl.select_bt_weight(ctx)  # source val only, before the rows' clocks
        log.info("%s OOD-PL bt_weight picked on source val: %s (%.0f s)", task, picked_weight["chosen"],
                 picked_weight["seconds"])
    results: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        tick = time.monotonic()
        seeds = METHODS[name].seeds or options.seeds
        results[name] = [evaluate(ctx, ctx.fitted(name, seed), prompts) for seed in range(seeds)]
        seconds[name] = (time.monotonic() - tick) / seeds
        log.info("%s %s: %.1f s per seed", task, name, seconds[name])
    # the same two poolings compared on held-out, for the record (chosen on source val above)
    chosen_settings = ctx.settings  # the loop below re-sets every context's settings, ctx's too
    pooling_heldout = {}
    for pooling, other in contexts.items():
        choice = picked["by_pooling"][pooling]
        other.settings = replace(options.run, head=replace(options.run.head, learning_rate=choice["learning_rate"],
                                                           epochs=choice["epochs"]))
        runs = [evaluate(other, METHODS["bt"].fit(other, seed), prompts) for seed in range(min(3, options.seeds))]
        pooling_heldout[pooling] = {
            "source_val_M2": choice["source_val_M2"],
            "heldout_M2": float(np.mean([r["values"]["M2"][0].sum() / r["values"]["M2"][1].sum() for r in runs])),
            "heldout_M1": float(np.mean([r["values"]["M1"][0].mean() for r in runs])),
        }
    ctx.settings = chosen_settings
    rows = summarize(results, names, domains, options.reps)
    gap = next(r for r in rows if r["method"] == controls.POSITIVE)["contrast"]
    control_gap = (gap["M1"]["pooled"].estimate, gap["M2"]["pooled"].estimate)
    for row in rows:
        if row["contrast"]:
            row["decision"] = decide(row["contrast"]["M1"], row["contrast"]["M2"], control_gap).as_dict()
    contrasts = {r["method"]: r["contrast"] for r in rows
                 if r["method"] in (controls.POSITIVE, controls.NEGATIVE, controls.FINETUNE_POSITIVE)}
    return {
        "task": task,
        "data": {"root": str(data.root), "manifest_seed": data.manifest.get("seed"),
                 "heldout_domains": data.heldout_domains, "eval_prompts": len(prompts),
                 "eval_prompts_by_domain": {d: int((domains == d).sum()) for d in data.heldout_domains},
                 "control_prompts": len(data.heldout_part("control")), "control_pairs": len(ctx.control_pairs),
                 "finetune_pairs": {"source": len(finetune.source_pairs(ctx)), "control": len(finetune.control_pairs(ctx))},
                 "source_train_pairs": len(ctx.train_pairs), "source_val_prompts": len(data.source_split("val")),
                 "planted_noise": options.noise, "noise_kind": options.noise_kind,
                 "planted_flips": int(sum(ctx.flipped)), "pair_gap": data.pair_gap},
        "features": table.settings,
        "settings": {"pooling": best["pooling"], "head": asdict(head), "selection": picked,
                     "pooling_heldout": pooling_heldout, "run": asdict(ctx.settings),
                     "metarm_meta_lr_selection": metarm_selection,
                     "oodpl_bt_weight_selection": oodpl.bt_weight_selection(ctx)},
        "rows": rows,
        "control_gap": {"M1": control_gap[0], "M2": control_gap[1]},
        "targets": [*controls.control_targets(task, contrasts), *metarm_targets(task, rows),
                    *oodpl.oodpl_targets(task, rows, growth_interval=difference_of_gains(
                        results, ("oodpl_meta", "bt"), (f"oodpl_meta@{min(oodpl.DOMAIN_COUNTS)}",
                                                        f"bt@{min(oodpl.DOMAIN_COUNTS)}"), "M1", domains,
                        options.reps))],
        "strength_deciles": strength_deciles(ctx) if "strength" in names or "flip" in names else [],
        "costs": {"features_seconds": round(features_seconds, 1), "seconds_per_fit": seconds,
                  "wall_seconds": round(time.monotonic() - started, 1)},
    }


def summarize(results: dict[str, list[dict[str, Any]]], names: Sequence[str], domains: np.ndarray,
              reps: int) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        method = METHODS[name]
        runs = results[name]
        metrics = list(runs[0]["values"])
        absolute = {m: iv["pooled"] for m in metrics
                    if (iv := contrast(results, name, None, m, domains, reps)) is not None}
        contrasts = {}
        if method.baseline is not None:
            for m in metrics:
                iv = contrast(results, name, method.baseline, m, domains, reps)
                if iv is not None:
                    contrasts[m] = iv
        scalars = {k: float(np.mean([r["scalars"][k] for r in runs])) for k in runs[0]["scalars"]}
        rows.append({"method": name, "paper": method.paper, "claim": method.claim, "role": method.role,
                     "baseline": method.baseline, "seeds": len(runs), "absolute": absolute,
                     "contrast": contrasts, "scalars": scalars,
                     "info": [r["info"] for r in runs if r["info"]][:3]})
    return rows

