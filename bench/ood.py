"""OOD preference-learning benchmark (issue 6, the OOD-PL paper's table).

For each task (CSG, KA) and seed, on the benchmark's source domains:

- ``base``:  the reference policy, untouched;
- ``dpo``:   DPO on the pooled source training pairs, no target adaptation;
- ``bt``:    a MiniLM RM trained by plain Bradley–Terry on the pooled source pairs, then
             the meta-test adaptation on each held-out domain's prompts;
- ``meta``:  the OOD-PL meta-trained MiniLM RM, then the same adaptation.
- ``vanilla+rounds`` / ``metarm+adapt`` / ``metarm-phi+adapt`` (issue 7, ``bench/metarm_rows.py``):
             the ``bt`` RM, then R rounds on the held-out domain (sample from the current
             policy → update the RM on the pooled source pairs with those samples as the meta
             set → adapt the policy; the ``bt`` adaptation steps split over the rounds). Vanilla
             is meta_lr 0; ``metarm`` keeps the ascent (apply_at phi_prime), ``metarm-phi`` is
             the DESIGN §7 form (apply_at phi). Per round: the variance of reward differences
             among responses to the same prompt on the policy's samples.

Every policy is scored on each held-out domain's test split: PL accuracy (share of test
pairs with log π(y_w|x) > log π(y_l|x)) and the gold reward (CSG: VADER sentiment, KA:
token-F1 to the true gloss) of its samples on the test prompts (same seed for every method).
The adaptation draws come from the domain's shipped training samples, which are the
reference policy's own samples (the domain's sampling distribution p).

    python -m bench.ood --quick        # minutes: 1 seed, 2 held-out domains per task, short runs
    python -m bench.ood                # full: 3 seeds, 4 held-out domains per task (OOD-PL table)
    python -m bench.ood --methods bt,vanilla+rounds,metarm+adapt   # + the MetaRM rows
    python -m bench.ood --quick --methods base,bt,vanilla+rounds,metarm+adapt,metarm-phi+adapt
    python -m bench.ood --tasks csg --output a.json & python -m bench.ood --tasks ka --output b.json
    python -m bench.ood --merge a.json b.json   # one table, targets and figure from both
    python -m bench.ood --jobs 2                # the same, one process per (task, seed), 2 at once

Prints a table and writes bench/results/ood.json (rows, costs, targets).
Target (the paper's claim): per task, meta beats both bt and dpo on ≥ 3 of 4 held-out domains
(gold reward; PL accuracy reported as a second target). MetaRM (issue 7): metarm beats the
un-adapted RM (bt) on held-out PL accuracy and gold reward, and its final-round reward-difference
variance stays above vanilla's; figure bench/results/metarm_variance.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.metarm_rows import VARIANTS as METARM_VARIANTS
from bench.metarm_rows import metarm_targets, plot_variance, run_rounds
from training.adapt import AdaptConfig, Adapter, pl_accuracy
from training.checkpoint import write_json_atomic
from training.dpo import DPOConfig, DPOTrainer
from training.meta_train import MetaTask, MetaTrainConfig, MetaTrainer, rm_rewards
from training.policy import Policy
from training.reward_model import RewardModel

METHODS = ("base", "dpo", "bt", "meta", *METARM_VARIANTS)
# The OOD-PL table (issue 6). The MetaRM rows (issue 7) are opt-in through --methods: each
# costs R rounds of sampling, RM updates and adaptation per held-out domain.
DEFAULT_METHODS = ("base", "dpo", "bt", "meta")


@dataclass
class Settings:
    tasks: tuple[str, ...] = ("csg", "ka")
    seeds: tuple[int, ...] = (0, 1, 2)
    policy: str = "smollm2-135m"
    reward_model: str = "minilm"
    bench_root: str = "bench/data"
    work_dir: str = "artifacts/bench/ood"
    source_domains: int = 6  # how many source domains (first N of the task's list)
    heldout_domains: int = 4  # how many held-out domains
    # meta-training (and the same budget for BT and DPO). Sized for an hour for the OOD-PL
    # table on 2 cores: measured 60 min with --jobs 2 (a KA seed takes ~23 min and a CSG seed
    # ~14.5 min on one core, README)
    outer_steps: int = 16
    inner_steps: int = 1
    # α = 0.1 with per-token-mean margins in ℓ_PL: with summed log-probs (DESIGN's A) the
    # margins are tens of nats apart and meta-training leaves the outer loss flat (README)
    inner_lr: float = 1e-1
    pl_length_normalized: bool = True
    outer_lr: float = 3e-4  # AdamW lr of φ, for BT and meta alike
    beta: float = 0.1  # MiniLM rewards move by O(0.1) in short runs: β = 1 leaves w ≈ uniform
    responses_per_prompt: int = 4
    inner_batch_prompts: int = 2
    outer_batch_pairs: int = 8
    directional: str = "fd"  # two forward passes; jvp costs ~3-6x more on CPU
    dpo_beta: float = 0.1
    dpo_lr: float = 5e-4
    lora_r: int = 8
    # adaptation
    adapt_prompts: int = 8
    adapt_steps: int = 12
    adapt_lr: float = 5e-4
    adapt_batch_prompts: int = 4
    # evaluation
    eval_prompts: int = 6
    eval_responses: int = 2
    eval_pairs: int = 32
    # MetaRM rows (issue 7)
    metarm_rounds: int = 2
    metarm_steps: int = 6  # RM steps per round (MetaRM and vanilla alike)
    metarm_meta_lr: float = 0.1  # η (the README's toy value)
    metarm_meta_prompts: int = 8  # domain prompts sampled per round (k responses each)
    metarm_meta_batch: int = 2  # meta prompts per step
    metarm_diag_pairs: int = 128  # source pairs for the accuracy diagnostic

    @classmethod
    def quick(cls) -> Settings:
        return cls(seeds=(0,), source_domains=4, heldout_domains=2, outer_steps=16,
                   outer_batch_pairs=4, adapt_prompts=8, adapt_steps=12, adapt_batch_prompts=2,
                   eval_prompts=4, eval_responses=2, eval_pairs=16, metarm_rounds=2, metarm_steps=4,
                   metarm_meta_prompts=4, metarm_diag_pairs=32)


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def current_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.current_mb())
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRSS:
        self.peak_mb = self.current_mb()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class Cost:
    """Wall time and peak RSS accumulated per method."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    def measure(self, method: str):
        cost = self

        class _Block:
            def __enter__(self):
                gc.collect()
                self.start = time.monotonic()
                self.rss = PeakRSS().__enter__()

            def __exit__(self, *exc):
                self.rss.__exit__(*exc)
                cost.seconds[method] = cost.seconds.get(method, 0.0) + time.monotonic() - self.start
                cost.peak_mb[method] = max(cost.peak_mb.get(method, 0.0), self.rss.peak_mb)

        return _Block()


def gold_function(task: str):
    from bench.data.gold import sentiment, token_f1

    if task == "csg":
        return lambda row, response: sentiment(response)

    def ka(row, response: str) -> float:
        sources = row.meta.get("sources") or []
        reference = row.responses[sources.index("reference")] if "reference" in sources else row.responses[-1]
        return token_f1(response, reference)

    return ka


def sampling_params(task: str):
    from bench.data.tasks import TASKS

    return TASKS[task].params


def policy_draws(rows):
    """Only the reference policy's own samples of each prompt (draws from p): the true
    continuation/gloss the benchmark also ships would leak the target's labels."""
    out = []
    for row in rows:
        sources = row.meta.get("sources")
        if not sources:
            out.append(row)
            continue
        kept = [y for y, src in zip(row.responses, sources, strict=True) if src == "policy"]
        if len(kept) >= 2:
            out.append(replace(row, responses=kept))
    return out


def evaluate_policy(policy: Policy, rows, pairs, task: str, seed: int, s: Settings) -> dict[str, float]:
    params = sampling_params(task)
    gold = gold_function(task)
    samples = policy.sample([r.prompt for r in rows], s.eval_responses,
                            max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                            top_p=params.top_p, seed=10_000 + seed)
    golds = [gold(r, y) for r, group in zip(rows, samples, strict=True) for y in group]
    return {"pl_accuracy": pl_accuracy(policy, pairs) or 0.0, "gold": sum(golds) / len(golds)}


def bt_train(pairs, s: Settings, seed: int, out: Path) -> tuple[Path, float]:
    """Plain Bradley–Terry on the pooled pairs (the project's RMTrainer); returns (dir, s/step)."""
    from training.rm_trainer import RMTrainConfig, RMTrainer

    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "pooled_pairs.jsonl"
    with open(train_file, "w") as handle:
        for p in pairs:
            handle.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                     "domain": p.domain}) + "\n")
    config = RMTrainConfig(train_file=str(train_file), model=s.reward_model, output_dir=str(out / "run"),
                           max_steps=s.outer_steps, batch_size=s.outer_batch_pairs,
                           learning_rate=s.outer_lr, seed=seed, checkpoint_every=0, warmup_ratio=0.0,
                           lr_scheduler="constant")
    started = time.monotonic()
    result = RMTrainer(config).train()
    return Path(result.model_dir), (time.monotonic() - started) / s.outer_steps


def bt_step_seconds(rm_ref: str, pairs, batch: int, steps: int = 4) -> float:
    """Time of one BT optimizer step of the RM alone (same batch size as the outer step)."""
    from training.models import resolve_pretrained

    rm = RewardModel.from_pretrained(resolve_pretrained(rm_ref), device="cpu")
    rm.model.eval()
    opt = torch.optim.AdamW(rm.model.parameters(), lr=1e-6)
    chunk = list(pairs)[:batch]
    prompts = [p.prompt for p in chunk]
    times = []
    for _ in range(steps):
        start = time.monotonic()
        r = rm_rewards(rm, prompts * 2, [p.chosen for p in chunk] + [p.rejected for p in chunk])
        loss = -F.logsigmoid(r[: len(chunk)] - r[len(chunk):]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.monotonic() - start)
    return statistics.median(times[1:] if len(times) > 1 else times)


def meta_train_config(s: Settings, *, chat: bool, output_dir: Path, seed: int,
                      eval_pairs: int = 8) -> MetaTrainConfig:
    """The benchmark's meta-training run (also what ``bench.meta_levers`` varies)."""
    return MetaTrainConfig(
        reward_model=s.reward_model, policy=s.policy, policy_lora_r=s.lora_r, chat_template=chat,
        outer_steps=s.outer_steps, inner_steps=s.inner_steps, inner_lr=s.inner_lr,
        outer_lr=s.outer_lr, beta=s.beta, responses_per_prompt=s.responses_per_prompt,
        inner_batch_prompts=s.inner_batch_prompts, outer_batch_pairs=s.outer_batch_pairs,
        directional=s.directional, pl_length_normalized=s.pl_length_normalized,
        output_dir=str(output_dir), checkpoint_every=0, eval_pairs=eval_pairs,
        max_response_tokens=64, device="cpu", seed=seed)


def run_seed(task: str, seed: int, s: Settings, cost: Cost,
             methods: tuple[str, ...] = METHODS) -> tuple[list[dict], dict, list[dict]]:
    """Rows of one task and seed; (rows, step costs, MetaRM per-round records)."""
    from training.data import load_benchmark

    bench = load_benchmark(task, root=s.bench_root)
    sources = bench.source_domains[: s.source_domains]
    heldout = bench.heldout_domains[: s.heldout_domains]
    chat = sampling_params(task).chat
    work = Path(s.work_dir) / task / f"seed{seed}"
    meta_tasks = [MetaTask(d, policy_draws(bench.samples(d, "train")), bench.pairs(d, "train"))
                  for d in sources]
    pooled = [p for t in meta_tasks for p in t.pairs]
    common = {"device": "cpu", "seed": seed}
    rounds_methods = [m for m in METHODS if m in METARM_VARIANTS and m in methods]
    need_bt = "bt" in methods or bool(rounds_methods)

    costs: dict[str, Any] = {}
    meta_result = dpo = None
    if "meta" in methods:
        with cost.measure(f"{task}/meta"):
            meta_config = meta_train_config(s, chat=chat, output_dir=work / "meta", seed=seed)
            meta_result = MetaTrainer(meta_config, tasks=meta_tasks).train()
        costs["meta_step_s"] = meta_result.metrics["seconds_per_outer_step"]
        for key in ("outer_pl_accuracy", "outer_loss", "rm_accuracy"):  # after, and before (step 0)
            costs[f"meta_{key}"] = meta_result.metrics[key]
            costs[f"meta_initial_{key}"] = meta_result.metrics.get(f"initial_{key}")
    bt_dir = None
    if need_bt:
        with cost.measure(f"{task}/bt"):
            bt_dir, bt_trainer_step = bt_train(pooled, s, seed, work / "bt")
        costs["bt_trainer_step_s"] = bt_trainer_step
        if "meta" in methods:
            costs["bt_step_s"] = bt_step_seconds(s.reward_model, pooled, s.outer_batch_pairs)
    if "dpo" in methods:
        with cost.measure(f"{task}/dpo"):
            dpo = DPOTrainer(DPOConfig(policy=s.policy, lora_r=s.lora_r, chat_template=chat,
                                       steps=s.outer_steps, batch_pairs=s.outer_batch_pairs,
                                       beta=s.dpo_beta, learning_rate=s.dpo_lr, checkpoint_every=0,
                                       output_dir=str(work / "dpo"), max_response_tokens=64, **common),
                             pairs=pooled)
            dpo.train()

    base = (Policy.from_pretrained(s.policy, device="cpu", chat_template=chat, trainable=False)
            if "base" in methods else None)
    rows, round_records = [], []
    for domain in heldout:
        test_rows = bench.samples(domain, "test")[: s.eval_prompts]
        test_pairs = bench.pairs(domain, "test")[: s.eval_pairs]
        train_rows = policy_draws(bench.samples(domain, "train"))[: s.adapt_prompts]
        results: dict[str, dict[str, float]] = {}
        if base is not None:
            with cost.measure(f"{task}/base"):
                results["base"] = evaluate_policy(base, test_rows, test_pairs, task, seed, s)
        if dpo is not None:
            with cost.measure(f"{task}/dpo"):
                results["dpo"] = evaluate_policy(dpo.policy, test_rows, test_pairs, task, seed, s)
        adapted = []
        if "bt" in methods:
            adapted.append(("bt", bt_dir))
        if meta_result is not None:
            adapted.append(("meta", Path(meta_result.rm_dir)))
        for method, rm_dir in adapted:
            with cost.measure(f"{task}/{method}"):
                adapter = Adapter(
                    AdaptConfig(
                        domain=domain, policy=s.policy, reward_model=str(rm_dir), lora_r=s.lora_r,
                        chat_template=chat, use_given_responses=True,
                        responses_per_prompt=s.responses_per_prompt, beta=s.beta,
                        steps=s.adapt_steps, learning_rate=s.adapt_lr,
                        batch_prompts=s.adapt_batch_prompts, eval_prompts=0, eval_pairs=0,
                        eval_before=False, checkpoint_every=0, max_response_tokens=64,
                        output_dir=str(work / f"adapt-{method}-{domain}"), **common),
                    prompts=train_rows)
                adapter.train()
                results[method] = evaluate_policy(adapter.policy, test_rows, test_pairs, task, seed, s)
                del adapter
        for method in rounds_methods:
            with cost.measure(f"{task}/{method}"):
                policy, records = run_rounds(
                    method, task=task, domain=domain, seed=seed, s=s, rm_start=bt_dir,
                    source_pairs=pooled, train_rows=train_rows, chat=chat, params=sampling_params(task),
                    out=work / f"rounds-{method.replace('+', '_')}-{domain}")
                results[method] = evaluate_policy(policy, test_rows, test_pairs, task, seed, s)
                round_records.extend(records)
                del policy
                gc.collect()
        for method, values in results.items():
            rows.append({"task": task, "domain": domain, "method": method, "seed": seed, **values})
        print(f"  {task} seed {seed} {domain}: " + ", ".join(
            f"{m} gold {v['gold']:.3f} pl {v['pl_accuracy']:.3f}" for m, v in results.items()), flush=True)
    del base, dpo
    gc.collect()
    return rows, costs, round_records


def aggregate(per_seed: list[dict]) -> list[dict]:
    keys = sorted({(r["task"], r["domain"], r["method"]) for r in per_seed},
                  key=lambda k: (k[0], k[1], METHODS.index(k[2])))
    out = []
    for task, domain, method in keys:
        mine = [r for r in per_seed if (r["task"], r["domain"], r["method"]) == (task, domain, method)]
        row = {"task": task, "domain": domain, "method": method, "seeds": len(mine)}
        for metric in ("gold", "pl_accuracy"):
            values = [r[metric] for r in mine]
            row[f"{metric}_mean"] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def targets(rows: list[dict], s: Settings) -> list[dict]:
    found = []
    for task in s.tasks:
        domains = sorted({r["domain"] for r in rows if r["task"] == task})
        present = {r["method"] for r in rows if r["task"] == task}
        if not domains or not {"meta", "bt", "dpo"} <= present:
            continue  # a --methods run without the OOD-PL comparison
        threshold = 3 if len(domains) >= 4 else math.ceil(0.75 * len(domains))
        for metric in ("gold", "pl_accuracy"):
            def value(domain, method, metric=metric, task=task):
                return next(r[f"{metric}_mean"] for r in rows
                            if (r["task"], r["domain"], r["method"]) == (task, domain, method))
            wins = sum(value(d, "meta") > max(value(d, "bt"), value(d, "dpo")) for d in domains)
            found.append({"name": f"{task}: meta beats bt and dpo on {metric} (held-out domains won "
                                  f"of {len(domains)})",
                          "measured": wins, "threshold": threshold, "met": wins >= threshold})
    return found


def print_table(rows: list[dict]) -> None:
    print(f"\n{'task':5} {'domain':16} {'method':16} {'gold':>16} {'PL accuracy':>16}")
    for r in rows:
        print(f"{r['task']:5} {r['domain']:16} {r['method']:16} "
              f"{r['gold_mean']:8.3f} ± {r['gold_std']:5.3f} "
              f"{r['pl_accuracy_mean']:8.3f} ± {r['pl_accuracy_std']:5.3f}")


def step_summary(step_costs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per task: the meta step's cost against a BT step of the same batch (mean over seeds)."""
    summary = {}
    for task, items in step_costs.items():
        # runs without meta-training (MetaRM rows alone, say) have no meta step to compare
        timed = [c for c in items if "meta_step_s" in c and "bt_step_s" in c]
        summary[task] = {"runs": items}
        if timed:
            meta = statistics.fmean(c["meta_step_s"] for c in timed)
            bt = statistics.fmean(c["bt_step_s"] for c in timed)
            summary[task].update({"meta_step_s": meta, "bt_step_s": bt, "ratio": meta / bt})
    return summary


def build_report(s: Settings, per_seed: list[dict], round_records: list[dict],
                 step_costs: dict[str, list[dict]], method_costs: dict[str, dict],
                 figure: Path | None) -> dict[str, Any]:
    """Table rows, targets and MetaRM curves from per-seed results (one run or merged runs)."""
    rows = aggregate(per_seed)
    report = {"settings": asdict(s), "rows": rows, "per_seed": per_seed,
              "metarm_rounds": round_records, "step_cost": step_summary(step_costs),
              "method_cost": method_costs,
              "targets": targets(rows, s) + metarm_targets(per_seed, round_records, s.tasks)}
    if round_records:
        from bench.metarm_rows import variance_curves

        report["metarm_variance_curves"] = variance_curves(round_records)
        if figure is not None:
            plot_variance(round_records, figure)
    return report


def print_report(report: dict[str, Any]) -> None:
    print_table(report["rows"])
    for task, summary in report["step_cost"].items():
        if "ratio" in summary:
            print(f"{task}: meta step {summary['meta_step_s']:.2f}s vs BT step "
                  f"{summary['bt_step_s']:.3f}s → {summary['ratio']:.1f}×")
    for task, curves in report.get("metarm_variance_curves", {}).items():
        for method, points in curves.items():
            print(f"{task} {method:16} diff variance by round: " + " ".join(f"{v:.4g}" for v in points))
    for name, value in report["method_cost"].items():
        print(f"{name:24} {value['wall_time_s']:8.1f}s  peak RSS {value['peak_rss_mb']} MB")
    for t in report["targets"]:
        print(f"[{'met' if t['met'] else 'NOT met'}] {t['name']}: {t['measured']} (threshold {t['threshold']})")


def merge(paths: list[Path], output: Path, figure: Path | None, *,
          partial_ok: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One report from several runs with the same settings (e.g. one per task, run on separate
    cores). Refuses runs whose settings differ in anything but tasks and seeds, or that repeat
    a (task, seed). An interrupted run holds only the seeds it finished (it is written after
    each one); ``partial_ok`` takes those, and the report lists the seeds per task."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    incomplete = [str(p) for p, run in zip(paths, runs, strict=True) if not run.get("complete")]
    if incomplete and not partial_ok:
        raise SystemExit(f"--merge: not complete (interrupted?): {', '.join(incomplete)}")

    def comparable(run: dict) -> dict:
        return {k: v for k, v in run["settings"].items() if k not in ("tasks", "seeds", "work_dir")}

    if any(comparable(run) != comparable(runs[0]) for run in runs[1:]):
        raise SystemExit("--merge: the runs' settings differ; merge only runs of one configuration")
    seen: set[tuple[str, int, str]] = set()
    for run in runs:
        keys = {(r["task"], r["seed"], r["method"]) for r in run["per_seed"]}
        if keys & seen:
            raise SystemExit(f"--merge: (task, seed, method) repeated: {sorted(keys & seen)[:3]}")
        seen |= keys
    settings = dict(runs[0]["settings"])
    settings["tasks"] = tuple(dict.fromkeys(t for run in runs for t in run["settings"]["tasks"]))
    settings["seeds"] = tuple(sorted({r["seed"] for run in runs for r in run["per_seed"]}))
    s = Settings(**settings)
    step_costs: dict[str, list[dict]] = {}
    method_costs: dict[str, dict] = {}
    for run in runs:
        for task, summary in run["step_cost"].items():
            step_costs.setdefault(task, []).extend(summary["runs"])
        for name, value in run["method_cost"].items():
            task, _, method = name.partition("/")
            if method not in run["methods"]:
                # e.g. the BT RM that a run of MetaRM rows alone trained to start its rounds from:
                # not the cost of the bt rows another run reported
                name = f"{task}/{method} (prerequisite of {', '.join(run['methods'])})"
            total = method_costs.setdefault(name, {"wall_time_s": 0.0, "peak_rss_mb": 0})
            total["wall_time_s"] = round(total["wall_time_s"] + value["wall_time_s"], 1)
            total["peak_rss_mb"] = max(total["peak_rss_mb"], value["peak_rss_mb"])
    report = build_report(s, [r for run in runs for r in run["per_seed"]],
                          [r for run in runs for r in run["metarm_rounds"]], step_costs,
                          method_costs, figure)
    seeds_per_task = {task: sorted({r["seed"] for r in report["per_seed"] if r["task"] == task})
                      for task in s.tasks}
    report.update({"quick": runs[0]["quick"], "complete": not incomplete,
                   "seeds_per_task": seeds_per_task,
                   "methods": list(dict.fromkeys(m for run in runs for m in run["methods"])),
                   "merged_runs": [{"file": str(p), "command": run.get("command"),
                                    "tasks": run["settings"]["tasks"], "complete": run["complete"],
                                    "wall_time_s": run["wall_time_s"]}
                                   for p, run in zip(paths, runs, strict=True)],
                   "wall_time_s": sum(run["wall_time_s"] for run in runs),
                   "torch_threads": runs[0].get("torch_threads"), **(extra or {})})
    write_json_atomic(output, report)
    print_report(report)
    print(f"seeds per task: {seeds_per_task}")
    print(f"wrote {output} (merged {len(runs)} runs)")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--bench-root", default="bench/data")
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
            "--bench-root", args.bench_root, "--threads", str(args.threads)]
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


if __name__ == "__main__":
    raise SystemExit(main())
