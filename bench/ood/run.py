"""One (task, seed) of the OOD benchmark: train the RMs and policies, adapt, evaluate; and the
cost meters."""

from __future__ import annotations

import gc
import json
import os
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.datagen.gold import sentiment, token_f1
from bench.datagen.tasks import TASKS
from bench.metarm_rows import VARIANTS as METARM_VARIANTS
from bench.metarm_rows import run_rounds
from bench.ood.settings import METHODS, Settings
from training.bt.config import RMTrainConfig
from training.bt.trainer import RMTrainer
from training.data import load_benchmark
from training.losses import bradley_terry_loss
from training.models import resolve_pretrained
from training.oodpl.adapt import Adapter, pl_accuracy
from training.oodpl.config import AdaptConfig, DPOConfig, MetaTrainConfig
from training.oodpl.dpo import DPOTrainer
from training.oodpl.meta_train import MetaTask, MetaTrainer, rm_rewards
from training.policy import Policy
from training.reward_model import RewardModel


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
    if task == "csg":
        return lambda row, response: sentiment(response)

    def ka(row, response: str) -> float:
        sources = row.meta.get("sources") or []
        reference = row.responses[sources.index("reference")] if "reference" in sources else row.responses[-1]
        return token_f1(response, reference)

    return ka


def sampling_params(task: str):
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
    rm = RewardModel.from_pretrained(resolve_pretrained(rm_ref), device="cpu")
    rm.model.eval()
    opt = torch.optim.AdamW(rm.model.parameters(), lr=1e-6)
    chunk = list(pairs)[:batch]
    prompts = [p.prompt for p in chunk]
    times = []
    for _ in range(steps):
        start = time.monotonic()
        r = rm_rewards(rm, prompts * 2, [p.chosen for p in chunk] + [p.rejected for p in chunk])
        loss = bradley_terry_loss(r[: len(chunk)] - r[len(chunk):])
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
        directional=s.directional,
        # the v1 tables' settings: first-order hypergradient, margins from a boolean switch
        hypergradient="first_order", outer_margin="per_token" if s.pl_length_normalized else "sum",
        output_dir=str(output_dir), checkpoint_every=0, eval_pairs=eval_pairs,
        max_response_tokens=64, device="cpu", seed=seed)


def run_seed(task: str, seed: int, s: Settings, cost: Cost,
             methods: tuple[str, ...] = METHODS) -> tuple[list[dict], dict, list[dict]]:
    """Rows of one task and seed; (rows, step costs, MetaRM per-round records)."""
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
                        # evaluated below on the test split: every training row trains
                        eval_before=False, eval_holdout=0, checkpoint_every=0, max_response_tokens=64,
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


