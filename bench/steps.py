"""Training-step cost, fp32 against bf16 autocast: an OOD-PL meta-training outer step and a
meta-test adaptation step (and the meta step with today's default hypergradient,
``precomputed``, whose one-time set-up is timed apart), with the OOD benchmark's models and
sizes (SmolLM2-135M + LoRA r=8 policy, MiniLM RM, batches of ``bench.ood``'s full mode), on
one task's source data.

    python -m bench.steps                  # ~10 minutes on one core of an idle machine
    python -m bench.steps --task ka --steps 4

Both precisions run the same steps from the same start in one process (fp32 first, then
bf16); the first step of each is a warm-up and not timed. Writes ``bench/results/steps.json``.
Target (issue 16): each step at least 2x faster in bf16 than in fp32 (the default before it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench.ood.run import meta_train_config, policy_draws, sampling_params
from bench.ood.settings import Settings
from training.data import load_benchmark
from training.oodpl.adapt import Adapter
from training.oodpl.config import AdaptConfig
from training.oodpl.meta_train import MetaTask, MetaTrainer

RESULTS = Path(__file__).parent / "results" / "steps.json"


def meta_step_seconds(task: str, bf16: bool, steps: int, work: Path,
                      hypergradient: str = "first_order", setup: dict | None = None) -> list[float]:
    s = Settings()
    bench = load_benchmark(task)
    tasks = [MetaTask(d, policy_draws(bench.samples(d, "train")), bench.pairs(d, "train"))
             for d in bench.source_domains[: s.source_domains]]
    config = meta_train_config(s, chat=sampling_params(task).chat, output_dir=work / "meta", seed=0)
    config.outer_steps, config.bf16, config.hypergradient = steps + 1, bf16, hypergradient
    trainer = MetaTrainer(config, tasks=tasks)
    trainer.setup()
    if hypergradient == "precomputed":
        started = time.perf_counter()
        trainer.precompute()
        if setup is not None:
            setup["precompute_s"] = time.perf_counter() - started
            setup["rows"] = sum(len(t) for t in trainer._coefficients.values())
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        trainer.outer_step(step)
        times.append(time.perf_counter() - started)
    return times[1:]


def adapt_step_seconds(task: str, bf16: bool, steps: int, work: Path) -> list[float]:
    s = Settings()
    bench = load_benchmark(task)
    domain = bench.heldout_domains[0]
    rows = policy_draws(bench.samples(domain, "train"))[: s.adapt_prompts]
    config = AdaptConfig(domain=domain, policy=s.policy, reward_model=s.reward_model, lora_r=s.lora_r,
                         chat_template=sampling_params(task).chat, use_given_responses=True,
                         responses_per_prompt=s.responses_per_prompt, beta=s.beta, steps=steps + 1,
                         learning_rate=s.adapt_lr, batch_prompts=s.adapt_batch_prompts, eval_prompts=0,
                         eval_pairs=0, eval_before=False, eval_holdout=0,  # every row trains
                         checkpoint_every=0, max_response_tokens=64,
                         output_dir=str(work / f"adapt-{bf16}"), device="cpu", seed=0, bf16=bf16)
    times: list[float] = []

    class Timer:
        last = time.perf_counter()

        def on_progress(self, step, total, metrics):
            now = time.perf_counter()
            times.append(now - Timer.last)
            Timer.last = now

        def should_stop(self):
            return False

    Timer.last = time.perf_counter()
    Adapter(config, Timer(), prompts=rows).train()
    return times[1:]  # the first interval holds the set-up: loading, scoring the draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="csg")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", default="artifacts/bench/steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)  # a finished run left there would resume to its end
    report: dict = {"task": args.task, "steps": args.steps, "threads": args.threads, "rows": []}
    for kind, measure in (("meta-training outer step (first_order)", meta_step_seconds),
                          ("adaptation step", adapt_step_seconds)):
        times = {name: measure(args.task, bf16, args.steps, work / name)
                 for name, bf16 in (("float32", False), ("bfloat16 autocast", True))}
        medians = {name: statistics.median(t) for name, t in times.items()}
        speedup = medians["float32"] / medians["bfloat16 autocast"]
        report["rows"].append({"step": kind, "seconds": times, "median_s": medians, "speedup": speedup})
        print(f"{kind}: fp32 {medians['float32']:.2f} s, bf16 {medians['bfloat16 autocast']:.2f} s "
              f"-> {speedup:.2f}x", flush=True)
    report["targets"] = [{"name": f"{row['step']}: bf16 speed-up over fp32", "measured": row["speedup"],
                          "threshold": 2.0, "met": row["speedup"] >= 2.0} for row in report["rows"]]
    # today's default meta step (precomputed hypergradient, bf16) against the fp32 first-order one
    setup: dict = {}
    times = meta_step_seconds(args.task, True, args.steps, work / "precomputed", "precomputed", setup)
    before = report["rows"][0]["median_s"]["float32"]
    speedup = before / statistics.median(times)
    report["rows"].append({"step": "meta-training outer step (precomputed, bf16)", "seconds": times,
                           "median_s": statistics.median(times), "speedup_over_fp32_first_order": speedup,
                           "one_time_precompute_s": setup.get("precompute_s"),
                           "precomputed_rows": setup.get("rows")})
    print(f"meta step, precomputed + bf16: {statistics.median(times):.3f} s -> {speedup:.1f}x "
          f"(one-time precompute {setup.get('precompute_s', 0):.1f} s over {setup.get('rows')} samples)")
    report["targets"].append({"name": "meta-training outer step: the default (precomputed, bf16) over "
                              "fp32 first_order", "measured": speedup, "threshold": 2.0, "met": speedup >= 2.0})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
