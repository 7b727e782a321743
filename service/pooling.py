"""Scoring behind the vLLM- and SGLang-compatible routes (``/classify``, ``/pooling``,
``/v1/embeddings``) for a one-label reward model.

A reward model has one output, the raw scalar reward r. vLLM applies an activation to a
one-label classifier by default (sigmoid; softmax only from two labels on), so ``probs`` (and
``/pooling``'s ``data``) hold ``[sigmoid(r)]`` unless the request sends
``use_activation: false`` (or the older ``activation``/``softmax``, which veRL still sends),
then ``[r]``. ``/v1/embeddings`` answers SGLang's way for reward models: ``embedding: [r]``.
Texts in ``input`` are scored as they are (the client rendered them); ``messages`` get the
RM's own chat template, exactly as ``/score`` renders them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from service.engine import ScoringEngine, ServedModel
from service.errors import InvalidInput
from service.schemas import (
    ClassificationData,
    ClassifyResponse,
    EmbeddingData,
    EmbeddingsResponse,
    EmbeddingsUsage,
    PoolingData,
    PoolingRequest,
    PoolingRequestBase,
    PoolingResponse,
    PoolingUsage,
)
from service.scoring import check_item_count, encode_and_score, sigmoid
from service.settings import ServiceSettings
from training.reward_model import Encoded, InputTooLongError, RewardModel


def _fitted(rm: RewardModel, encode: Callable[[bool], Encoded], keep: int | None) -> Encoded:
    """Token ids under vLLM's ``truncate_prompt_tokens``: unset refuses an over-long input,
    -1 keeps what fits the model, k > 0 the last k tokens."""
    if keep is None:
        try:
            return encode(False)
        except InputTooLongError:
            raise InvalidInput(
                f"an input is longer than max_input_tokens={rm.max_input_tokens} tokens; shorten "
                "it or send truncate_prompt_tokens (-1 keeps its last tokens, as vLLM does)"
            ) from None
    encoded = encode(True)
    if keep < 0 or len(encoded) <= keep:
        return encoded
    types = encoded.token_type_ids
    return Encoded(encoded.input_ids[-keep:], types[-keep:] if types is not None else None)


def _payloads_and_encoder(
    rm: RewardModel, body: PoolingRequestBase | Any
) -> tuple[list[Any], Callable[[Sequence[Any]], list[Encoded]]]:
    keep = getattr(body, "truncate_prompt_tokens", None)
    if getattr(body, "messages", None) is not None:
        conversation = {"messages": [m.model_dump() for m in body.messages]}

        def encode_items(items: Sequence[Any]) -> list[Encoded]:
            return [_fitted(rm, lambda t, item=item: rm.encode_many([item], truncate=t)[0], keep)
                    for item in items]

        return [conversation], encode_items
    texts = [body.input] if isinstance(body.input, str) else list(body.input)

    def encode_texts(batch: Sequence[str]) -> list[Encoded]:
        return [_fitted(rm, lambda t, text=text: rm.encode_text(text, truncate=t), keep)
                for text in batch]

    return texts, encode_texts


async def score_inputs(engine: ScoringEngine, model: ServedModel, body: Any,
                       settings: ServiceSettings) -> tuple[list[float], int]:
    """Raw rewards of a pooling-style request's inputs, in order, and the tokens scored."""
    payloads, encode = _payloads_and_encoder(model.rm, body)
    check_item_count(len(payloads), settings.max_items)
    return await encode_and_score(engine, model, payloads, encode, settings.item_char_limit)


def check_pooling_task(body: PoolingRequest) -> None:
    if body.task not in (None, "classify"):
        raise InvalidInput(
            f"task {body.task!r} is not available: this server serves a reward model, whose one "
            "pooling task is 'classify' (a scalar reward); omit 'task' or send 'classify'"
        )


def _usage(tokens: int) -> PoolingUsage:
    return PoolingUsage(prompt_tokens=tokens, total_tokens=tokens)


def _values(rewards: list[float], activated: bool) -> list[list[float]]:
    return [[sigmoid(r) if activated else r] for r in rewards]


def classify_response(model: ServedModel, rewards: list[float], tokens: int,
                      activated: bool) -> ClassifyResponse:
    # the one label's name, as vLLM reports id2label of the argmax (always index 0 here)
    label = (getattr(model.rm.model.config, "id2label", None) or {}).get(0)
    data = [ClassificationData(index=i, label=label, probs=probs, num_classes=1)
            for i, probs in enumerate(_values(rewards, activated))]
    return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()),
                            model=model.label, data=data, usage=_usage(tokens))


def pooling_response(model: ServedModel, rewards: list[float], tokens: int,
                     activated: bool) -> PoolingResponse:
    data = [PoolingData(index=i, data=values) for i, values in enumerate(_values(rewards, activated))]
    return PoolingResponse(id=f"pool-{uuid.uuid4().hex}", created=int(time.time()),
                           model=model.label, data=data, usage=_usage(tokens))


def embeddings_response(model: ServedModel, rewards: list[float], tokens: int) -> EmbeddingsResponse:
    data = [EmbeddingData(index=i, embedding=[r]) for i, r in enumerate(rewards)]
    return EmbeddingsResponse(model=model.label, data=data,
                              usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens))
