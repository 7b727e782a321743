"""``python -m bench.datagen build [...]``: build the offline preference benchmark."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.datagen.build import BuildConfig, BuildError, build_task
from bench.datagen.datasheet import write_datasheet
from bench.datagen.tasks import TASKS
from training.data import default_bench_root
from worker.settings import WorkerSettings


def _heldout(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--heldout needs at least one domain")
    return names


def _fraction(value: str) -> float:
    p = float(value)
    if not 0.0 < p < 1.0:
        raise argparse.ArgumentTypeError(f"label noise must be in (0, 1), got {value}")
    return p


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m bench.datagen", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build csg and/or ka under --out")
    build.add_argument("--task", choices=[*TASKS, "all"], default="all")
    build.add_argument("--out", type=Path, default=default_bench_root())
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--policy", default="smollm2-135m",
                       help="short name, local causal-LM directory or hub id")
    build.add_argument("--domains", type=int, default=None,
                       help="number of domains (held-out included); default: the task's list")
    build.add_argument("--prompts-per-domain", type=int, default=BuildConfig.prompts_per_domain)
    build.add_argument("--k", type=int, default=BuildConfig.k, help="policy samples per prompt")
    build.add_argument("--heldout", type=_heldout, default=None,
                       help="comma-separated held-out domains (applies to every built task)")
    build.add_argument("--label-noise", type=_fraction, nargs="*", default=[0.2, 0.4],
                       metavar="P", help="write pairs.train.noise{P}.jsonl for each P")
    build.add_argument("--artifacts-dir", type=Path, default=WorkerSettings().artifacts_dir)
    build.add_argument("--cache-dir", type=Path, default=None,
                       help="generation cache (default: <artifacts-dir>/cache/generations)")
    build.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (1 is fastest on a shared CPU; 0 = torch default)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.k < 1 or args.prompts_per_domain < 2:
        print("error: --k must be >= 1 and --prompts-per-domain >= 2", file=sys.stderr)
        return 2
    config = BuildConfig(
        out=args.out, seed=args.seed, policy=args.policy, domains=args.domains,
        prompts_per_domain=args.prompts_per_domain, k=args.k, heldout=args.heldout,
        label_noise=sorted(set(args.label_noise)), artifacts_dir=args.artifacts_dir,
        cache_dir=args.cache_dir, quiet=args.quiet,
    )
    if args.threads > 0:
        # more threads than free cores makes OpenMP spin: generation got 15x slower that way
        import torch

        torch.set_num_threads(args.threads)
    names = list(TASKS) if args.task == "all" else [args.task]
    started = time.monotonic()
    try:
        for name in names:
            path = build_task(TASKS[name], config)
            print(f"built {path}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {write_datasheet(config.out)} in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
