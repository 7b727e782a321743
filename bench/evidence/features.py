"""Frozen-encoder features of every (prompt, response) the benchmark scores, cached once.

The fast track trains reward heads on these. An item is rendered and tokenized exactly as
``training.reward_model.RewardModel`` renders it for training and serving (a (prompt,
response) text pair for an encoder), and the encoder's last hidden state is pooled two ways:
``cls`` (the first token: what ``RewardModel.forward`` hands a head) and ``mean`` (the mean
over attended tokens: how all-MiniLM-L6-v2 was trained). Both are stored.

Precision: bf16 autocast where ``training.precision`` says the CPU has bf16 units, with every
batch padded to its canonical shape (``canonical_rows_and_length``) so that an item's features
do not depend on its batch; the features are compared with fp32 on a sample first, and bf16 is
used only if every sampled item's cosine with its fp32 features is ≥ ``MIN_BF16_COSINE``. The
dtype used and the measured cosines are part of the settings written with the results.

Cache: ``<cache_dir>/<task>-<key>.safetensors`` (both poolings) + ``.json`` (the items, in
row order), keyed by model, max length, precision and the items themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.models import resolve_pretrained
from training.pooled_encoder import MeanPooledRewardModel
from training.precision import autocast, canonical_rows_and_length, mixed_precision
from training.reward_model import Encoded, RewardModel

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")
MIN_BF16_COSINE = 0.99
FIDELITY_SAMPLE = 64


@dataclass
class FeatureTable:
    """Features of items, one row per (prompt, response)."""

    rows: dict[tuple[str, str], int]
    pooled: dict[str, torch.Tensor]  # pooling -> (N, H) float32
    settings: dict[str, Any] = field(default_factory=dict)

    def index(self, items: Sequence[tuple[str, str]]) -> torch.Tensor:
        return torch.tensor([self.rows[item] for item in items], dtype=torch.long)

    def standardized(self, pooling: str, reference: torch.Tensor) -> torch.Tensor:
        """Features of ``pooling`` shifted and scaled per dimension by the mean and std of the
        ``reference`` rows (source-training items only: nothing held out sets the scale)."""
        x = self.pooled[pooling]
        ref = x[reference]
        return (x - ref.mean(0)) / ref.std(0).clamp(min=1e-6)


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return {"cls": hidden[:, 0], "mean": (hidden * m).sum(1) / m.sum(1).clamp(min=1)}


@torch.inference_mode()
def _encode(rm: RewardModel, encoded: Sequence[Encoded], dtype: torch.dtype | None,
            batch_size: int) -> dict[str, torch.Tensor]:
    # the backbone under the head: a mean-pooled RM (``training.pooled_encoder``, what the
    # minilm short name loads now) keeps it as ``encoder``; a Hugging Face classifier as base_model
    encoder = rm.model.encoder if isinstance(rm.model, MeanPooledRewardModel) else rm.model.base_model
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = {name: torch.zeros(len(encoded), rm.model.config.hidden_size) for name in POOLINGS}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [encoded[i] for i in chunk]
        width = None
        if dtype is not None:  # bf16 on a CPU: the canonical shape, fillers discarded
            rows, width = canonical_rows_and_length(len(batch), max(len(e) for e in batch))
            batch = [*batch, *[batch[0]] * (rows - len(batch))]
        inputs = rm.pad(batch, width)
        with autocast(rm.device, dtype):
            hidden = encoder(**inputs).last_hidden_state.float()
        pooled = _pool(hidden, inputs["attention_mask"])
        for name in POOLINGS:
            out[name][chunk] = pooled[name][: len(chunk)].cpu()
    return out


def _cache_key(model: str, max_length: int, bf16: bool, items: Sequence[tuple[str, str]]) -> str:
    digest = hashlib.sha256(json.dumps([model, max_length, bf16, list(items)]).encode())
    return digest.hexdigest()[:16]


def extract(
    items: Sequence[tuple[str, str]], *, model: str = "minilm", max_length: int = 128,
    bf16: bool = True, batch_size: int = 64, cache_dir: Path | None = None, name: str = "items",
) -> FeatureTable:
    """Features of ``items`` (cached in ``cache_dir`` when given)."""
    items = list(dict.fromkeys(items))
    key = _cache_key(model, max_length, bf16, items)
    if cache_dir is not None:
        tensors_path = Path(cache_dir) / f"{name}-{key}.safetensors"
        meta_path = tensors_path.with_suffix(".json")
        if tensors_path.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            return FeatureTable({(p, r): i for i, (p, r) in enumerate(meta["items"])},
                                load_file(tensors_path), {**meta["settings"], "cached": True})
    started = time.monotonic()
    rm = RewardModel.from_pretrained(resolve_pretrained(model), device="cpu", dtype="float32",
                                     max_input_tokens=max_length)
    rm.model.eval()
    encoded = rm.encode_many([{"prompt": p, "response": r} for p, r in items])
    dtype = mixed_precision(rm.device, bf16)
    fidelity: dict[str, float] = {}
    if dtype is not None:  # is bf16 close enough to fp32 on these items?
        sample = encoded[:: max(1, len(encoded) // FIDELITY_SAMPLE)][:FIDELITY_SAMPLE]
        exact = _encode(rm, sample, None, batch_size)
        low = _encode(rm, sample, dtype, batch_size)
        for pooling in POOLINGS:
            cosine = torch.nn.functional.cosine_similarity(exact[pooling], low[pooling], dim=1)
            fidelity[f"bf16_min_cosine_{pooling}"] = float(cosine.min())
        if min(fidelity.values()) < MIN_BF16_COSINE:
            log.warning("bf16 features too far from fp32 (%s): using fp32", fidelity)
            dtype = None
    pooled = _encode(rm, encoded, dtype, batch_size)
    settings = {
        "model": model, "encoder": rm.model.config.name_or_path or model,
        "max_length": max_length, "items": len(items),
        "dtype": "bfloat16 autocast" if dtype is not None else "float32",
        "truncated_items": sum(len(e) >= rm.max_input_tokens for e in encoded),
        "seconds": round(time.monotonic() - started, 1), **fidelity,
    }
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in pooled.items()}, str(tensors_path))
        meta_path.write_text(json.dumps({"items": [list(i) for i in items], "settings": settings}))
    return FeatureTable({item: i for i, item in enumerate(items)}, pooled, settings)
