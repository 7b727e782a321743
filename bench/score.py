"""Scoring throughput and latency: in-process forward vs generalrm /score vs a naive server.

    python -m bench.score            # ~3 minutes on 2 CPU cores
    python -m bench.score --quick    # fewer requests per cell

Same model (the real MiniLM RM), same 128-token inputs, same run. Prints a table and writes
``bench/results/score.json`` (rows and targets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from training.models import resolve_pretrained
from training.reward_model import RewardModel

TOKENS = 128
CONCURRENCY = (1, 8, 32)
ITEMS_PER_REQUEST = (1, 16)
RESULTS = Path(__file__).parent / "results" / "score.json"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    rm = RewardModel.from_pretrained(resolve_pretrained(args.model), max_input_tokens=TOKENS)
    items = make_items(rm, 512)
    forward = bench_forward(rm, items, seconds=1.5 if args.quick else 4.0)
    del rm

    rows = [{"system": "in-process forward", "concurrency": "-", "items_per_request": forward["batch"],
             "items_per_s": forward["items_per_s"], "p50_ms": forward["single_item_forward_ms"], "p99_ms": None}]
    servers = {
        "generalrm": ([sys.executable, "-m", "service"], 8101, {
            "GENERALRM_MODEL": args.model, "GENERALRM_PORT": "8101", "GENERALRM_MAX_INPUT_TOKENS": str(TOKENS),
            # the operator's knob set from (a): the batch size this hardware runs fastest
            "GENERALRM_MAX_QUEUE": "4096", "GENERALRM_MAX_BATCH_SIZE": str(forward["batch"]),
            "GENERALRM_MAX_BATCH_TOKENS": str(forward["batch"] * TOKENS),
        }),
        "naive (serve_rm pattern)": ([sys.executable, "-m", "bench.naive_server", "--model", args.model, "--port", "8102"], 8102, {}),
    }
    for system, (command, port, extra_env) in servers.items():
        process = start_server(command, port, {**env, **extra_env})
        try:
            for per_request in ITEMS_PER_REQUEST:
                for concurrency in CONCURRENCY:
                    result = asyncio.run(load(f"http://127.0.0.1:{port}/score", items, per_request, concurrency,
                                              requests_for(concurrency, per_request, args.quick)))
                    rows.append({"system": system, "concurrency": concurrency, "items_per_request": per_request, **result})
                    print(f"  {system:26s} c={concurrency:<3d} items/req={per_request:<3d} "
                          f"{result['items_per_s']:8.1f} items/s  p50 {result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms",
                          file=sys.stderr)
        finally:
            process.terminate()
            process.wait(30)

    def cell(system: str, concurrency: int, per_request: int) -> dict:
        return next(r for r in rows if r["system"] == system and r["concurrency"] == concurrency and r["items_per_request"] == per_request)

    best_generalrm_32 = max(cell("generalrm", 32, n)["items_per_s"] for n in ITEMS_PER_REQUEST)
    b_over_a = best_generalrm_32 / forward["items_per_s"]
    b_over_c = cell("generalrm", 32, 1)["items_per_s"] / cell("naive (serve_rm pattern)", 32, 1)["items_per_s"]
    p50_gap = cell("generalrm", 1, 1)["p50_ms"] - forward["single_item_forward_ms"]
    targets = [
        {"name": "b/a throughput at concurrency 32 (best items/request) vs in-process forward", "measured": b_over_a, "threshold": 0.85, "met": b_over_a >= 0.85},
        {"name": "b/c throughput at concurrency 32, single-item requests", "measured": b_over_c, "threshold": 3.0, "met": b_over_c >= 3.0},
        {"name": "p50 at concurrency 1 minus single-item forward time (ms)", "measured": p50_gap, "threshold": 5.0, "met": p50_gap <= 5.0},
    ]

    print(f"\nModel {args.model}, {TOKENS}-token inputs, torch {torch.__version__}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}\n")
    print("| system | concurrency | items/request | items/s | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        print(f"| {r['system']} | {r['concurrency']} | {r['items_per_request']} | {r['items_per_s']:.1f} | {r['p50_ms']:.1f} | {p99} |")
    print("\n| target | measured | threshold | met |")
    print("| --- | ---: | ---: | --- |")
    for t in targets:
        print(f"| {t['name']} | {t['measured']:.2f} | {t['threshold']} | {'yes' if t['met'] else 'no'} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": args.model, "tokens": TOKENS, "quick": args.quick, "rows": rows, "targets": targets}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
