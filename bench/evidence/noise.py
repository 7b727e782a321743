"""``python -m bench.evidence.noise``: the Secrets-of-RLHF-II rows under planted label noise.

    python -m bench.evidence.noise --threads 1          # both tasks, 10 seeds, every condition
    python -m bench.evidence.noise --task csg --threads 1
    python -m bench.evidence.noise --quick              # smoke run: subsampled prompts, 3 seeds

Per task (CSG, KA) the rows bt, flip, smooth_negative, smooth_all, margin, simcse, strength and
combo run at five conditions of the source training pairs: clean, uniform 20 % and 40 % flips,
and instance-dependent 20 % and 40 % (pair i flips with probability σ(−|Δgold_i|/τ), τ set so
the expected rate is the requested one: ``bench.evidence.data.plant_noise``). Every row is
evaluated on the held-out eval part with paired CIs against BT *at the same condition* and the
harness's pre-registered decision (``bench.evidence.stats.decide``; the positive control's gap
that the "refuted" branch needs is measured once, on clean labels).

Cheap by construction: features are extracted once per task (cached); pooling, learning rate
and epochs are picked once, by BT's source-val M2 on clean labels, and reused at every
condition; the strength ensemble (M heads per seed) is shared by flip, margin, both smoothing
rows and the strength row; combo's components are picked from those rows' own fits. The cost is
about (5 conditions × seeds × (M + 7) head fits), each linear in the number of training pairs.

Selection never looks at held-out data: the "best denoised" row of a condition and combo's
components are picked on the source validation split (M2 over its candidates). Validation
labels are gold, i.e. clean: planted noise touches only the training pairs.

Writes ``bench/results/evidence_noise.json`` (per task and condition: rows with intervals and
decisions, source-val scores, planted-noise facts, strength recall, combo's choice; the
strength-M sweep; ``targets``; costs; settings; the command) and ``evidence_noise.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.evidence import controls
from bench.evidence.data import TASKS, TaskData, instance_flip_probabilities
from bench.evidence.features import FeatureTable
from bench.evidence.head import HeadSettings, PairRows, train_head
from bench.evidence.methods import (
    Fitted,
    RunSettings,
    TaskContext,
    as_preference_pairs,
    combo_selection,
    strength,
)
from bench.evidence.report import _interval, targets_table, write_results
from bench.evidence.run import (
    Options,
    build_contexts,
    evaluate,
    load_with_features,
    pick_settings,
    summarize,
)
from bench.evidence.stats import DOMAIN_MAJORITY, REFUTE_SHARE, decide
from training.bt.strength_file import strength_rows

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path("bench/results/evidence_noise.json")
# (name, kind, rate): the clean condition first (it sets the control gap and the reference)
CONDITIONS = (("clean", "uniform", 0.0), ("uniform 20%", "uniform", 0.2), ("uniform 40%", "uniform", 0.4),
              ("instance 20%", "instance", 0.2), ("instance 40%", "instance", 0.4))
ROWS = ("bt", "flip", "smooth_negative", "smooth_all", "margin", "simcse", "strength", "combo")
DENOISED = ROWS[1:]  # the candidates for "best denoised RM" (BT is what they are compared with)
KEEP_SHARE = 0.9  # of clean BT's M2 above chance, kept by the best denoised RM at 40 % uniform
RECALL = 0.85  # share of planted flips in the lowest-μ̂ slice of their size
SWEEP_MEMBERS = (2, 3, 5, 10)
SWEEP_CONDITION = ("uniform 40%", "uniform", 0.4)
SWEEP_SEED_BASE = 30_000  # the M-sweep's member heads: seeds apart from every row's


# ---------------------------------------------------------------------- measurements
def strength_recall(mu: list[float] | np.ndarray, flipped: list[bool]) -> float:
    """Share of planted flips among the k lowest-μ̂ pairs, k = number of planted flips
    (recall = precision here, the slice having the flips' size); NaN without flips."""
    planted = np.flatnonzero(np.asarray(flipped, dtype=bool))
    if len(planted) == 0:
        return math.nan
    lowest = np.argsort(np.asarray(mu, dtype=np.float64), kind="stable")[: len(planted)]
    return len(np.intersect1d(lowest, planted)) / len(planted)


def planted_facts(ctx: TaskContext, kind: str, rate: float) -> dict[str, Any]:
    """What was planted: count, realized rate, the gold gaps of flipped vs kept pairs (and τ)."""
    train = ctx.data.pairs("train")
    gaps = np.array([p.gold_chosen - p.gold_rejected for p in train])
    flipped = np.asarray(ctx.flipped, dtype=bool)
    facts: dict[str, Any] = {"kind": kind, "requested_rate": rate, "pairs": len(train),
                             "flipped": int(flipped.sum()), "realized_rate": float(flipped.mean()) if len(train) else 0.0,
                             "mean_gold_gap_flipped": float(gaps[flipped].mean()) if flipped.any() else None,
                             "mean_gold_gap_kept": float(gaps[~flipped].mean()) if (~flipped).any() else None}
    if kind == "instance" and rate > 0:
        probabilities, tau = instance_flip_probabilities(train, rate)
        facts.update({"tau": tau, "expected_rate": float(np.mean(probabilities)),
                      "flip_probability_range": [float(min(probabilities)), float(max(probabilities))]})
    return facts


def strength_member_sweep(ctx: TaskContext, members: tuple[int, ...], seeds: int) -> dict[str, Any]:
    """Recall of planted flips by ensemble size M: per seed, max(M) heads are trained once
    (seeds ``SWEEP_SEED_BASE + 100·seed + m``) and μ̂ over the first M of them is
    ``strength_rows``' mean difference, so the M's differ only by the heads added.

    Beside the paper's in-sample estimator (every head trains on every pair it scores), a
    diagnostic: the cross-fitted μ̂, where the pairs are split in two halves (by seed) and each
    half's differences come from heads trained on the other half only. If the in-sample
    recall is near chance and the cross-fitted one is not, the heads memorise the flipped
    labels they are asked to judge."""
    rows = ctx.pair_rows(ctx.train_pairs)
    pairs = as_preference_pairs(ctx.train_pairs)
    recalls: dict[str, dict[int, list[float]]] = {"in_sample": {m: [] for m in members},
                                                  "cross_fitted": {m: [] for m in members}}
    started = time.monotonic()
    for seed in range(seeds):
        halves = np.random.default_rng(SWEEP_SEED_BASE + seed).permutation(len(pairs)) % 2
        diffs: dict[str, list[list[float]]] = {"in_sample": [], "cross_fitted": []}
        for m in range(max(members)):
            member_seed = SWEEP_SEED_BASE + 100 * seed + m
            diffs["in_sample"].append(_differences(ctx, train_head(ctx.features, rows, ctx.settings.head, member_seed),
                                                   rows))
            crossed = np.zeros(len(pairs))
            for half in (0, 1):
                scored, trained = np.flatnonzero(halves == half), np.flatnonzero(halves != half)
                head = train_head(ctx.features, _subset(rows, trained), ctx.settings.head, member_seed)
                crossed[scored] = _differences(ctx, head, _subset(rows, scored))
            diffs["cross_fitted"].append(crossed.tolist())
        for estimator, by_members in recalls.items():
            for m in members:
                mu = [r["mu"] for r in strength_rows(pairs, diffs[estimator][:m])]
                by_members[m].append(strength_recall(mu, ctx.flipped))
    chance = float(np.mean(ctx.flipped))
    return {"task": ctx.task, "condition": SWEEP_CONDITION[0], "seeds": seeds, "chance_recall": chance,
            "cross_fitted": "2-fold: a pair's μ̂ from heads trained on the other half (a diagnostic, "
                            "not the paper's estimator)",
            "rows": [{"members": m, **{f"{estimator}_{k}": v for estimator in recalls
                                       for k, v in _summary(recalls[estimator][m]).items()},
                      "per_seed": recalls["in_sample"][m]} for m in members],
            "seconds": round(time.monotonic() - started, 1)}


def _subset(rows: PairRows, keep: np.ndarray) -> PairRows:
    index = torch.as_tensor(keep, dtype=torch.long)
    return PairRows(rows.chosen[index], rows.rejected[index])


def _differences(ctx: TaskContext, head: Any, rows: PairRows) -> np.ndarray:
    member = Fitted([head])
    return ctx.score(member, rows.chosen) - ctx.score(member, rows.rejected)


def _summary(values: list[float]) -> dict[str, float]:
    return {"recall_mean": float(np.mean(values)), "recall_min": float(np.min(values)),
            "recall_max": float(np.max(values))}


# ---------------------------------------------------------------------- one condition
def condition_context(data: TaskData, table: FeatureTable, options: Options, pooling: str,
                      head: HeadSettings, kind: str, rate: float) -> TaskContext:
    """The task's context with this condition's planted flips and the clean-picked settings."""
    ctx = build_contexts(data, table, replace(options, noise=rate, noise_kind=kind))[pooling]
    ctx.settings = replace(options.run, head=head)
    return ctx


def run_condition(ctx: TaskContext, names: tuple[str, ...], options: Options, name: str, kind: str,
                  rate: float) -> dict[str, Any]:
    started = time.monotonic()
    prompts = ctx.data.heldout_part("eval")
    domains = np.array([ps.domain for ps in prompts])
    results, source_val, seconds = {}, {}, {}
    for row in names:
        tick = time.monotonic()
        fits = [ctx.fitted(row, seed) for seed in range(options.seeds)]
        results[row] = [evaluate(ctx, fitted, prompts) for fitted in fits]
        source_val[row] = [ctx.source_val_accuracy(fitted) for fitted in fits]
        seconds[row] = round((time.monotonic() - tick) / options.seeds, 3)
        log.info("%s %s %s: %.2f s per seed", ctx.task, name, row, seconds[row])
    rows = summarize(results, list(names), domains, options.reps)
    for row in rows:
        row["source_val_M2"] = {"mean": float(np.mean(source_val[row["method"]])),
                                "per_seed": source_val[row["method"]]}
    # combo with no component is BT itself: not a denoised RM, so not a candidate
    combo = combo_selection(ctx)
    candidates = [r for r in DENOISED if r in names and (r != "combo" or combo["components"])]
    best = max(candidates, key=lambda r: float(np.mean(source_val[r])))
    recalls = [strength_recall(strength(ctx, seed)[0], ctx.flipped) for seed in range(options.seeds)]
    # does a head fit the (noisy) labels it trained on? (why in-sample μ̂ can miss the flips)
    bt_fits = [ctx.fitted("bt", seed) for seed in range(options.seeds)]
    fit = {"bt_agrees_with_training_labels": float(np.mean([ctx.pair_accuracy(f, ctx.train_pairs) for f in bt_fits])),
           "bt_agrees_with_gold_on_training_pairs": float(np.mean([ctx.pair_accuracy(f, ctx.data.pairs("train"))
                                                                  for f in bt_fits])),
           "share_of_pairs_with_positive_mu": float(np.mean([np.mean(np.asarray(strength(ctx, seed)[0]) > 0)
                                                             for seed in range(options.seeds)]))}
    return {
        "name": name, "kind": kind, "rate": rate, "planted": planted_facts(ctx, kind, rate),
        "rows": rows,
        "best_denoised": {"method": best, "source_val_M2": float(np.mean(source_val[best])),
                          "bt_source_val_M2": float(np.mean(source_val["bt"])), "candidates": candidates,
                          "picked_on": "source val split (clean gold labels), mean over seeds; "
                                       "held-out eval not used"},
        "combo": combo,
        "strength_recall": ({"members": ctx.settings.strength_members, "mean": float(np.mean(recalls)),
                             "per_seed": recalls,
                             "chance": float(np.mean(ctx.flipped))} if rate > 0 else None),
        "training_fit": fit,
        "costs": {"seconds_per_seed": seconds, "wall_seconds": round(time.monotonic() - started, 1)},
    }


# ---------------------------------------------------------------------- one task
def row_of(condition: dict[str, Any], method: str) -> dict[str, Any]:
    return next(r for r in condition["rows"] if r["method"] == method)


def run_task(task: str, options: Options, *, sweep_members: tuple[int, ...], sweep_seeds: int,
             sweep: bool) -> dict[str, Any]:
    started = time.monotonic()
    data, table = load_with_features(task, options)
    features_seconds = time.monotonic() - started
    tick = time.monotonic()
    picked = pick_settings(build_contexts(data, table, replace(options, noise=0.0)), options)
    best = picked["best"]
    head = replace(options.run.head, learning_rate=best["learning_rate"], epochs=best["epochs"])
    selection_seconds = time.monotonic() - tick
    conditions = []
    sweep_result = None
    for name, kind, rate in CONDITIONS:
        ctx = condition_context(data, table, options, best["pooling"], head, kind, rate)
        names = (*ROWS, controls.POSITIVE) if rate == 0 else ROWS
        conditions.append(run_condition(ctx, names, options, name, kind, rate))
        if sweep and (name, kind, rate) == SWEEP_CONDITION:
            sweep_result = strength_member_sweep(ctx, sweep_members, sweep_seeds)
    clean = conditions[0]
    gap = row_of(clean, controls.POSITIVE)["contrast"]
    control_gap = (gap["M1"]["pooled"].estimate, gap["M2"]["pooled"].estimate)
    for condition in conditions:
        for row in condition["rows"]:
            if row["contrast"]:
                row["decision"] = decide(row["contrast"]["M1"], row["contrast"]["M2"], control_gap).as_dict()
    prompts = data.heldout_part("eval")
    return {
        "task": task,
        "data": {"root": str(data.root), "manifest_seed": data.manifest.get("seed"),
                 "heldout_domains": data.heldout_domains, "eval_prompts": len(prompts),
                 "source_train_pairs": len(data.pairs("train")),
                 "source_val_prompts": len(data.source_split("val")), "pair_gap": data.pair_gap,
                 "noise_seed": int(data.manifest.get("seed", 0)) + 7,
                 "validation_labels": "clean (gold): planted noise touches only the source training pairs"},
        "features": table.settings,
        "settings": {"pooling": best["pooling"], "head": asdict(head), "selection": picked,
                     "picked_on": "BT's source-val M2 with clean labels, once; reused at every condition",
                     "run": asdict(replace(options.run, head=head))},
        "control_gap": {"M1": control_gap[0], "M2": control_gap[1],
                        "measured_at": "clean (positive control − BT), used by every condition's decision"},
        "conditions": conditions,
        "strength_sweep": sweep_result,
        "costs": {"features_seconds": round(features_seconds, 1), "settings_seconds": round(selection_seconds, 1),
                  "wall_seconds": round(time.monotonic() - started, 1)},
    }


def task_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue-17 Secrets-II targets of one task (module docstring of the issue)."""
    task = result["task"]
    by_name = {c["name"]: c for c in result["conditions"]}
    targets = []
    clean_bt = row_of(by_name["clean"], "bt")["absolute"]["M2"].estimate
    noisy = by_name["uniform 40%"]
    best = noisy["best_denoised"]["method"]
    best_m2 = row_of(noisy, best)["absolute"]["M2"].estimate
    bt_m2 = row_of(noisy, "bt")["absolute"]["M2"].estimate
    kept = (best_m2 - 0.5) / (clean_bt - 0.5) if clean_bt != 0.5 else math.nan
    targets.append({
        "name": f"{task}: at 40% uniform noise the best denoised RM keeps ≥ 90% of clean BT's held-out "
                "M2 above chance ((M2_best@40 − 0.5)/(M2_bt_clean − 0.5); best picked on source val)",
        "measured": kept, "threshold": KEEP_SHARE, "met": bool(kept >= KEEP_SHARE), "best": best,
        "heldout_M2": {"best@40": best_m2, "bt@40": bt_m2, "bt_clean": clean_bt},
        "bt_kept": (bt_m2 - 0.5) / (clean_bt - 0.5) if clean_bt != 0.5 else math.nan})
    for name in ("uniform 20%", "uniform 40%"):
        recall = by_name[name]["strength_recall"]
        targets.append({
            "name": f"{task}: strength (M = {recall['members']}) puts ≥ 85% of planted flips in the lowest-μ̂ "
                    f"slice of their size, {name} (seed mean)",
            "measured": recall["mean"], "threshold": RECALL, "met": bool(recall["mean"] >= RECALL)})
    for name in ("instance 40%", "instance 20%"):
        condition = by_name[name]
        best = condition["best_denoised"]["method"]
        row = row_of(condition, best)
        low = row["contrast"]["M1"]["pooled"].low
        targets.append({
            "name": f"{task}: under instance-dependent {name.split()[1]} noise the best method (picked on "
                    "source val) beats BT: decision 'shown' (measured: pooled ΔM1 CI lower bound)",
            "measured": low, "threshold": 0.0, "met": row["decision"]["verdict"] == "shown", "best": best,
            "decision": row["decision"]})
    return targets


# ---------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    lines = []
    for task in report["tasks"]:
        lines += [f"### {task['task']}: rows vs BT at the same condition (held-out eval; settings "
                  f"{task['settings']['pooling']}, lr {task['settings']['head']['learning_rate']:g}, "
                  f"{task['settings']['head']['epochs']:g} epochs, picked on clean source val)", "",
                  "| condition | row | M2 [95% CI] | ΔM1 vs BT [95% CI] | ΔM2 vs BT [95% CI] | source-val M2 | decision |",
                  "|---|---|---|---|---|---:|---|"]
        for condition in task["conditions"]:
            best = condition["best_denoised"]["method"]
            for row in condition["rows"]:
                c = row["contrast"]
                label = f"**{row['method']}**" if row["method"] == best else row["method"]
                lines.append(f"| {condition['name']} | {label} | {_interval(row['absolute'].get('M2'))} | "
                             f"{_interval(c['M1']['pooled']) if c else '—'} | "
                             f"{_interval(c['M2']['pooled']) if c else '—'} | {row['source_val_M2']['mean']:.3f} | "
                             f"{row.get('decision', {}).get('verdict', 'baseline')} |")
        lines += ["", "Bold: the best denoised row of the condition, picked on source val. combo's components: "
                  + "; ".join(f"{c['name']}: {', '.join(c['combo']['components']) or 'none (= BT)'}"
                              for c in task["conditions"]),
                  "", "Planted: " + "; ".join(
                      f"{c['name']}: {c['planted']['flipped']}/{c['planted']['pairs']} flipped"
                      + (f" (τ = {c['planted']['tau']:.3f}, mean gap flipped {c['planted']['mean_gold_gap_flipped']:.3f}"
                         f" vs kept {c['planted']['mean_gold_gap_kept']:.3f})" if "tau" in c["planted"] else "")
                      for c in task["conditions"] if c["rate"] > 0),
                  "", "BT's agreement with its training labels / with gold on the training pairs (seed mean), and "
                  "strength recall (chance = planted share): " + "; ".join(
                      f"{c['name']}: {c['training_fit']['bt_agrees_with_training_labels']:.3f} / "
                      f"{c['training_fit']['bt_agrees_with_gold_on_training_pairs']:.3f}"
                      + (f", recall {c['strength_recall']['mean']:.3f} (chance {c['strength_recall']['chance']:.3f})"
                         if c["strength_recall"] else "") for c in task["conditions"]), ""]
        if task.get("strength_sweep"):
            sweep = task["strength_sweep"]
            lines += [f"Strength recall of planted flips by ensemble size ({task['task']}, {sweep['condition']}, "
                      f"{sweep['seeds']} seeds; chance = {sweep['chance_recall']:.3f}; cross-fitted: "
                      f"{sweep['cross_fitted']}):", "",
                      "| M | in-sample recall (mean) | min | max | cross-fitted recall (mean) |", "|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['members']} | {r['in_sample_recall_mean']:.3f} | {r['in_sample_recall_min']:.3f} | "
                      f"{r['in_sample_recall_max']:.3f} | {r['cross_fitted_recall_mean']:.3f} |" for r in sweep["rows"]]
            lines.append("")
    return "\n".join(lines) + "\n" + targets_table(report["targets"])


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.evidence.noise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few prompts, 3 seeds, small grid, M = 3")
    parser.add_argument("--task", default="all", choices=[*TASKS, "all"])
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default 10; quick 3)")
    parser.add_argument("--reps", type=int, default=None, help="bootstrap replicates (default 2000; quick 300)")
    parser.add_argument("--sweep-task", default="csg", choices=[*TASKS, "none"],
                        help="task of the strength-M sweep (uniform 40%%)")
    parser.add_argument("--sweep-members", default=None, help="ensemble sizes of the sweep (default 2,3,5,10; quick 2,3)")
    parser.add_argument("--sweep-seeds", type=int, default=None, help="seeds of the sweep (default: --seeds)")
    parser.add_argument("--data-root", type=Path, default=None, help="data v2 root (default benchdata/v2)")
    parser.add_argument("--model", default="minilm", help="encoder of the fast track")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--no-bf16", action="store_true", help="extract features in fp32")
    parser.add_argument("--cache-dir", type=Path, default=Path("artifacts/cache/evidence"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    run = RunSettings(encoder=args.model, cache_dir=str(args.cache_dir))
    options = Options(data_root=args.data_root, model=args.model, max_length=args.max_length, bf16=not args.no_bf16,
                      cache_dir=args.cache_dir, methods=list(ROWS), quick=args.quick, run=run)
    if args.quick:
        options = replace(options, seeds=3, reps=300, prompts_per_domain=12, grid_learning_rates=(1e-3,),
                          grid_epochs=(4.0,), grid_seeds=1, run=replace(run, strength_members=3))
    if args.seeds is not None:
        options = replace(options, seeds=args.seeds)
    if args.reps is not None:
        options = replace(options, reps=args.reps)
    return options


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    options = options_from(args)
    members = tuple(int(m) for m in args.sweep_members.split(",")) if args.sweep_members else (
        (2, 3) if args.quick else SWEEP_MEMBERS)
    started = time.monotonic()
    tasks = list(TASKS) if args.task == "all" else [args.task]
    results = [run_task(task, options, sweep_members=members, sweep_seeds=args.sweep_seeds or options.seeds,
                        sweep=task == args.sweep_task) for task in tasks]
    report = {
        "command": "python -m bench.evidence.noise " + " ".join(sys.argv[1:] if argv is None else argv),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "decision_rule": {
            "shown": "pooled 95% CI lower bound > 0 on M1 and M2, and both point estimates > 0 in "
                     f"≥ {DOMAIN_MAJORITY:.0%} of the held-out domains (3 of 4)",
            "refuted at this scale": f"pooled CI upper bound < {REFUTE_SHARE:.0%} of the clean (positive control − BT) "
                                     "gap on M1 and on M2",
            "inconclusive": "otherwise",
            "contrast": "each row against BT trained on the same (noisy) pairs, paired by seed and prompt",
        },
        "selection": {
            "settings": "pooling, learning rate, epochs: BT's source-val M2 on clean labels, once per task",
            "best_denoised": "per condition, the row of " + ", ".join(DENOISED) + " with the highest mean "
                             "source-val M2 over seeds (combo only when it has a component: else it is BT); "
                             "the held-out eval part is never used to pick",
            "combo": "components whose mean source-val M2 (seeds 0..combo_selection_seeds−1) beats BT's at the "
                     "same condition; of the two smoothing forms the better; none qualifying: combo = BT",
            "validation_labels": "clean: noise is planted only in the source training pairs, so selection used "
                                 "clean source-val labels (an optimistic case: real noisy data has noisy val labels)",
        },
        "settings": {"seeds": options.seeds, "bootstrap_reps": options.reps, "threads": args.threads,
                     "model": options.model, "max_length": options.max_length,
                     "conditions": [{"name": n, "kind": k, "rate": r} for n, k, r in CONDITIONS],
                     "rows": list(ROWS), "strength_members": options.run.strength_members,
                     "sweep": {"task": args.sweep_task, "members": list(members),
                               "seeds": args.sweep_seeds or options.seeds},
                     "track": "fast (heads on frozen encoder features)"},
        "tasks": results,
        "targets": [t for r in results for t in task_targets(r)],
        "costs": {"total_wall_seconds": round(time.monotonic() - started, 1)},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.output, report)
    table = markdown(report)
    args.output.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {args.output} in {report['costs']['total_wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
