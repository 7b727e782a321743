"""What the scoring routes share: tokenize in the thread pool, score through the engine."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.engine import ScoringEngine, ServedModel
from service.errors import InvalidInput

INLINE_ENCODE_ITEMS = 4


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


async def encode_and_score(
    engine: ScoringEngine,
    model: ServedModel,
    payloads: Sequence[Any],
    encode_many: Callable[[Sequence[Any]], list[list[int]]],
) -> tuple[list[float], int]:
    """Scores in input order and the number of tokens scored. Tokenizing runs in the thread
    pool, so the event loop keeps accepting requests meanwhile."""
    if len(payloads) <= INLINE_ENCODE_ITEMS:
        # A hop to the thread pool costs more than tokenizing a few items here (each
        # thread switch can wait out the GIL's switch interval).
        encoded = encode_many(payloads)
    else:
        encoded = await run_in_threadpool(encode_many, payloads)
    scores = await asyncio.wrap_future(engine.submit(model, encoded))
    return scores, sum(len(ids) for ids in encoded)


def normalize(scores: list[float], model: ServedModel) -> list[float]:
    stats = model.reward_stats
    if stats is None:
        raise InvalidInput(
            f"model {model.label} has no stored reward statistics, so normalize=true is not "
            "possible; train it through generalrm (train_rm) or send normalize=false"
        )
    return [(s - stats["mean"]) / stats["std"] for s in scores]
