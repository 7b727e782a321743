"""``python -m bench.datagen build [...]``: build the offline preference benchmark (v1);
``python -m bench.datagen v2 [...]``: build data v2, the evidence benchmark's candidate sets."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.datagen.build import BuildConfig, BuildError, build_task
from bench.datagen.datasheet import write_datasheet, write_v2_datasheet
from bench.datagen.tasks import TASKS
from bench.datagen.v2 import QUICK_SIZES, V2_TASKS, V2Config, build_v2_task, default_v2_root
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


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"needs a positive number, got {value}")
    return n


def _add_common(command: argparse.ArgumentParser, out_help: str) -> None:
    """The options both builders share: what to build, from which policy, where."""
    command.add_argument("--task", choices=[*TASKS, "all"], default="all")
    command.add_argument("--out", type=Path, default=None, help=out_help)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--policy", default="smollm2-135m",
                         help="short name, local causal-LM directory or hub id")
    command.add_argument("--heldout", type=_heldout, default=None,
                         help="comma-separated held-out domains (applies to every built task)")
    command.add_argument("--artifacts-dir", type=Path, default=WorkerSettings().artifacts_dir)
    command.add_argument("--cache-dir", type=Path, default=None,
                         help="generation cache (default: <artifacts-dir>/cache/generations)")
    command.add_argument("--threads", type=int, default=1,
                         help="torch CPU threads (1 is fastest on a shared CPU; 0 = torch default)")
    command.add_argument("--quiet", action="store_true", help="no progress bars")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m bench.datagen", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build csg and/or ka (v1) under --out")
    _add_common(build, f"default: {default_bench_root()}")
    build.add_argument("--domains", type=int, default=None,
                       help="number of domains (held-out included); default: the task's list")
    build.add_argument("--prompts-per-domain", type=int, default=BuildConfig.prompts_per_domain)
    build.add_argument("--k", type=int, default=BuildConfig.k, help="policy samples per prompt")
    build.add_argument("--label-noise", type=_fraction, nargs="*", default=[0.2, 0.4],
                       metavar="P", help="write pairs.train.noise{P}.jsonl for each P")

    v2 = commands.add_parser("v2", help="build data v2 (held-out candidate sets) under --out")
    _add_common(v2, f"default: {default_v2_root()}; with --quick a new temporary directory")
    v2.add_argument("--quick", action="store_true",
                    help="a tiny build (for tests): " + ", ".join(
                        f"{k.replace('_', '-')} {v}" for k, v in QUICK_SIZES.items()))
    v2.add_argument("--source-domains", type=_positive, default=V2Config.source_domains)
    v2.add_argument("--source-prompts", type=_positive, default=V2Config.source_prompts,
                    help="prompts per source domain")
    v2.add_argument("--heldout-prompts", type=_positive, default=V2Config.heldout_prompts,
                    help="prompts per held-out domain")
    v2.add_argument("--source-k", type=_positive, default=None,
                    help="policy samples per source prompt (default: the task's: csg 4, ka 2)")
    v2.add_argument("--heldout-k", type=_positive, default=None,
                    help="policy samples per held-out prompt (default: the task's: csg 16, ka 4)")
    v2.add_argument("--precision", choices=["auto", "float32"], default=V2Config.precision,
                    help="the policy's: auto = bf16 autocast where the CPU has bf16 units")
    return root


def _set_threads(threads: int) -> None:
    if threads > 0:
        # more threads than free cores makes OpenMP spin: generation got 15x slower that way
        import torch

        torch.set_num_threads(threads)


def _run(builds: list[Callable[[], Path]], datasheet: Callable[[], Path]) -> int:
    """Run each task's build, then write the datasheet; a BuildError is exit code 2."""
    started = time.monotonic()
    try:
        for build in builds:
            print(f"built {build()}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {datasheet()} in {time.monotonic() - started:.0f}s")
    return 0


def main_v2(args: argparse.Namespace) -> int:
    config = V2Config(
        seed=args.seed, policy=args.policy, heldout=args.heldout,
        source_domains=args.source_domains, source_prompts=args.source_prompts,
        heldout_prompts=args.heldout_prompts, source_k=args.source_k, heldout_k=args.heldout_k,
        precision=args.precision, artifacts_dir=args.artifacts_dir, cache_dir=args.cache_dir,
        threads=args.threads, quiet=args.quiet,
    )
    if args.quick:
        config = dataclasses.replace(config, quick=True, **QUICK_SIZES)
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="datav2-")) if args.quick else default_v2_root()
    config.out = out
    _set_threads(config.threads)
    names = list(V2_TASKS) if args.task == "all" else [args.task]
    return _run([lambda n=n: build_v2_task(V2_TASKS[n], config) for n in names],
                lambda: write_v2_datasheet(out))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "v2":
        return main_v2(args)
    if args.k < 1 or args.prompts_per_domain < 2:
        print("error: --k must be >= 1 and --prompts-per-domain >= 2", file=sys.stderr)
        return 2
    config = BuildConfig(
        out=args.out or default_bench_root(), seed=args.seed, policy=args.policy,
        domains=args.domains, prompts_per_domain=args.prompts_per_domain, k=args.k,
        heldout=args.heldout, label_noise=sorted(set(args.label_noise)),
        artifacts_dir=args.artifacts_dir, cache_dir=args.cache_dir, quiet=args.quiet,
    )
    _set_threads(args.threads)
    names = list(TASKS) if args.task == "all" else [args.task]
    return _run([lambda n=n: build_task(TASKS[n], config) for n in names],
                lambda: write_datasheet(config.out))


if __name__ == "__main__":
    sys.exit(main())
