"""Label-noise benchmark (issue 5): do Secrets-II options rescue an RM trained on noisy pairs?

For each task (CSG, KA) and label-noise level, the union of the source domains' training
pairs (with the benchmark's planted flips) trains a MiniLM RM per method and seed; accuracy
is measured on the clean test pairs of the same domains (optionally also the held-out
domains). Methods: vanilla, flip (μ̂ < 0), smoothing, adaptive margin, flip + margin,
flip + margin + SimCSE. The vanilla runs double as the strength ensemble (seeds 0..M−1), so
strength costs no extra training.

    python -m bench.noise --quick              # minutes: CSG, noise 0 / 0.4, subsampled
    python -m bench.noise                      # full: CSG + KA, 0/20/40 %, 3 seeds, all pairs

Prints a table and writes bench/results/noise.json (rows + targets).
Target (Secrets of RLHF II's claim): at 40 % noise the best denoised method keeps ≥ 90 % of
the clean vanilla model's accuracy above chance, and beats vanilla at 40 % by ≥ 2 points.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from training.atomic import write_json_atomic, write_jsonl_atomic
from training.bt.config import RMTrainConfig
from training.bt.strength import summarize_strength
from training.bt.strength_file import default_strength_path, strength_rows, write_strength
from training.bt.trainer import RMTrainer
from training.data import load_benchmark, load_pairs
from training.evaluate import evaluate_pairs, score_pairs
from training.precision import pick_device, training_precision_name

MARGIN = {"margin": "adaptive", "margin_scale": 1.0}
METHODS: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "flip": {"flip": "negative"},
    "smoothing": {"label_smoothing": 0.1},
    "adaptive_margin": dict(MARGIN),
    "flip+margin": {"flip": "negative", **MARGIN},
    "flip+margin+simcse": {"flip": "negative", **MARGIN, "simcse_weight": 0.1,
                           "simcse_temperature": 0.05, "simcse_representation": "difference"},
}
KEEP_FRACTION = 0.9  # share of clean above-chance accuracy to keep at the highest noise
MIN_GAIN = 0.02  # "clearly more than vanilla": accuracy points at the highest noise


def pair_row(pair: Any, index: int) -> dict[str, Any]:
    return {"id": f"{pair.domain}/{pair.id if pair.id is not None else index}", "prompt": pair.prompt,
            "chosen": pair.chosen, "rejected": pair.rejected, "domain": pair.domain,
            "flipped": bool(pair.meta.get("flipped", False))}


def subsample(pairs: list[Any], limit: int | None, seed: int) -> list[Any]:
    if limit is None or len(pairs) <= limit:
        return pairs
    return random.Random(seed).sample(pairs, limit)


def prepare(args: argparse.Namespace, task: str, noise: float, work: Path) -> dict[str, Any]:
    """Write train/test JSONL for one (task, noise): union of the source domains, subsampled."""
    bench = load_benchmark(task, args.data_root)
    level = noise or None
    train = [p for d in bench.source_domains for p in bench.pairs(d, "train", level)]
    test = [p for d in bench.source_domains for p in bench.pairs(d, "test")]
    heldout = [p for d in bench.heldout_domains for p in bench.pairs(d, "test")]
    # The same subsample for every noise level: noise is the only thing that changes.
    train = subsample(train, args.max_train_pairs, 0)
    test = subsample(test, args.max_test_pairs, 1)
    heldout = subsample(heldout, args.heldout_pairs, 2) if args.heldout_pairs else []
    work.mkdir(parents=True, exist_ok=True)
    files = {"train": work / "train.jsonl", "test": work / "test.jsonl"}
    write_jsonl_atomic(files["train"], [pair_row(p, i) for i, p in enumerate(train)])
    write_jsonl_atomic(files["test"], [pair_row(p, i) for i, p in enumerate(test)])
    return {"files": files, "heldout": heldout, "n_train": len(train), "n_test": len(test),
            "planted": [bool(p.meta.get("flipped", False)) for p in train]}


def run_one(args: argparse.Namespace, data: dict[str, Any], out: Path, method: str, seed: int,
            ) -> tuple[dict[str, Any], RMTrainer]:
    shutil.rmtree(out, ignore_errors=True)  # a benchmark run starts fresh
    values = {
        "model": args.model, "train_file": str(data["files"]["train"]),
        "eval_file": str(data["files"]["test"]), "output_dir": str(out),
        "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "max_length": args.max_length, "seed": seed, "device": args.device,
        "checkpoint_every": 0, "reward_stats_max_items": 64, "eval_batch_size": 64,
        **METHODS[method],
    }
    trainer = RMTrainer(RMTrainConfig.from_dict(values))
    started = time.monotonic()
    result = trainer.train()
    row = {"seed": seed, "accuracy": result.metrics["eval_accuracy"],
           "ece": result.metrics["eval_ece"], "flipped_pairs": result.metrics["flipped_pairs"],
           "wall_seconds": time.monotonic() - started}
    if data["heldout"]:
        row["heldout_accuracy"] = evaluate_pairs(trainer.rm, data["heldout"], 64)["accuracy"]
    return row, trainer


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(task: str, noise: float, method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc_mean, acc_std = mean_std([r["accuracy"] for r in runs])
    row = {"task": task, "noise": noise, "method": method, "seeds": len(runs),
           "accuracy_mean": acc_mean, "accuracy_std": acc_std,
           "ece_mean": statistics.fmean(r["ece"] for r in runs),
           "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in runs), "runs": runs}
    if all("heldout_accuracy" in r for r in runs):
        row["heldout_accuracy_mean"], row["heldout_accuracy_std"] = mean_std(
            [r["heldout_accuracy"] for r in runs])
    return row


def bench_level(args: argparse.Namespace, task: str, noise: float, methods: list[str],
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    work = args.work_dir / task / f"noise{noise:g}"
    data = prepare(args, task, noise, work)
    seeds = list(range(args.seeds))
    rows, strength = [], {}
    # Vanilla seeds 0..M−1 are the strength ensemble: same configs, scored on the train pairs.
    members = max(args.seeds, args.num_models) if any(METHODS[m] for m in methods) else args.seeds
    vanilla, diffs = [], []
    started = time.monotonic()
    for seed in range(members):
        run, trainer = run_one(args, data, work / f"vanilla-{seed}", "vanilla", seed)
        print(f"  {task} noise={noise:g} vanilla seed={seed}: acc={run['accuracy']:.3f} "
              f"({run['wall_seconds']:.0f}s)", flush=True)
        if seed in seeds:
            vanilla.append(run)
        if seed < args.num_models:
            chosen, rejected = score_pairs(trainer.rm, trainer.pairs, batch_size=64)
            diffs.append([c - r for c, r in zip(chosen, rejected, strict=True)])
        shutil.rmtree(work / f"vanilla-{seed}", ignore_errors=True)
    if "vanilla" in methods:
        rows.append(aggregate(task, noise, "vanilla", vanilla))
    if len(diffs) >= 2:
        pairs = load_pairs(data["files"]["train"])
        srows = strength_rows(pairs, diffs)
        write_strength(default_strength_path(data["files"]["train"]), srows)
        summary = summarize_strength(srows, data["planted"] if any(data["planted"]) else None)
        strength = {"task": task, "noise": noise, "num_models": len(diffs),
                    "share_mu_negative": summary["share_mu_negative"],
                    "planted_recall_in_lowest_mu": summary.get("planted_recall_in_lowest_mu"),
                    "planted_share_mu_negative": summary.get("planted_share_mu_negative"),
                    "ensemble_wall_seconds": time.monotonic() - started}
    for method in methods:
        if method == "vanilla":
            continue
        runs = []
        for seed in seeds:
            run, _ = run_one(args, data, work / f"{method}-{seed}", method, seed)
            print(f"  {task} noise={noise:g} {method} seed={seed}: acc={run['accuracy']:.3f} "
                  f"({run['wall_seconds']:.0f}s)", flush=True)
            runs.append(run)
            shutil.rmtree(work / f"{method}-{seed}", ignore_errors=True)
        rows.append(aggregate(task, noise, method, runs))
    return rows, strength


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for task in sorted({r["task"] for r in rows}):
        mine = {(r["noise"], r["method"]): r for r in rows if r["task"] == task}
        noisiest = max(n for n, _ in mine)
        clean, noisy_vanilla = mine.get((0.0, "vanilla")), mine.get((noisiest, "vanilla"))
        denoised = [r for (n, m), r in mine.items() if n == noisiest and m != "vanilla"]
        if noisiest == 0.0 or clean is None or noisy_vanilla is None or not denoised:
            continue
        best = max(denoised, key=lambda r: r["accuracy_mean"])
        above_chance = clean["accuracy_mean"] - 0.5
        kept = (best["accuracy_mean"] - 0.5) / above_chance if above_chance > 0 else float("nan")
        gain = best["accuracy_mean"] - noisy_vanilla["accuracy_mean"]
        out.append({"name": f"{task}: best denoised at {noisiest:.0%} noise ({best['method']}) keeps "
                            "clean vanilla's accuracy above chance",
                    "measured": kept, "threshold": KEEP_FRACTION, "met": bool(kept >= KEEP_FRACTION)})
        out.append({"name": f"{task}: best denoised minus vanilla accuracy at {noisiest:.0%} noise",
                    "measured": gain, "threshold": MIN_GAIN, "met": bool(gain >= MIN_GAIN)})
    return out


def print_table(rows: list[dict[str, Any]], strength: list[dict[str, Any]],
                goals: list[dict[str, Any]]) -> None:
    print("\n| task | noise | method | seeds | test accuracy | ECE | s/run |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['noise']:.0%} | {r['method']} | {r['seeds']} | "
              f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {r['ece_mean']:.3f} | "
              f"{r['wall_seconds_mean']:.0f} |")
    for s in strength:
        recall = s["planted_recall_in_lowest_mu"]
        print(f"strength {s['task']} noise={s['noise']:.0%}: M={s['num_models']}, "
              f"share μ̂<0 = {s['share_mu_negative']:.1%}, planted flips in lowest-μ̂ slice = "
              f"{'n/a' if recall is None else f'{recall:.1%}'}")
    for g in goals:
        print(f"target {'MET' if g['met'] else 'not met'}: {g['name']}: "
              f"{g['measured']:.3f} (threshold {g['threshold']})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CSG only, noise 0/0.4, 2 seeds (vanilla at 0 only), 192 train / 160 "
                             "test pairs, max_length 64: a smoke-sized run on a CPU")
    parser.add_argument("--tasks", default="csg,ka")
    parser.add_argument("--noise", default="0,0.2,0.4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-models", type=int, default=5, help="strength ensemble size M")
    parser.add_argument("--max-train-pairs", type=int, default=None)
    parser.add_argument("--max-test-pairs", type=int, default=None)
    parser.add_argument("--heldout-pairs", type=int, default=500,
                        help="also evaluate on up to N held-out-domain test pairs (0: skip)")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data-root", type=Path, default=None, help="default: the installed benchmark")
    parser.add_argument("--work-dir", type=Path, default=Path("bench/results/noise_work"))
    parser.add_argument("--output", type=Path, default=Path("bench/results/noise.json"))
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="RUN.json",
                        help="write --output from these runs (e.g. per task or noise level) and exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.noise, args.seeds, args.num_models = "csg", "0,0.4", 2, 2
        args.max_train_pairs, args.max_test_pairs, args.heldout_pairs = 192, 160, 0
        args.max_length, args.learning_rate = 64, 1e-4
    return args


# Run-local settings that may differ between merged runs; everything else must match.
MERGE_FREE = ("tasks", "noise", "threads", "output", "work_dir", "merge", "command")


def merge(paths: list[Path], output: Path) -> dict[str, Any]:
    """One report from several runs of one configuration (say, one per task on separate
    cores): rows and strength concatenated, targets recomputed over the union."""
    runs = [json.loads(Path(p).read_text()) for p in paths]

    def comparable(run: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in run["config"].items() if k not in MERGE_FREE}

    differing = sorted({k for run in runs[1:] for k, v in comparable(run).items()
                        if comparable(runs[0]).get(k) != v})
    if differing:
        raise SystemExit(f"--merge: the runs differ in {differing}; merge one configuration only")
    rows = [r for run in runs for r in run["rows"]]
    keys = [(r["task"], r["noise"], r["method"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit("--merge: a (task, noise, method) row appears in more than one run")
    rows.sort(key=lambda r: (r["task"], r["noise"], list(METHODS).index(r["method"])))
    strength = sorted((s for run in runs for s in run["strength"]), key=lambda s: (s["task"], s["noise"]))
    goals = targets(rows)
    print_table(rows, strength, goals)
    report = {"config": comparable(runs[0]), "rows": rows, "strength": strength, "targets": goals,
              "merged_runs": [{"file": str(p), "command": run["config"].get("command"),
                               "tasks": run["config"]["tasks"], "noise": run["config"]["noise"],
                               "threads": run["config"].get("threads"),
                               "wall_seconds": run["total_wall_seconds"]}
                              for p, run in zip(paths, runs, strict=True)],
              "total_wall_seconds": sum(run["total_wall_seconds"] for run in runs)}
    write_json_atomic(output, report)
    print(f"\nwrote {output} (merged {len(runs)} runs)")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output)
    args.command = "python -m bench.noise " + " ".join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    rows, strength = [], []
    started = time.monotonic()
    for task in args.tasks.split(","):
        for noise in sorted(float(n) for n in args.noise.split(",")):
            # The clean level only needs vanilla in quick mode (it is the reference).
            level_methods = ["vanilla"] if (args.quick and noise == 0.0) else methods
            level_rows, level_strength = bench_level(args, task, noise, level_methods)
            rows += level_rows
            if level_strength:
                strength.append(level_strength)
    goals = targets(rows)
    print_table(rows, strength, goals)
    # the trainers' default bf16 switch: bf16 autocast where the hardware has bf16 units
    args.precision = training_precision_name(pick_device())
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "rows": rows, "strength": strength, "targets": goals,
              "total_wall_seconds": time.monotonic() - started}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output, report)
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
