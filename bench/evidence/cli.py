"""``python -m bench.evidence``: the evidence benchmark, one command.

    python -m bench.evidence                 # both tasks, every registered method, 10 seeds
    python -m bench.evidence --quick         # a few minutes: subsampled prompts, 3 seeds
    python -m bench.evidence --task ka --seeds 20 --methods bt,flip
    python -m bench.evidence --finetune --oodpl --dpo --jobs 2   # everything, one task per core
    python -m bench.evidence --noise 0.4 --noise-kind instance   # flips where |Δgold| is small
    python -m bench.evidence.noise           # the Secrets-II rows at clean / uniform / instance noise

Writes ``bench/results/evidence.json`` (rows, intervals, decisions, targets, costs, settings),
``evidence.md`` (the table) and the figures ``evidence_intervals.png`` and
``evidence_strength.png`` next to it. Reads data v2 (``benchdata/v2``); features are cached
under ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.evidence.data import NOISE_KINDS, TASKS
from bench.evidence.methods import METHODS, RunSettings
from bench.evidence.oodpl import OODPL_ROWS
from bench.evidence.oodpl_finetune import FINETUNE_OODPL_ROWS
from bench.evidence.report import (
    markdown_table,
    plot_intervals,
    plot_strength,
    targets_table,
    write_results,
)
from bench.evidence.run import NOT_RUN, NOT_RUN_ROWS, Options, run_task
from bench.evidence.stats import DOMAIN_MAJORITY, REFUTE_SHARE
from training.launch import die_with_parent

DEFAULT_OUTPUT = Path("bench/results/evidence.json")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few prompts, 3 seeds, small grid")
    parser.add_argument("--task", default="all", choices=[*TASKS, "all"])
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 10; quick 3)")
    parser.add_argument("--methods", default=None, help=f"comma-separated rows (default all): {','.join(METHODS)}")
    parser.add_argument("--finetune", action="store_true",
                        help="also the fine-tune track (RMTrainer): ft_bt, ft_positive_control, 3 seeds; "
                             "with --oodpl also the full RM meta-trained (ft_oodpl_bt, ft_oodpl_meta, ft_oodpl_meta_only)")
    parser.add_argument("--dpo", action="store_true",
                        help="also DPO's implicit reward (SmolLM2 + LoRA trained on 512 source pairs, 1 seed)")
    parser.add_argument("--oodpl", action="store_true",
                        help="also OOD-PL meta-training, on all and on 4 / 8 source domains against BT on the "
                             "same domains (SmolLM2 precompute: many minutes per task)")
    parser.add_argument("--noise", type=float, default=0.0, help="label noise planted in source training pairs")
    parser.add_argument("--noise-kind", default="uniform", choices=NOISE_KINDS,
                        help="uniform flips, or instance-dependent: flip with probability σ(−|Δgold|/τ)")
    parser.add_argument("--data-root", type=Path, default=None, help="data v2 root (default benchdata/v2)")
    parser.add_argument("--model", default="minilm", help="encoder of the fast track")
    parser.add_argument("--policy", default="smollm2-135m", help="policy of OOD-PL's precomputed coefficients")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--no-bf16", action="store_true", help="extract features in fp32")
    parser.add_argument("--cache-dir", type=Path, default=Path("artifacts/cache/evidence"))
    parser.add_argument("--reps", type=int, default=None, help="bootstrap replicates (default 2000; quick 300)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (shared out among --jobs)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="tasks run in this many processes at once (each with threads/jobs torch threads)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.methods:
        unknown = sorted(set(args.methods.split(",")) - set(METHODS))
        if unknown:
            parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    return args


def options_from(args: argparse.Namespace) -> Options:
    methods = args.methods.split(",") if args.methods else None
    extra = [*(OODPL_ROWS if args.oodpl else ()),
             *(("ft_bt", "ft_positive_control") if args.finetune else ()),
             *(FINETUNE_OODPL_ROWS if args.oodpl and args.finetune else ()),
             *(("dpo",) if args.dpo else ())]
    if extra:
        defaults = methods or [name for name, method in METHODS.items() if method.default]
        methods = [*defaults, *(m for m in extra if m not in defaults)]
    run = RunSettings(encoder=args.model, oodpl_policy=args.policy, cache_dir=str(args.cache_dir))
    options = Options(data_root=args.data_root, model=args.model, max_length=args.max_length,
                      bf16=not args.no_bf16, cache_dir=args.cache_dir, noise=args.noise,
                      noise_kind=args.noise_kind,
                      methods=methods, quick=args.quick, run=run)
    if args.quick:
        options = replace(options, seeds=3, reps=300, prompts_per_domain=12, grid_learning_rates=(1e-3,),
                          grid_epochs=(4.0,), grid_seeds=1,
                          run=replace(run, metarm_steps=8, strength_members=3, oodpl_prompts_per_domain=3,
                                      oodpl_precompute_pairs=8))
    if args.seeds is not None:
        options = replace(options, seeds=args.seeds)
    if args.reps is not None:
        options = replace(options, reps=args.reps)
    return options


def _run_task_in_process(task: str, options: Options, threads: int, parent: int) -> dict:
    # a task process dies with the command: killing the command once left both task processes
    # running for 15 min, writing into the same cache as the next run
    die_with_parent(parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    return run_task(task, options)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    options = options_from(args)
    started = time.monotonic()
    tasks = list(TASKS) if args.task == "all" else [args.task]
    jobs = max(1, min(args.jobs, len(tasks)))
    if jobs == 1:
        results = [run_task(task, options) for task in tasks]
    else:
        # one process per task: the heads and the fine-tune track are small matrices that one
        # core each keeps busy, so two tasks side by side take about the wall time of the longer
        threads = max(1, args.threads // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run_task_in_process, tasks, [options] * len(tasks), [threads] * len(tasks),
                                    [os.getpid()] * len(tasks)))
    for result in results:
        ran = {row["method"] for row in result["rows"]}
        result["not_run"] = {name: why for name, why in NOT_RUN.items() if not ran & NOT_RUN_ROWS[name]}
    report = {
        "command": "python -m bench.evidence " + " ".join(sys.argv[1:] if argv is None else argv),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "decision_rule": {
            "shown": "pooled 95% CI lower bound > 0 on M1 and M2, and both point estimates > 0 in "
                     f"≥ {DOMAIN_MAJORITY:.0%} of the held-out domains (3 of 4)",
            "refuted at this scale": f"pooled CI upper bound < {REFUTE_SHARE:.0%} of the (positive control − BT) "
                                     "gap on M1 and on M2",
            "inconclusive": "otherwise",
        },
        "settings": {"seeds": options.seeds, "bootstrap_reps": options.reps, "threads": args.threads, "jobs": jobs,
                     "model": options.model, "policy": args.policy, "max_length": options.max_length,
                     "noise": options.noise, "noise_kind": options.noise_kind, "track": "fast (heads on frozen encoder features)"},
        "tasks": results,
        "targets": [t for r in results for t in r["targets"]],
        "costs": {"total_wall_seconds": round(time.monotonic() - started, 1)},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.output, report)
    table = markdown_table(report) + "\n" + targets_table(report["targets"])
    args.output.with_suffix(".md").write_text(table, encoding="utf-8")
    if args.figures:
        plot_intervals(report, args.output.with_name(args.output.stem + "_intervals.png"))
        plot_strength(report, args.output.with_name(args.output.stem + "_strength.png"))
    print(table)
    print(f"wrote {args.output} in {report['costs']['total_wall_seconds']:.0f} s")
    return 0
