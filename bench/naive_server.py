"""The baseline generalrm is measured against: OpenRLHF ``serve_rm``'s pattern — the model
runs synchronously, one request at a time, inside an ``async def`` handler (so the event
loop is blocked during every forward pass, and requests are never batched together).

Run: ``python -m bench.naive_server --model minilm --port 8001``.
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI, Request

from training.models import resolve_pretrained
from training.reward_model import RewardModel


def build_app(model: str, max_input_tokens: int, dtype: str = "float32") -> FastAPI:
    rm = RewardModel.from_pretrained(resolve_pretrained(model), max_input_tokens=max_input_tokens,
                                     dtype=dtype)
    app = FastAPI()

    @app.post("/score")
    async def score(request: Request) -> dict:
        body = await request.json()
        encoded = [rm.encode(item) for item in body["items"]]
        with torch.inference_mode():
            rewards = rm.score_ids(encoded)
        return {"rewards": rewards}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-input-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (autocast on CPU)")
    args = parser.parse_args()
    uvicorn.run(build_app(args.model, args.max_input_tokens, args.dtype), host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
