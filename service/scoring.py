"""What the scoring routes share: tokenize in the thread pool, score through the engine."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.engine import ScoringEngine, ServedModel
from service.errors import InvalidInput
from training.reward_model import Encoded

# Tokenizing a few short items here costs less than a hop to the thread pool (each thread
# switch can wait out the GIL's switch interval); anything larger goes to the pool, so that no
# request holds the event loop (a 1M-character item held /health for 2.3 s).
INLINE_ENCODE_ITEMS = 4
INLINE_ENCODE_CHARS = 4096


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def check_item_count(count: int, limit: int) -> None:
    if count > limit:
        raise InvalidInput(
            f"{count} items in one request, more than GENERALRM_MAX_ITEMS={limit}; split the request"
        )


def check_item_chars(texts: Sequence[str], limit: int) -> int:
    """Refuse, before tokenizing, an item whose text is longer than ``limit`` characters
    (GENERALRM_MAX_INPUT_CHARS); returns the total characters."""
    total = 0
    for index, text in enumerate(texts):
        if len(text) > limit:
            raise InvalidInput(
                f"item {index} has {len(text)} characters, more than GENERALRM_MAX_INPUT_CHARS="
                f"{limit} (64 per token of GENERALRM_MAX_INPUT_TOKENS by default); shorten it")
        total += len(text)
    return total


def item_text(payload: Any) -> str:
    """All the text an item carries (what tokenizing it costs)."""
    if isinstance(payload, str):
        return payload
    if "messages" in payload:
        return "".join(m["content"] for m in payload["messages"])
    return payload["prompt"] + payload["response"]


async def encode_and_score(
    engine: ScoringEngine,
    model: ServedModel,
    payloads: Sequence[Any],
    encode_many: Callable[[Sequence[Any]], list[Encoded]],
    char_limit: int,
) -> tuple[list[float], int]:
    """Scores in input order and the number of tokens scored. The request takes its place in
    the queue first (429 before any work), its items' lengths are checked, and tokenizing runs
    in the thread pool unless the request is small."""
    engine.admit()
    try:
        chars = check_item_chars([item_text(p) for p in payloads], char_limit)
        if len(payloads) <= INLINE_ENCODE_ITEMS and chars <= INLINE_ENCODE_CHARS:
            encoded = encode_many(payloads)
        else:
            encoded = await run_in_threadpool(encode_many, payloads)
    except BaseException:
        engine.release()
        raise
    scores = await asyncio.wrap_future(engine.submit(model, encoded, admitted=True))
    return scores, sum(len(e) for e in encoded)


def normalize(scores: list[float], model: ServedModel) -> list[float]:
    stats = model.reward_stats
    if stats is None:
        raise InvalidInput(
            f"model {model.label} has no stored reward statistics, so normalize=true is not "
            "possible; train it through generalrm (train_rm) or send normalize=false"
        )
    return [(s - stats["mean"]) / stats["std"] for s in scores]
