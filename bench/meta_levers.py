"""Does OOD-PL meta-training move its own outer objective? (issue 6, levers tried)

Meta-trains the MiniLM RM against the SmolLM2 + LoRA policy on the first N source domains of
a task, once per (inner rate α, summed or per-token-mean margins in ℓ_PL), and prints the
outer loss and outer PL accuracy before and after, on the same fixed evaluation batches of
the source tasks. These are training-distribution numbers: a diagnostic of the optimiser,
not a held-out result (that is ``bench/ood.py``).

    python -m bench.meta_levers --task csg --inner-lr 0.01,1.0 --normalized 0
    python -m bench.meta_levers --task csg --inner-lr 0.1 --normalized 1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.ood.run import meta_train_config, policy_draws, sampling_params
from bench.ood.settings import Settings
from training.data import load_benchmark
from training.oodpl.meta_train import MetaTask, MetaTrainer

KEYS = ("outer_loss", "outer_pl_accuracy", "rm_accuracy")


def run(task: str, inner_lr: float, normalized: bool, a: argparse.Namespace) -> dict:
    s = replace(Settings(), outer_steps=a.steps, inner_lr=inner_lr, pl_length_normalized=normalized)
    bench = load_benchmark(task, root=a.bench_root)
    tasks = [MetaTask(d, policy_draws(bench.samples(d, "train")), bench.pairs(d, "train"))
             for d in bench.source_domains[: a.source_domains]]
    config = meta_train_config(
        s, chat=sampling_params(task).chat, seed=a.seed, eval_pairs=a.eval_pairs,
        output_dir=Path(a.work_dir) / f"{task}-a{inner_lr:g}-n{int(normalized)}")
    started = time.monotonic()
    result = MetaTrainer(config, tasks=tasks).train()
    before = result.history[0]
    return {"task": task, "inner_lr": inner_lr, "normalized": normalized, "steps": a.steps,
            "before": {k: before[k] for k in KEYS}, "after": {k: result.metrics[k] for k in KEYS},
            "wall_s": time.monotonic() - started}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="csg")
    parser.add_argument("--inner-lr", default="0.01,0.1,1.0", help="comma list of α")
    parser.add_argument("--normalized", default="0,1", help="comma list of 0/1: per-token-mean A")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--source-domains", type=int, default=4)
    parser.add_argument("--eval-pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bench-root", default=None, help="default: the installed benchmark")
    parser.add_argument("--work-dir", default="artifacts/bench/meta_levers")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    a = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    rows = [run(a.task, float(lr), flag == "1", a)
            for flag in a.normalized.split(",") for lr in a.inner_lr.split(",")]
    print("\n| task | α | A | outer loss before → after | outer PL acc before → after | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b, f = r["before"], r["after"]
        print(f"| {r['task']} | {r['inner_lr']:g} | {'mean' if r['normalized'] else 'sum'} | "
              f"{b['outer_loss']:.4f} → {f['outer_loss']:.4f} | "
              f"{b['outer_pl_accuracy']:.3f} → {f['outer_pl_accuracy']:.3f} | {r['wall_s']:.0f} |")
    if a.output:
        Path(a.output).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
