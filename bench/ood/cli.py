"""``python -m bench.ood``: run the OOD benchmark (one process, or one per (task, seed) with
``--jobs``), or ``--merge`` finished runs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.ood import __doc__ as DESCRIPTION
from bench.ood.merge import merge
from bench.ood.report import build_report, print_report
from bench.ood.run import Cost, run_seed
from bench.ood.settings import DEFAULT_METHODS, METHODS, Settings
from training.atomic import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few minutes: 1 seed, 2 held-out domains")
    parser.add_argument("--tasks", default=None, help="comma list (default csg,ka)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (first-seed..+N-1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="start the seeds here (run a missing seed alone, then --merge it)")
    parser.add_argument("--methods", default=None,
                        help=f"comma list of methods to run (default {','.join(DEFAULT_METHODS)}; "
                             f"all: {','.join(METHODS)})")
    parser.add_argument("--figure", default="bench/results/metarm_variance.png",
                        help="MetaRM reward-difference variance figure (written when MetaRM rows run)")
    parser.add_argument("--bench-root", default=None, help="default: the installed benchmark")
    parser.add_argument("--work-dir", default="artifacts/bench/ood")
    parser.add_argument("--output", default="bench/results/ood.json")
    parser.add_argument("--outer-steps", type=int, default=None)
    parser.add_argument("--heldout-domains", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a Settings field, e.g. --set beta=0.1 (repeatable)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared CPU; 0 = torch default)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="RUN.json",
                        help="write --output from these complete runs (e.g. one per task) and exit")
    parser.add_argument("--partial-ok", action="store_true",
                        help="--merge also takes interrupted runs: their finished (task, seed)s count")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run each (task, seed) as its own process, this many at once (one per "
                             "core), then --merge them into --output")
    return parser


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    s = Settings.quick() if args.quick else Settings()
    s = replace(s, bench_root=args.bench_root, work_dir=args.work_dir)
    if args.tasks:
        s = replace(s, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()))
    if args.seeds or args.first_seed:
        count = args.seeds or len(s.seeds)
        s = replace(s, seeds=tuple(range(args.first_seed, args.first_seed + count)))
    if args.outer_steps:
        s = replace(s, outer_steps=args.outer_steps)
    if args.heldout_domains:
        s = replace(s, heldout_domains=args.heldout_domains)
    for item in args.overrides:
        key, _, raw = item.partition("=")
        if key not in Settings.__dataclass_fields__ or key in ("tasks", "seeds"):
            parser.error(f"--set: unknown or list field {key!r}")
        current = getattr(s, key)
        value = raw.lower() in ("1", "true", "yes") if isinstance(current, bool) else type(current)(raw)
        s = replace(s, **{key: value})
    return s


def unit_argv(args: argparse.Namespace, task: str, seed: int, output: Path, work_dir: Path) -> list[str]:
    """The command that runs one (task, seed) of this invocation alone, everything else equal."""
    argv = [sys.executable, "-m", "bench.ood", "--tasks", task, "--first-seed", str(seed), "--seeds", "1",
            "--figure", "", "--output", str(output), "--work-dir", str(work_dir),
            "--threads", str(args.threads)]
    if args.bench_root:
        argv += ["--bench-root", args.bench_root]
    if args.quick:
        argv.append("--quick")
    if args.methods:
        argv += ["--methods", args.methods]
    if args.outer_steps:
        argv += ["--outer-steps", str(args.outer_steps)]
    if args.heldout_domains:
        argv += ["--heldout-domains", str(args.heldout_domains)]
    for item in args.overrides:
        argv += ["--set", item]
    return argv


# Measured full-mode cost of one seed on one core (KA's responses are longer); the longest units
# start first so that the last process to finish is a short one.
UNIT_MINUTES = {"ka": 23, "csg": 15}


def run_jobs(args: argparse.Namespace, s: Settings) -> dict[str, Any]:
    """Spread the (task, seed) units over ``args.jobs`` processes, then merge their reports.
    Each unit's log is beside its report; a failed unit fails the run, naming its log."""
    units = sorted(((task, seed) for task in s.tasks for seed in s.seeds),
                   key=lambda unit: -UNIT_MINUTES.get(unit[0], 0))
    out_dir = Path(args.work_dir) / "units"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(args.threads, 1)), "TOKENIZERS_PARALLELISM": "false"}

    def run(unit: tuple[str, int]) -> Path:
        task, seed = unit
        output = out_dir / f"{task}-{seed}.json"
        log = out_dir / f"{task}-{seed}.log"
        argv = unit_argv(args, task, seed, output, Path(args.work_dir) / f"{task}-{seed}")
        print(f"{task} seed {seed}: started, log {log}", flush=True)
        with log.open("w") as sink:
            code = subprocess.run(argv, env=env, stdout=sink, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"{task} seed {seed} failed (exit {code}); see {log}")
        print(f"{task} seed {seed}: done", flush=True)
        return output

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outputs = dict(zip(units, pool.map(run, units), strict=True))
    in_order = sorted(outputs, key=lambda unit: (s.tasks.index(unit[0]), unit[1]))
    # the merged wall_time_s sums the units; this is what the caller waited
    waited = {"jobs": args.jobs, "parallel_wall_time_s": time.monotonic() - started}
    print(f"--jobs {args.jobs}: {waited['parallel_wall_time_s'] / 60:.1f} min wall time")
    return merge([outputs[unit] for unit in in_order], Path(args.output),
                 Path(args.figure) if args.figure else None, extra=waited)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, Path(args.output), Path(args.figure) if args.figure else None,
              partial_ok=args.partial_ok)
        return 0
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.jobs > 1:
        run_jobs(args, settings_from_args(args, parser))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    s = settings_from_args(args, parser)
    methods = DEFAULT_METHODS
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            parser.error(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})")
    started = time.monotonic()
    cost = Cost()
    per_seed, step_costs, round_records = [], {}, []
    command = "python -m bench.ood " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(final: bool) -> dict[str, Any]:
        method_costs = {m: {"wall_time_s": round(cost.seconds[m], 1), "peak_rss_mb": round(cost.peak_mb[m])}
                        for m in sorted(cost.seconds)}
        report = build_report(s, per_seed, round_records, step_costs, method_costs,
                              Path(args.figure) if args.figure else None)
        report.update({"quick": args.quick, "methods": list(methods), "complete": final,
                       "command": command, "wall_time_s": time.monotonic() - started,
                       "torch_threads": torch.get_num_threads()})
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.output), report)
        return report

    for task in s.tasks:
        for seed in s.seeds:
            print(f"{task} seed {seed}: {', '.join(methods)} on held-out domains", flush=True)
            rows, costs, records = run_seed(task, seed, s, cost, methods)
            per_seed.extend(rows)
            round_records.extend(records)
            step_costs.setdefault(task, []).append(costs)
            write(final=False)  # partial results survive an interrupted run
    print_report(write(final=True))
    print(f"wrote {args.output} in {time.monotonic() - started:.0f}s")
    return 0

