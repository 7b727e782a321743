"""The fine-tune track: the repo's real Bradley–Terry trainer (``training.bt.trainer.RMTrainer``,
full fine-tuning of the encoder) for BT and the positive control, a few seeds.

Each run writes its pairs as JSONL, trains with ``RMTrainer``, loads the final model with
``RewardModel.from_pretrained`` (serving's loader, the model's own CLS head) and scores the
eval prompts' candidates and the source validation pairs once; the scores are cached on disk
(the model is deleted). Rows ``ft_bt`` and ``ft_positive_control`` (baseline ``ft_bt``) run
only when asked for (``--finetune``): minutes per run on CPU.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.evidence.controls import FINETUNE_POSITIVE
from bench.evidence.data import SourcePair
from bench.evidence.methods import Fitted, Method, TaskContext, register
from training.atomic import write_jsonl_atomic
from training.bt.config import RMTrainConfig
from training.bt.trainer import RMTrainer
from training.models import resolve_pretrained
from training.reward_model import RewardModel

FINETUNE_SEEDS = 3
# Pairs the fine-tune track trains on, at most, per side: one fine-tune seed costs ~0.09 s per
# pair on a core (46 s for 522 CSG pairs on the earlier build), so the full build's 5,330 KA
# source pairs and ~7,000 CSG control pairs (every candidate pair of 100 control prompts past
# the 0.3 gap) made one seed 10-15 min and the track over an hour. A fixed seeded sample of
# each side, the same for every seed and both rows, keeps a seed at ~2-5 min; on the earlier
# build 4,798 control pairs gave a control gap four times the fast track's, so 1,500 still has
# power to spare.
SOURCE_PAIRS_MAX = 1500
CONTROL_PAIRS_MAX = 1500
TRAINER_OPTIONS = {"max_length": 128, "epochs": 1.0, "batch_size": 16, "learning_rate": 5e-5,
                   "checkpoint_every": 0, "reward_stats_max_items": 64, "eval_batch_size": 64}


def scored_items(ctx: TaskContext) -> list[tuple[str, str]]:
    items = [(ps.prompt, c) for ps in ctx.data.heldout_part("eval") for c in ps.candidates]
    items += [(p.prompt, r) for p in ctx.data.pairs("val") for r in (p.chosen, p.rejected)]
    return list(dict.fromkeys(items))


def scored_once(ctx: TaskContext, track: str, label: str, key: list[Any], seed: int, pairs: Sequence[SourcePair],
                train_and_score: Callable[[Path, list[tuple[str, str]]], dict[str, Any]],
                info: Sequence[str]) -> Fitted:
    """A model trained once per (``key``, seed, pairs, scored items) and kept only as its scores:
    ``train_and_score(work_dir, items)`` returns ``{"rewards": [...], ...}`` for ``scored_items``;
    that is cached under ``<cache_dir>/<track>/`` and the work dir deleted. The fine-tune track
    and the DPO row both go through here."""
    root = Path(ctx.settings.cache_dir or "artifacts/cache/evidence") / track
    items = scored_items(ctx)
    digest = hashlib.sha256(json.dumps([*key, seed, [(p.prompt, p.chosen, p.rejected) for p in pairs],
                                        items]).encode())
    cache = root / f"{label}-s{seed}-{digest.hexdigest()[:16]}.json"
    if cache.is_file():
        scores = json.loads(cache.read_text())
    else:
        work = root / f"{label}-s{seed}"
        shutil.rmtree(work, ignore_errors=True)
        scores = {"items": [list(i) for i in items], **train_and_score(work, items)}
        root.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(scores))
        shutil.rmtree(work, ignore_errors=True)
    rewards = {ctx.table.rows[(p, r)]: v for (p, r), v in zip(scores["items"], scores["rewards"], strict=True)}
    return Fitted([], row_rewards=rewards, info={k: scores.get(k) for k in info})


def finetune(ctx: TaskContext, pairs: Sequence[SourcePair], seed: int, name: str) -> Fitted:
    def train_and_score(work: Path, items: list[tuple[str, str]]) -> dict[str, Any]:
        train_file = work / "train.jsonl"
        write_jsonl_atomic(train_file, [{"id": p.id, "prompt": p.prompt, "chosen": p.chosen,
                                         "rejected": p.rejected, "domain": p.domain} for p in pairs])
        config = RMTrainConfig.from_dict({"train_file": str(train_file), "output_dir": str(work / "run"),
                                          "model": resolve_pretrained(ctx.settings.encoder), "seed": seed,
                                          **TRAINER_OPTIONS})
        result = RMTrainer(config).train()
        rm = RewardModel.from_pretrained(result.model_dir, device="cpu", max_input_tokens=config.max_length)
        with torch.inference_mode():
            values = rm.score([{"prompt": p, "response": r} for p, r in items], batch_size=64)
        return {"rewards": values, "train_seconds": result.metrics.get("train_seconds")}

    return scored_once(ctx, "finetune", f"{ctx.task}-{name}", [ctx.settings.encoder, TRAINER_OPTIONS], seed,
                       pairs, train_and_score, ("train_seconds",))


def capped(pairs: Sequence[SourcePair], limit: int) -> list[SourcePair]:
    """At most ``limit`` of ``pairs``, a seeded sample in their original order."""
    if len(pairs) <= limit:
        return list(pairs)
    keep = sorted(random.Random(0).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def source_pairs(ctx: TaskContext) -> list[SourcePair]:
    return capped(ctx.train_pairs, SOURCE_PAIRS_MAX)


def control_pairs(ctx: TaskContext) -> list[SourcePair]:
    return capped(ctx.control_pairs, CONTROL_PAIRS_MAX)


register(Method("ft_bt", "—", "pooled BT, fine-tuned with the repo's trainer (fine-tune track)",
                lambda ctx, seed: finetune(ctx, source_pairs(ctx), seed, "bt"), baseline=None,
                role="baseline", seeds=FINETUNE_SEEDS, default=False))
register(Method(FINETUNE_POSITIVE, "—", "positive control on the fine-tune track",
                lambda ctx, seed: finetune(ctx, [*source_pairs(ctx), *control_pairs(ctx)],
                                           seed, "positive_control"),
                baseline="ft_bt", role="control", seeds=FINETUNE_SEEDS, default=False))
