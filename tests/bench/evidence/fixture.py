"""A tiny synthetic data-v2 tree in the exact format of ``benchdata/v2/<task>/`` (for tests).

Responses are words of the tiny test tokenizer's corpus; gold = (good words − bad words) / 4,
so a reward model can learn it and the metrics have something to measure.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch

from bench.evidence.data import PromptSet, candidate_pairs
from bench.evidence.features import FeatureTable

GOOD = ["good", "great", "excellent", "wonderful", "happy", "love", "nice"]
BAD = ["bad", "awful", "terrible", "horrible", "sad", "hate", "poor"]
KA_KINDS = ["gloss", "sibling", "hypernym", "policy", "policy", "policy"]


def _candidate(rng: random.Random) -> tuple[str, float]:
    words = [rng.choice(GOOD if rng.random() < 0.5 else BAD) for _ in range(4)]
    return " ".join(words), (sum(w in GOOD for w in words) - sum(w in BAD for w in words)) / 4


def _prompt(rng: random.Random, task: str, domain: str, index: int, group: str, n: int) -> PromptSet:
    pairs = [_candidate(rng) for _ in range(n)]
    kinds = KA_KINDS[:n] if task == "ka" else ["policy"] * n
    return PromptSet(f"{domain}-{index}", task, domain, group, f"the {domain} prompt number {index}?",
                     tuple(c for c, _ in pairs), tuple(g for _, g in pairs), tuple(kinds))


def _row(ps: PromptSet, group_key: str) -> dict:
    return {"id": ps.id, "task": ps.task, "domain": ps.domain, group_key: ps.group, "prompt": ps.prompt,
            "candidates": list(ps.candidates), "gold": list(ps.gold), "kinds": list(ps.kinds)}


def write_task(root: Path, task: str, *, seed: int = 0, prompts: int = 9, candidates: int = 6,
               source_domains: int = 4) -> Path:
    rng = random.Random(seed)
    source_domains, heldout_domains = [f"s{i}" for i in range(source_domains)], ["h0", "h1", "h2", "h3"]
    source = [_prompt(rng, task, d, i, "val" if i % 3 == 2 else "train", candidates)
              for d in source_domains for i in range(prompts)]
    heldout = [_prompt(rng, task, d, i, "control" if i % 3 == 0 else "eval", candidates)
               for d in heldout_domains for i in range(prompts)]
    directory = root / task
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"task": task, "version": 2, "seed": seed, "source_domains": source_domains,
                "heldout_domains": heldout_domains, "policy": "synthetic", "gold": "word counts",
                "params": {"min_gap": 0.3}, "stats": {}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "source.jsonl").write_text("".join(json.dumps(_row(p, "split")) + "\n" for p in source))
    (directory / "heldout.jsonl").write_text("".join(json.dumps(_row(p, "part")) + "\n" for p in heldout))
    pairs = [{**asdict(p), "task": task} for p in candidate_pairs(source, 0.3)]
    (directory / "source_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return directory


def gold_features(data) -> FeatureTable:
    """Feature 0 is an item's gold, the rest noise: a head can learn gold exactly."""
    gold = {}
    for ps in [*data.source, *data.heldout]:
        gold.update({(ps.prompt, c): g for c, g in zip(ps.candidates, ps.gold, strict=True)})
    items = data.items()
    x = torch.randn(len(items), 8, generator=torch.Generator().manual_seed(0)) * 0.1
    x[:, 0] = torch.tensor([gold[i] for i in items])
    return FeatureTable({item: i for i, item in enumerate(items)}, {"cls": x, "mean": x})
