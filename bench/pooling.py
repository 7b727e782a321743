"""CLS against mean pooling for reward models built from all-MiniLM-L6-v2 (issue 15): a linear
Bradley–Terry probe on the frozen encoder's features, on the v1 CSG benchmark.

Features of each (prompt, response), rendered and tokenized exactly as the RM renders them
(``RewardModel.encode_many``: a BERT text pair), from one forward pass of the encoder:

- ``cls``: the BERT pooler, tanh(W·h_CLS + b): what ``AutoModelForSequenceClassification``'s
  head reads (``pooling: cls``);
- ``mean``: Σ_t m_t h_t / Σ_t m_t over the last hidden states: what the mean-pooled RM's head
  reads (``pooling: mean``, :mod:`training.pooled_encoder`);
- ``cls_raw``: h_CLS itself (a control: the first token without the pooler).

Probe: r(x) = w·z(x), z the features standardized with the fitting pairs' mean and std, w
minimizing the convex Bradley–Terry loss

    L(w) = (1/n) Σ_i log(1 + exp(−w·(z_chosen,i − z_rejected,i))) + λ‖w‖²   (L-BFGS)

Seed s fits on a random 80 % of the source domains' train pairs (drawn with seed s); λ is
chosen from LAMBDAS by accuracy on the source domains' test pairs (the validation split; the
held-out domains never choose anything). Accuracy = share of pairs with r(chosen) > r(rejected).
Reported per seed and as seed means: source validation, held-out test pairs (the held-out
domains' test split) and all held-out pairs (their train + test splits: more pairs, more
power), and the paired difference mean − cls on the held-out pairs, each pair's correctness
averaged over the seeds, with a 95 % bootstrap CI that resamples prompts (pairs of one prompt
share responses).

Decision rule, written before the run: ``pooling: auto`` pools by the mean for encoders whose
own sentence-transformers Pooling says mean when mean's source-validation accuracy (seed mean)
is at least cls's; otherwise ``auto`` keeps the cls head. The held-out numbers corroborate and
are reported whatever they say.

    OMP_NUM_THREADS=1 python -m bench.pooling            # ~70 s on one thread
    python -m bench.pooling --max-pairs 64 --seeds 1     # a smoke run

Writes bench/results/pooling.json (config, rows, paired differences, decision, targets).

``--finetune`` corroborates with the real thing instead of a probe: ``train-rm`` with
``pooling: cls`` and ``pooling: mean`` from minilm on all the source train pairs (1 epoch,
max_length 128, batch 16, lr 5e-5; seed = head init and data order), the same accuracies and
paired difference; it decides nothing. Writes bench/results/pooling_finetune.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from training.atomic import write_json_atomic, write_jsonl_atomic
from training.bt.config import RMTrainConfig
from training.bt.trainer import RMTrainer
from training.data import PreferencePair, load_benchmark
from training.evaluate import score_pairs
from training.models import minilm_dir
from training.pooled_encoder import mean_pool
from training.reward_model import RewardModel

FEATURES = ("cls", "mean", "cls_raw")
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1)
FIT_FRACTION = 0.8
MAX_TOKENS = 256
BOOTSTRAP = 10_000
RESULTS = Path(__file__).parent / "results" / "pooling.json"
FINETUNE_RESULTS = Path(__file__).parent / "results" / "pooling_finetune.json"
FINETUNE = {"epochs": 1.0, "max_length": 128, "batch_size": 16, "learning_rate": 5e-5}


def item_features(rm: RewardModel, items: list[dict[str, str]],
                  batch_size: int = 32) -> dict[str, torch.Tensor]:
    """The three features (module docstring) of every item, in order, as float64."""
    encoded = rm.encode_many(items)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = {name: torch.zeros(len(items), rm.model.config.hidden_size, dtype=torch.float64)
           for name in FEATURES}
    encoder = rm.model.bert  # BertForSequenceClassification: the encoder with its pooler
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            inputs = rm.pad([encoded[i] for i in rows])
            hidden = encoder(**inputs)
            out["cls"][rows] = hidden.pooler_output.double()
            out["mean"][rows] = mean_pool(hidden.last_hidden_state, inputs["attention_mask"]).double()
            out["cls_raw"][rows] = hidden.last_hidden_state[:, 0].double()
    return out


def fit_probe(chosen: torch.Tensor, rejected: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_w L(w) of the module docstring (features already standardized)."""
    diff = chosen - rejected
    w = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-(diff @ w)).mean() + lam * (w @ w)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def correct(w: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return ((chosen - rejected) @ w > 0).double()


def accuracy_on(z: torch.Tensor, rows: tuple[list[int], list[int]], w: torch.Tensor) -> torch.Tensor:
    """Per pair: 1.0 when the probe ranks its chosen response above its rejected one."""
    chosen, rejected = rows
    return correct(w, z[chosen], z[rejected])


def cluster_bootstrap_ci(values: list[float], clusters: list[str], seed: int = 0) -> list[float]:
    """95 % percentile CI of mean(values), resampling clusters (prompts) with replacement."""
    by_cluster: dict[str, list[float]] = {}
    for value, cluster in zip(values, clusters, strict=True):
        by_cluster.setdefault(cluster, []).append(value)
    groups = list(by_cluster.values())
    rng = random.Random(seed)
    means = []
    for _ in range(BOOTSTRAP):
        drawn = [groups[rng.randrange(len(groups))] for _ in groups]
        # rounded: averages of 0/1 correctness otherwise leave float dust (3e-10) on a bound
        means.append(round(sum(sum(g) for g in drawn) / sum(len(g) for g in drawn), 9))
    means.sort()
    return [means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]]


def load_splits(max_pairs: int | None) -> dict[str, list[PreferencePair]]:
    bench = load_benchmark("csg")
    splits = {
        "fit": [p for d in bench.source_domains for p in bench.pairs(d, "train")],
        "validation": [p for d in bench.source_domains for p in bench.pairs(d, "test")],
        "heldout_test": [p for d in bench.heldout_domains for p in bench.pairs(d, "test")],
        "heldout_train": [p for d in bench.heldout_domains for p in bench.pairs(d, "train")],
    }
    if max_pairs is not None:
        splits = {k: random.Random(0).sample(v, min(max_pairs, len(v))) for k, v in splits.items()}
    return splits


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    splits = load_splits(args.max_pairs)
    rm = RewardModel.from_pretrained(minilm_dir(), pooling="cls", device="cpu", dtype="float32",
                                     max_input_tokens=MAX_TOKENS)
    index: dict[tuple[str, str], int] = {}
    for pairs in splits.values():
        for p in pairs:
            for response in (p.chosen, p.rejected):
                index.setdefault((p.prompt, response), len(index))
    items = [{"prompt": prompt, "response": response} for prompt, response in index]
    features = item_features(rm, items)
    feature_seconds = time.monotonic() - started

    def rows_of(pairs: list[PreferencePair]) -> tuple[list[int], list[int]]:
        return ([index[(p.prompt, p.chosen)] for p in pairs],
                [index[(p.prompt, p.rejected)] for p in pairs])

    heldout = splits["heldout_test"] + splits["heldout_train"]
    rows: list[dict[str, Any]] = []
    per_pair: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    for name in FEATURES:
        table = features[name]
        for seed in range(args.seeds):
            fit = random.Random(seed).sample(splits["fit"], int(FIT_FRACTION * len(splits["fit"])))
            c, r = rows_of(fit)
            stacked = table[c + r]
            mu, sd = stacked.mean(0), stacked.std(0).clamp(min=1e-8)
            z = (table - mu) / sd
            fits = {lam: fit_probe(z[c], z[r], lam) for lam in LAMBDAS}
            validation = rows_of(splits["validation"])
            val = {lam: float(accuracy_on(z, validation, w).mean()) for lam, w in fits.items()}
            lam = max(LAMBDAS, key=lambda value: (val[value], -value))
            w = fits[lam]
            heldout_correct = accuracy_on(z, rows_of(heldout), w)
            per_pair[name].append(heldout_correct)
            n_test = len(splits["heldout_test"])
            rows.append({
                "pooling": name, "seed": seed, "lambda": lam, "fit_pairs": len(fit),
                "fit_accuracy": float(correct(w, z[c], z[r]).mean()),
                "source_validation_accuracy": val[lam],
                "heldout_test_accuracy": float(heldout_correct[:n_test].mean()),
                "heldout_all_accuracy": float(heldout_correct.mean()),
                "heldout_accuracy_by_domain": {
                    d: float(heldout_correct[[i for i, p in enumerate(heldout) if p.domain == d]].mean())
                    for d in sorted({p.domain for p in heldout})},
            })

    def seed_mean(name: str, key: str) -> float:
        return statistics.fmean(row[key] for row in rows if row["pooling"] == name)

    summary = {name: {key: seed_mean(name, key) for key in (
        "source_validation_accuracy", "heldout_test_accuracy", "heldout_all_accuracy")}
        for name in FEATURES}
    clusters = [f"{p.domain}/{p.prompt}" for p in heldout]
    n_test = len(splits["heldout_test"])
    differences = {}
    for other in ("cls", "cls_raw"):
        differences[f"mean - {other}"] = {
            **paired_difference(per_pair["mean"], per_pair[other], clusters, n_test),
            "source_validation": summary["mean"]["source_validation_accuracy"]
            - summary[other]["source_validation_accuracy"],
        }
    validation_gap = differences["mean - cls"]["source_validation"]
    decision = "mean" if validation_gap >= 0 else "cls"
    result = {
        "config": {"task": "csg", "model": "all-MiniLM-L6-v2", "seeds": args.seeds,
                   "lambdas": list(LAMBDAS), "fit_fraction": FIT_FRACTION,
                   "max_tokens": MAX_TOKENS, "max_pairs": args.max_pairs,
                   "threads": args.threads,
                   "pairs": {k: len(v) for k, v in splits.items()}, "items": len(items)},
        "rows": rows,
        "summary": summary,
        "differences": differences,
        "decision": {"rule": "auto pools by the mean when mean's source-validation accuracy "
                     "(seed mean) >= cls's", "auto_pools_by": decision},
        "targets": [
            {"name": "csg: mean minus cls pooling, source-validation probe accuracy (seed mean)",
             "measured": validation_gap, "threshold": 0.0, "met": validation_gap >= 0},
            {"name": "csg: mean minus cls pooling, held-out pairs probe accuracy, 95% CI lower bound",
             "measured": differences["mean - cls"]["heldout_all"]["ci95"][0], "threshold": 0.0,
             "met": differences["mean - cls"]["heldout_all"]["ci95"][0] > 0},
        ],
        "feature_seconds": feature_seconds,
        "total_wall_seconds": time.monotonic() - started,
    }
    return result


def paired_difference(a: list[torch.Tensor], b: list[torch.Tensor], clusters: list[str],
                      n_test: int) -> dict[str, Any]:
    """mean(a − b) of per-pair correctness averaged over seeds, on the held-out test pairs (the
    first ``n_test``) and all held-out pairs, with prompt-resampling 95 % CIs."""
    d = (torch.stack(a).mean(0) - torch.stack(b).mean(0)).tolist()
    return {"heldout_test": {"estimate": statistics.fmean(d[:n_test]),
                             "ci95": cluster_bootstrap_ci(d[:n_test], clusters[:n_test])},
            "heldout_all": {"estimate": statistics.fmean(d), "ci95": cluster_bootstrap_ci(d, clusters)}}


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    splits = load_splits(args.max_pairs)
    heldout = splits["heldout_test"] + splits["heldout_train"]
    n_test = len(splits["heldout_test"])
    rows: list[dict[str, Any]] = []
    per_pair: dict[str, list[torch.Tensor]] = {"cls": [], "mean": []}
    with tempfile.TemporaryDirectory(prefix="bench-pooling-") as work:
        train = Path(work) / "train.jsonl"
        write_jsonl_atomic(train, [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                   for p in splits["fit"]])
        for pooling in per_pair:
            for seed in range(args.seeds):
                run_started = time.monotonic()
                trainer = RMTrainer(RMTrainConfig.from_dict({
                    "train_file": str(train), "model": "minilm", "pooling": pooling,
                    "output_dir": str(Path(work) / f"{pooling}-{seed}"), "seed": seed,
                    "device": "cpu", "checkpoint_every": 0, "reward_stats_max_items": 2,
                    "eval_batch_size": 64, **FINETUNE}))
                trainer.train()

                def correctness(pairs: list[PreferencePair], rm: Any = trainer.rm) -> torch.Tensor:
                    chosen, rejected = score_pairs(rm, pairs, batch_size=64)
                    return torch.tensor([float(c > r) for c, r in zip(chosen, rejected, strict=True)])

                heldout_correct = correctness(heldout)
                per_pair[pooling].append(heldout_correct)
                rows.append({"pooling": pooling, "seed": seed,
                             "source_validation_accuracy": float(correctness(splits["validation"]).mean()),
                             "heldout_test_accuracy": float(heldout_correct[:n_test].mean()),
                             "heldout_all_accuracy": float(heldout_correct.mean()),
                             "seconds": time.monotonic() - run_started})
                print(rows[-1], flush=True)
    summary = {name: {key: statistics.fmean(r[key] for r in rows if r["pooling"] == name)
                      for key in ("source_validation_accuracy", "heldout_test_accuracy",
                                  "heldout_all_accuracy")} for name in per_pair}
    clusters = [f"{p.domain}/{p.prompt}" for p in heldout]
    difference = paired_difference(per_pair["mean"], per_pair["cls"], clusters, n_test)
    difference["source_validation"] = (summary["mean"]["source_validation_accuracy"]
                                       - summary["cls"]["source_validation_accuracy"])
    return {
        "config": {"task": "csg", "model": "all-MiniLM-L6-v2", "seeds": args.seeds,
                   "train": {**FINETUNE, "pairs": len(splits["fit"]), "bf16": "auto (trainer default)"},
                   "threads": args.threads, "max_pairs": args.max_pairs,
                   "pairs": {k: len(v) for k, v in splits.items()}},
        "rows": rows, "summary": summary, "differences": {"mean - cls": difference},
        "targets": [{"name": "csg: mean minus cls pooling, fine-tuned RM, held-out pairs accuracy, "
                     "95% CI lower bound (corroboration)",
                     "measured": difference["heldout_all"]["ci95"][0], "threshold": 0.0,
                     "met": difference["heldout_all"]["ci95"][0] > 0}],
        "total_wall_seconds": time.monotonic() - started,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'pooling':8} {'source val':>10} {'held-out test':>13} {'held-out all':>12}")
    for name, s in result["summary"].items():
        print(f"{name:8} {s['source_validation_accuracy']:10.3f} "
              f"{s['heldout_test_accuracy']:13.3f} {s['heldout_all_accuracy']:12.3f}")
    for name, d in result["differences"].items():
        for split in ("heldout_test", "heldout_all"):
            lo, hi = d[split]["ci95"]
            print(f"{name} {split}: {d[split]['estimate']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    if "decision" in result:
        print(f"decision: auto pools by {result['decision']['auto_pools_by']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="at most this many pairs per split (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--finetune", action="store_true",
                        help="train-rm with each pooling instead of the probe (corroboration)")
    parser.add_argument("--output", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run_finetune(args) if args.finetune else run(args)
    args.output = args.output or (FINETUNE_RESULTS if args.finetune else RESULTS)
    write_json_atomic(args.output, result)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
