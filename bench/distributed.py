"""1 vs 2 processes for one reward-model training run on this machine (issue 18): what
``accelerate launch`` costs, and whether 2 data-parallel processes train the same model.

Every run starts in a fresh interpreter (imports counted, as a job's process pays them) and
trains ``train_rm`` on the example pairs (``examples/data``) with the same global batch:

- ``in-process, 1 thread`` / ``in-process, 2 threads``: the trainer in the job's own process,
  as a ``train_rm`` job without ``resources`` runs today;
- ``2 processes x 1 thread``: ``training.launch.launch`` over 2 CPU processes (gloo), as a job
  with ``resources: {"processes": 2}`` runs.

fp32 throughout (``bf16: false``). Two models: MiniLM (all-MiniLM-L6-v2, dropout switched off
so that runs are comparable value by value) for the step time and the loss curves, and the tiny test encoder for the launch
overhead alone (its steps cost nothing). Repetitions alternate the order of the variants.

    python -m bench.distributed                          # ~10 min on 2 busy cores
    python -m bench.distributed --reps 1 --steps 10      # a quick look

Writes bench/results/distributed.json and prints a table.

Decision rule (written before the first run):
- correct: every 2-process loss curve is within ``CURVE_TOLERANCE`` (absolute, every step) of
  the 1-thread in-process curve of the same repetition; otherwise the distributed trainer is
  wrong, whatever the timings say.
- overhead: the launch overhead is the paired difference of the time to the first step
  (2 processes − in-process with 2 threads), mean and 95 % t-interval over repetitions.
- scaling: 2 processes are faster per step than 1 process with 2 threads only if the 95 %
  interval of the paired step-time ratio lies below 1; above 1, slower; else no difference
  shown. CPU scaling is not the point of multi-process jobs (GPUs are); this row says what it
  costs here.
- also reported, descriptive only: the same two differences against the 1-thread in-process
  run (one thread per process on both sides).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
RESULTS = REPO / "bench" / "results" / "distributed.json"
CURVE_TOLERANCE = 1e-4
VARIANTS = ("in-process, 1 thread", "in-process, 2 threads", "2 processes x 1 thread")
BASELINE = "in-process, 2 threads"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}  # two-sided 95 % quantiles of Student's t by degrees of freedom


# ---------------------------------------------------------------------- one run (child)
class Timeline:
    """Progress callback recording (seconds since the interpreter started, step)."""

    def __init__(self, t0: float) -> None:
        self.t0, self.points = t0, []

    def on_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        self.points.append((time.time() - self.t0, step))

    def should_stop(self) -> bool:
        return False


def run_child(spec: dict[str, Any]) -> None:
    """Train once as ``spec`` says; write the timings next to the run."""
    import torch

    from training.bt.config import RMTrainConfig
    from training.bt.trainer import RMTrainer
    from training.launch import LaunchPlan, launch

    config = RMTrainConfig.from_dict(spec["config"])
    timeline = Timeline(spec["t0"])
    if spec["variant"] == "2 processes x 1 thread":
        launch("train-rm", config, LaunchPlan(processes=2, device="cpu",
                                              collective_timeout_seconds=300),
               Path(config.output_dir) / "launch", callback=timeline)
    else:
        torch.set_num_threads(1 if spec["variant"] == "in-process, 1 thread" else 2)
        RMTrainer(config, callback=timeline).train()
    wall = time.time() - spec["t0"]
    (Path(config.output_dir) / "timing.json").write_text(
        json.dumps({"wall_s": wall, "progress": timeline.points}))


# ---------------------------------------------------------------------- the benchmark
def _model_dirs(work: Path) -> dict[str, Path]:
    """MiniLM and the tiny encoder, both without dropout (comparable value by value)."""
    from tests import tiny
    from training.models import resolve_pretrained

    minilm = work / "minilm-no-dropout"
    shutil.copytree(resolve_pretrained("minilm", work / "artifacts"), minilm)
    config = json.loads((minilm / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (minilm / "config.json").write_text(json.dumps(config))
    return {"minilm": minilm, "tiny": tiny.build_encoder_rm(work / "tiny", dropout=0.0)}


def _one_run(model: str, model_dir: Path, variant: str, steps: int, args, out: Path) -> dict:
    config = {"train_file": str(DATA / "prefs.train.jsonl"),
              "eval_file": str(DATA / "prefs.test.jsonl"), "model": str(model_dir),
              "output_dir": str(out), "max_steps": steps, "batch_size": args.batch_size,
              "max_length": args.max_length, "learning_rate": 5e-5, "warmup_ratio": 0.1,
              "checkpoint_every": 0, "device": "cpu", "bf16": False}
    env = {**os.environ, "OMP_NUM_THREADS": "1" if variant != BASELINE else "2",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    spec = {"t0": time.time(), "variant": variant, "config": config}
    subprocess.run([sys.executable, "-m", "bench.distributed", "--child", json.dumps(spec)],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    timing = json.loads((out / "timing.json").read_text())
    points = timing["progress"]
    first = next(t for t, s in points if s >= 1)
    # steady state: from the first report at or past 20 % of the steps to the last before the end
    steady = [(t, s) for t, s in points if steps * 0.2 <= s < steps]
    step_s = ((steady[-1][0] - steady[0][0]) / (steady[-1][1] - steady[0][1])
              if len(steady) >= 2 and steady[-1][1] > steady[0][1] else float("nan"))
    last = max(t for t, s in points if s == steps)
    return {"model": model, "variant": variant, "steps": steps, "wall_s": timing["wall_s"],
            "first_step_s": first, "step_s": step_s, "finish_s": timing["wall_s"] - last,
            "curve": json.loads((out / "loss_history.json").read_text()),
            "metrics": json.loads((out / "metrics.json").read_text())}


def _interval(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]
    n = len(values)
    mean = statistics.fmean(values) if values else float("nan")
    half = T_975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def _scaling(ratio: dict[str, float]) -> str:
    if math.isnan(ratio["mean"]):
        return "not measured (too few steps to time)"
    if ratio["high"] < 1:
        return "2 processes faster per step"
    if ratio["low"] > 1:
        return "2 processes slower per step"
    return "no difference shown"


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per model: each variant's timings, paired differences against the baseline, curves."""
    summary: dict[str, Any] = {}
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        reps = sorted({r["rep"] for r in mine})
        by = {(r["rep"], r["variant"]): r for r in mine}
        rows = {}
        for variant in VARIANTS:
            got = [by[(rep, variant)] for rep in reps if (rep, variant) in by]
            rows[variant] = {key: _interval([r[key] for r in got])
                             for key in ("wall_s", "first_step_s", "step_s", "finish_s")}
        two, base, one = "2 processes x 1 thread", BASELINE, "in-process, 1 thread"
        paired = [(by[(rep, two)], by[(rep, base)]) for rep in reps]
        curve_gap = [max(abs(a - b) for a, b in zip(by[(rep, two)]["curve"], by[(rep, one)]["curve"],
                                                    strict=True)) for rep in reps]
        thread_gap = [max(abs(a - b) for a, b in zip(by[(rep, base)]["curve"],
                                                     by[(rep, one)]["curve"], strict=True))
                      for rep in reps]
        step_ratio = _interval([t["step_s"] / b["step_s"] for t, b in paired])
        single = [(by[(rep, two)], by[(rep, one)]) for rep in reps]
        summary[model] = {
            "variants": rows,
            "launch_overhead_s": _interval([t["first_step_s"] - b["first_step_s"] for t, b in paired]),
            "wall_difference_s": _interval([t["wall_s"] - b["wall_s"] for t, b in paired]),
            "step_time_ratio": step_ratio,
            "scaling": _scaling(step_ratio),
            "vs_1_thread": {
                "launch_overhead_s": _interval([t["first_step_s"] - b["first_step_s"]
                                                for t, b in single]),
                "step_time_ratio": _interval([t["step_s"] / b["step_s"] for t, b in single]),
            },
            "max_curve_gap_2proc_vs_1thread": max(curve_gap),
            "max_curve_gap_2threads_vs_1thread": max(thread_gap),
            "correct": max(curve_gap) <= CURVE_TOLERANCE,
            "eval_accuracy": {v: [by[(rep, v)]["metrics"].get("eval_accuracy") for rep in reps]
                              for v in VARIANTS},
        }
    return summary


def _table(summary: dict[str, Any]) -> str:
    lines = ["| model | variant | wall s | first step s | s / step | finish s |",
             "|---|---|---|---|---|---|"]

    def cell(iv: dict[str, float]) -> str:
        return f"{iv['mean']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"

    for model, entry in summary.items():
        for variant, row in entry["variants"].items():
            lines.append(f"| {model} | {variant} | {cell(row['wall_s'])} | "
                         f"{cell(row['first_step_s'])} | {cell(row['step_s'])} | "
                         f"{cell(row['finish_s'])} |")
    for model, entry in summary.items():
        lines.append(f"\n{model}: launch overhead {cell(entry['launch_overhead_s'])} s, "
                     f"step-time ratio {cell(entry['step_time_ratio'])} ({entry['scaling']}), "
                     f"max |Δ loss| 2 proc vs 1 thread {entry['max_curve_gap_2proc_vs_1thread']:.2e}"
                     f" (correct: {entry['correct']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24, help="MiniLM optimizer steps per run")
    parser.add_argument("--tiny-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return
    import accelerate
    import torch

    started = time.time()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        work = Path(tmp)
        models = _model_dirs(work)
        for rep in range(args.reps):
            order = VARIANTS if rep % 2 == 0 else tuple(reversed(VARIANTS))
            for model, steps in (("tiny", args.tiny_steps), ("minilm", args.steps)):
                for variant in order:
                    out = work / "runs" / f"{model}-{rep}-{VARIANTS.index(variant)}"
                    run = _one_run(model, models[model], variant, steps, args, out)
                    run["rep"] = rep
                    runs.append(run)
                    print(f"rep {rep} {model:6s} {variant:24s} wall {run['wall_s']:6.1f}s "
                          f"first step {run['first_step_s']:5.1f}s {run['step_s']:.3f} s/step",
                          flush=True)
    summary = summarize(runs)
    report = {
        "command": "python -m bench.distributed " + " ".join(argv if argv is not None else sys.argv[1:]),
        "decision_rule": __doc__.split("Decision rule (written before the first run):\n")[1].strip(),
        "curve_tolerance": CURVE_TOLERANCE,
        "settings": {"reps": args.reps, "minilm_steps": args.steps, "tiny_steps": args.tiny_steps,
                     "batch_size": args.batch_size, "max_length": args.max_length,
                     "data": "examples/data/prefs.{train,test}.jsonl"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "accelerate": accelerate.__version__},
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "curve"} | {"curve_first_last": [r["curve"][0], r["curve"][-1]]}
                 for r in runs],
        "bench_wall_s": time.time() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(summary))


if __name__ == "__main__":
    main()
