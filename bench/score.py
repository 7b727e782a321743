"""Scoring throughput, latency and fidelity, fp32 against bf16: in-process forward vs
generalrm ``/score`` vs a naive server, on a trained MiniLM reward model.

    python -m bench.score            # ~10 minutes on 2 CPU cores (idle machine)
    python -m bench.score --quick    # fewer requests per cell

Every row is measured in one run for each precision: ``float32`` and ``bfloat16`` (bf16
autocast of fp32 weights, the canonical shapes of ``training.precision``: what the service's
``GENERALRM_DTYPE=auto`` picks on a CPU with AMX). (a) the in-process forward the engine runs
(``RewardModel.score_ids``) at its best batch size; (b) generalrm over HTTP; (c) a naive
server (OpenRLHF ``serve_rm``'s pattern). The fidelity table compares bf16 with fp32 on the
same trained RM: max |Δ| as a share of the reward std, pairwise-order agreement over every pair
of items, and the deviation of a score computed in a batch from the item scored alone; and
probes two alternatives (bf16 weights instead of autocast; int8 dynamic quantization).
Writes ``bench/results/score.json`` (rows, fidelity, targets).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import torch

from training.bt.config import RMTrainConfig
from training.bt.trainer import RMTrainer
from training.data import load_pairs
from training.reward_model import RewardModel

TOKENS = 128
CONCURRENCY = (1, 8, 32)
ITEMS_PER_REQUEST = (1, 16)
PRECISIONS = ("float32", "bfloat16")
RESULTS = Path(__file__).parent / "results" / "score.json"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
RM_DIR = Path("artifacts/bench/score-rm")


def trained_rm(path: Path) -> Path:
    """A MiniLM RM trained on the example pairs (2 epochs, fp32), cached: fidelity is only
    meaningful on a head whose rewards carry signal."""
    model = path / "run" / "model"
    if not (model / "config.json").is_file():
        config = RMTrainConfig(train_file=str(EXAMPLES / "prefs.train.jsonl"), model="minilm",
                               output_dir=str(path / "run"), epochs=2.0, max_length=TOKENS,
                               batch_size=16, learning_rate=5e-5, bf16=False, device="cpu")
        RMTrainer(config).train()
    return model


def make_items(rm: RewardModel, count: int) -> list[dict]:
    """Distinct items that encode to exactly TOKENS tokens (a long prompt, left-truncated)."""
    items = []
    for i in range(count):
        item = {"prompt": f"Request {i}: " + "tell me about reward models and RLHF " * 40, "response": f"Answer number {i}."}
        assert len(rm.encode(item)) == TOKENS
        items.append(item)
    return items


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_forward(rm: RewardModel, items: list[dict], seconds: float) -> dict:
    encoded = [rm.encode(item) for item in items]
    best = {"batch": 0, "items_per_s": 0.0}
    single_ms = None
    for batch in (1, 8, 16, 32, 64):
        chunk = encoded[:batch]
        rm.score_ids(chunk)  # warm
        done, started = 0, time.perf_counter()
        timings = []
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            rm.score_ids(chunk)
            timings.append(time.perf_counter() - t0)
            done += batch
        rate = done / (time.perf_counter() - started)
        if batch == 1:
            single_ms = statistics.median(timings) * 1000
        if rate > best["items_per_s"]:
            best = {"batch": batch, "items_per_s": rate}
    return {**best, "single_item_forward_ms": single_ms}


async def load(url: str, items: list[dict], per_request: int, concurrency: int, requests: int) -> dict:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient, worker: int) -> None:
        nonlocal errors
        for n in counter:
            start = (n * per_request) % (len(items) - per_request)
            body = {"items": items[start : start + per_request]}
            t0 = time.perf_counter()
            response = await client.post(url, json=body)
            latencies.append(time.perf_counter() - t0)
            if response.status_code != 200:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, 0) for _ in range(min(concurrency, 4))))  # warm
        counter = iter(range(requests))
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "items_per_s": requests * per_request / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "errors": errors,
    }


def start_server(command: list[str], port: int, env: dict) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    path = "/ready" if "service" in command else "/health"
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {' '.join(command)}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


def requests_for(concurrency: int, per_request: int, quick: bool) -> int:
    items = (256 if quick else 768) * (2 if concurrency > 1 else 1)
    return max(concurrency * 2, items // per_request)


# ---------------------------------------------------------------------- fidelity
def pair_agreement(scores: list[float], reference: list[float]) -> float:
    agree = total = 0
    for i, j in itertools.combinations(range(len(reference)), 2):
        if reference[i] != reference[j]:
            total += 1
            agree += (scores[i] > scores[j]) == (reference[i] > reference[j])
    return agree / total


def fidelity(model: Path) -> dict:
    """bf16 (and the alternatives) against fp32 on the trained RM, item by item."""
    pairs = load_pairs(EXAMPLES / "prefs.test.jsonl") + load_pairs(EXAMPLES / "prefs.train.jsonl")[:100]
    items = [p.chosen_item() for p in pairs] + [p.rejected_item() for p in pairs]

    def alone_and_batched(rm: RewardModel) -> tuple[list[float], list[float]]:
        return [rm.score([item])[0] for item in items], rm.score(items, batch_size=32)

    fp32 = RewardModel.from_pretrained(model, dtype="float32", device="cpu", max_input_tokens=TOKENS)
    reference, fp32_batched = alone_and_batched(fp32)
    std = statistics.pstdev(reference)
    rows = {"float32": {"batch_vs_single_abs": max(abs(a - b) for a, b in zip(fp32_batched, reference, strict=True))}}
    variants = {"bfloat16 autocast": RewardModel.from_pretrained(model, dtype="bfloat16", device="cpu",
                                                                 max_input_tokens=TOKENS)}
    weights = RewardModel.from_pretrained(model, dtype="float32", device="cpu", max_input_tokens=TOKENS)
    weights.model.to(torch.bfloat16)
    variants["bfloat16 weights"] = weights
    quantized = RewardModel.from_pretrained(model, dtype="float32", device="cpu", max_input_tokens=TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized.model = torch.ao.quantization.quantize_dynamic(quantized.model, {torch.nn.Linear},
                                                                 dtype=torch.qint8)
    variants["int8 dynamic"] = quantized
    for name, rm in variants.items():
        alone, batched = alone_and_batched(rm)
        rows[name] = {
            "max_abs_diff_share_of_std": max(abs(a - b) for a, b in zip(alone, reference, strict=True)) / std,
            "pairwise_order_agreement": pair_agreement(alone, reference),
            "batch_vs_single_share_of_std": max(abs(a - b) for a, b in zip(batched, alone, strict=True)) / std,
        }
    return {"items": len(items), "pairs": len(items) * (len(items) - 1) // 2, "reward_std": std,
            "rows": rows}


# ---------------------------------------------------------------------- run
def measure(model: Path, precision: str, items: list[dict], quick: bool, env: dict) -> list[dict]:
    rm = RewardModel.from_pretrained(model, max_input_tokens=TOKENS, dtype=precision, device="cpu")
    forward = bench_forward(rm, items, seconds=1.5 if quick else 4.0)
    del rm
    rows = [{"precision": precision, "system": "in-process forward", "concurrency": "-",
             "items_per_request": forward["batch"], "items_per_s": forward["items_per_s"],
             "p50_ms": forward["single_item_forward_ms"], "p99_ms": None}]
    servers = {
        "generalrm": ([sys.executable, "-m", "service"], 8101, {
            "GENERALRM_MODEL": str(model), "GENERALRM_PORT": "8101", "GENERALRM_DTYPE": precision,
            "GENERALRM_MAX_INPUT_TOKENS": str(TOKENS),
            # the operator's knob set from (a): the batch size this hardware runs fastest
            "GENERALRM_MAX_QUEUE": "4096", "GENERALRM_MAX_BATCH_SIZE": str(forward["batch"]),
            "GENERALRM_MAX_BATCH_TOKENS": str(forward["batch"] * TOKENS),
        }),
        "naive (serve_rm pattern)": ([sys.executable, "-m", "bench.naive_server", "--model", str(model),
                                      "--port", "8102", "--dtype", precision], 8102, {}),
    }
    for system, (command, port, extra_env) in servers.items():
        process = start_server(command, port, {**env, **extra_env})
        try:
            for per_request in ITEMS_PER_REQUEST:
                for concurrency in CONCURRENCY:
                    result = asyncio.run(load(f"http://127.0.0.1:{port}/score", items, per_request, concurrency,
                                              requests_for(concurrency, per_request, quick)))
                    rows.append({"precision": precision, "system": system, "concurrency": concurrency,
                                 "items_per_request": per_request, **result})
                    print(f"  {precision:8s} {system:26s} c={concurrency:<3d} items/req={per_request:<3d} "
                          f"{result['items_per_s']:8.1f} items/s  p50 {result['p50_ms']:7.1f} ms  "
                          f"p99 {result['p99_ms']:7.1f} ms", file=sys.stderr, flush=True)
        finally:
            process.terminate()
            process.wait(30)
    return rows


def targets(rows: list[dict], fid: dict) -> list[dict]:
    def cell(precision: str, system: str, concurrency, per_request=None) -> dict:
        return next(r for r in rows if r["precision"] == precision and r["system"] == system
                    and r["concurrency"] == concurrency
                    and (per_request is None or r["items_per_request"] == per_request))

    def best32(precision: str) -> float:
        return max(cell(precision, "generalrm", 32, n)["items_per_s"] for n in ITEMS_PER_REQUEST)

    fp32_forward = cell("float32", "in-process forward", "-")["items_per_s"]
    bf16 = fid["rows"]["bfloat16 autocast"]
    found = [
        ("/score throughput at concurrency 32 (bf16, best items/request) / fp32 in-process forward",
         best32("bfloat16") / fp32_forward, 3.0, ">="),
        ("bf16 vs fp32 pairwise-order agreement", bf16["pairwise_order_agreement"], 0.995, ">="),
        ("bf16 vs fp32 max |Δ| as a share of the reward std", bf16["max_abs_diff_share_of_std"], 0.02, "<="),
        ("bf16 batch-vs-single deviation as a share of the reward std", bf16["batch_vs_single_share_of_std"], 0.01, "<="),
        ("fp32 batch-vs-single deviation (absolute)", fid["rows"]["float32"]["batch_vs_single_abs"], 1e-4, "<="),
    ]
    for precision in PRECISIONS:
        forward = cell(precision, "in-process forward", "-")
        found.append((f"{precision}: generalrm at concurrency 32 / in-process forward",
                      best32(precision) / forward["items_per_s"], 0.95, ">="))
        found.append((f"{precision}: p50 at concurrency 1 minus the single-item forward (ms)",
                      cell(precision, "generalrm", 1, 1)["p50_ms"] - forward["p50_ms"], 5.0, "<="))
    return [{"name": name, "measured": value, "threshold": threshold,
             "met": value >= threshold if op == ">=" else value <= threshold}
            for name, value, threshold, op in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="a trained RM directory (default: train one on "
                        "the example pairs, cached under artifacts/bench/score-rm)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    model = Path(args.model) if args.model else trained_rm(RM_DIR)
    items = make_items(RewardModel.from_pretrained(model, max_input_tokens=TOKENS, dtype="float32"), 512)
    rows = [row for precision in PRECISIONS for row in measure(model, precision, items, args.quick, env)]
    fid = fidelity(model)
    goals = targets(rows, fid)

    print(f"\nTrained MiniLM RM, {TOKENS}-token inputs, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}\n")
    print("| precision | system | concurrency | items/request | items/s | p50 ms | p99 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        print(f"| {r['precision']} | {r['system']} | {r['concurrency']} | {r['items_per_request']} | "
              f"{r['items_per_s']:.1f} | {r['p50_ms']:.1f} | {p99} |")
    print(f"\nFidelity against fp32, {fid['items']} items ({fid['pairs']} pairs), reward std {fid['reward_std']:.4f}:\n")
    print("| computed in | max abs diff / std | pairwise-order agreement | batch vs single / std |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in fid["rows"].items():
        if name == "float32":
            print(f"| float32 | 0 | 1 | {r['batch_vs_single_abs']:.1e} (absolute) |")
            continue
        print(f"| {name} | {r['max_abs_diff_share_of_std']:.4f} | {r['pairwise_order_agreement']:.4f} | "
              f"{r['batch_vs_single_share_of_std']:.4f} |")
    print("\n| target | measured | threshold | met |")
    print("| --- | ---: | ---: | --- |")
    for t in goals:
        print(f"| {t['name']} | {t['measured']:.4g} | {t['threshold']} | {'yes' if t['met'] else 'no'} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": str(model), "tokens": TOKENS, "quick": args.quick,
                                   "torch_threads": torch.get_num_threads(), "rows": rows,
                                   "fidelity": fid, "targets": goals}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
