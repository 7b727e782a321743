"""Does one request stall everyone? ``/health`` latency while the worst single requests run.

    python -m bench.health            # ~1 minute: the real MiniLM RM behind `python -m service`

Three loads, each sent while a client polls ``/health`` back to back: (1) OpenRLHF's
``/get_reward`` with 4 MB of padding (800,000 ``[PAD]``; refused by the character limit),
(2) four items of 1M characters each on ``/score`` (refused likewise), (3) the largest request
the limits admit: 256 items of ~32,700 characters (padding to strip) on ``/get_reward``, which
is tokenized and scored. Reports the request's status and wall time and the worst and p99
``/health`` latency during it; writes ``bench/results/health.json``. Target (issue 14):
``/health`` under 100 ms while each runs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.score import percentile, start_server

RESULTS = Path(__file__).parent / "results" / "health.json"
PORT = 8103


def under_load(url: str, path: str, body: dict) -> dict:
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client() as client:
            while not done.is_set():
                started = time.perf_counter()
                client.get(f"{url}/health")
                latencies.append(time.perf_counter() - started)

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.perf_counter()
    try:
        response = httpx.post(f"{url}{path}", content=json.dumps(body),
                              headers={"content-type": "application/json"}, timeout=600)
    finally:
        elapsed = time.perf_counter() - started
        done.set()
        poller.join()
    return {"status": response.status_code, "request_s": round(elapsed, 3),
            "health_polls": len(latencies), "health_max_ms": round(max(latencies) * 1000, 1),
            "health_p99_ms": round(percentile(latencies, 0.99) * 1000, 1)}


def main() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "GENERALRM_MODEL": "minilm", "GENERALRM_PORT": str(PORT)}
    process = start_server([sys.executable, "-m", "service"], PORT, env)
    url = f"http://127.0.0.1:{PORT}"
    loads = {
        "get_reward, 4 MB of [PAD] (refused: over the character limit)":
            ("/get_reward", {"query": ["[PAD]" * 800_000 + "x"]}),
        "score, 4 items of 1M characters (refused: over the character limit)":
            ("/score", {"items": [{"prompt": "x" * 1_000_000, "response": "y"}] * 4}),
        "get_reward, 256 items at the character limit (scored)":
            ("/get_reward", {"query": ["[PAD]" * 6500 + "good great"] * 256}),
    }
    rows = []
    try:
        for name, (path, body) in loads.items():
            row = {"load": name, **under_load(url, path, body)}
            rows.append(row)
            print(f"{name}: HTTP {row['status']} in {row['request_s']} s; /health max "
                  f"{row['health_max_ms']} ms, p99 {row['health_p99_ms']} ms over "
                  f"{row['health_polls']} polls", flush=True)
    finally:
        process.terminate()
        process.wait(30)
    worst = max(r["health_max_ms"] for r in rows)
    report = {"rows": rows, "cpu_count": os.cpu_count(),
              "targets": [{"name": "/health max latency while the worst single request runs (ms)",
                           "measured": worst, "threshold": 100, "met": worst < 100}]}
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
