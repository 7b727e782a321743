"""The scoring engine alone: batch planning, admission, and scores that do not depend on the
batch they were computed in."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from service.engine import ScoringEngine, ServedModel
from service.errors import Overloaded
from training.registry import resolve_model
from training.reward_model import RewardModel


def _engine(**limits) -> ScoringEngine:
    return ScoringEngine(max_batch_tokens=limits.get("tokens", 64), max_batch_size=limits.get("size", 4),
                         max_queue=limits.get("queue", 8))


def test_batches_are_sorted_by_length_and_cut_by_tokens_and_count() -> None:
    engine = _engine(tokens=40, size=3)
    lengths = [10, 3, 12, 5, 9, 20]
    batches = engine.plan_batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) * max(lengths[i] for i in batch) <= 40
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)


def test_a_full_queue_refuses_at_once_with_a_retry_hint(tiny_encoder_rm: Path) -> None:
    rm = RewardModel.from_pretrained(tiny_encoder_rm, device="cpu")
    served = ServedModel(rm=rm, model=resolve_model(str(tiny_encoder_rm), "unused"))
    engine = _engine(queue=2)  # not started: nothing drains the queue
    engine.submit(served, [[1, 2, 3]])
    engine.submit(served, [[1, 2]])
    with pytest.raises(Overloaded) as refused:
        engine.submit(served, [[4]])
    assert "Retry-After" in refused.value.headers


def test_scores_through_the_engine_equal_each_item_scored_alone(tiny_encoder_rm: Path) -> None:
    rm = RewardModel.from_pretrained(tiny_encoder_rm, device="cpu")
    served = ServedModel(rm=rm, model=resolve_model(str(tiny_encoder_rm), "unused"))
    items = [{"prompt": "how are you today?" * n, "response": "good" * (1 + n % 3)} for n in range(12)]
    encoded = rm.encode_many(items)
    alone = [rm.score_ids([ids])[0] for ids in encoded]
    engine = _engine(tokens=512, size=5, queue=64)
    engine.start()
    try:
        futures = []
        threads = [threading.Thread(target=lambda chunk=encoded[i::3]: futures.append(
            (chunk, engine.submit(served, chunk)))) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for chunk, future in futures:
            for ids, score in zip(chunk, future.result(timeout=30), strict=True):
                assert score == pytest.approx(alone[encoded.index(ids)], abs=1e-4)
    finally:
        engine.stop()


def test_admission_refuses_before_any_work_and_every_place_comes_back(tiny_encoder_rm: Path) -> None:
    rm = RewardModel.from_pretrained(tiny_encoder_rm, device="cpu")
    served = ServedModel(rm=rm, model=resolve_model(str(tiny_encoder_rm), "unused"))
    engine = _engine(queue=2)  # not started: queued requests stay queued
    engine.admit()  # a request being tokenized holds a place ...
    engine.admit()
    with pytest.raises(Overloaded):  # ... so a third is refused before it tokenizes anything
        engine.admit()
    engine.release()  # its tokenization failed: the place comes back
    engine.submit(served, rm.encode_many([{"prompt": "a", "response": "b"}]), admitted=True)
    assert engine.queue_depth == 1  # one queued; the other admitted place was given back
    engine.admit()
    with pytest.raises(Overloaded):
        engine.submit(served, [rm.encode({"prompt": "c", "response": "d"})])
