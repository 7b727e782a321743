"""The preference-strength file: one JSONL row per training pair, next to the pairs.

``train.jsonl`` → ``train.strength.jsonl``, rows in the pairs' file order::

    {"index": 0, "id": "p0", "diffs": [d_1, ..., d_M], "mu": μ̂, "sigma": σ̂}

``training.bt.strength`` writes it (from an RM ensemble); ``training.bt.trainer`` reads μ̂
from it for label flipping and the adaptive margin.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.atomic import write_jsonl_atomic
from training.data import PreferencePair

STRENGTH_SUFFIX = ".strength.jsonl"


def default_strength_path(train_file: str | Path) -> Path:
    """``data/train.jsonl`` → ``data/train.strength.jsonl`` (next to the dataset)."""
    path = Path(train_file)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + STRENGTH_SUFFIX)


def strength_rows(pairs: Sequence[PreferencePair], diffs: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """One row per pair from per-member differences ``diffs[m][i]`` (σ̂: population std)."""
    rows = []
    for i, pair in enumerate(pairs):
        d = [member[i] for member in diffs]
        mu = sum(d) / len(d)
        sigma = math.sqrt(sum((x - mu) ** 2 for x in d) / len(d))
        rows.append({"index": i, "id": pair.id, "diffs": d, "mu": mu, "sigma": sigma})
    return rows


def write_strength(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    write_jsonl_atomic(path, rows)


def read_strength(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no strength file at {path}: run `python -m training strength` on the training "
            "pairs first, or set strength_file"
        )
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def strength_for_pairs(path: str | Path, pairs: Sequence[PreferencePair]) -> list[float]:
    """μ̂ for each pair, in order: matched by ``id`` when every pair has one, else by line."""
    rows = read_strength(path)
    ids = [p.id for p in pairs]
    if all(i is not None for i in ids) and all(r.get("id") is not None for r in rows):
        by_id = {str(r["id"]): float(r["mu"]) for r in rows}
        missing = [i for i in ids if str(i) not in by_id]
        if missing:
            raise ValueError(f"{path}: no strength for pair id(s) {missing[:5]} (stale file?)")
        return [by_id[str(i)] for i in ids]
    if len(rows) != len(pairs):
        raise ValueError(f"{path}: {len(rows)} strength rows for {len(pairs)} pairs (stale file?)")
    return [float(r["mu"]) for r in sorted(rows, key=lambda r: r["index"])]
