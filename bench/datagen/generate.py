"""Sample responses from a causal-LM policy, batched, seeded per row, and cached on disk.

Every sampled row owns a ``torch.Generator`` seeded from (seed, rendered prompt, sample
index), and the token is drawn inside a logits processor, so a row's draws do not depend on
which other prompts share its batch. That is what makes the cache sound: a prompt's samples
are the same whether it was generated alone, with other domains, or read from the cache; the
only residue is float rounding of differently padded batches, which in the full build changed
one token in 3 of 640 prompts. A cold build is byte-for-byte reproducible.

With ``precision="auto"`` on a CPU with bf16 units the model runs under bf16 autocast
(:mod:`training.precision`; ~3x faster here). Its draws are the same per-row draws, from
logits rounded differently, so the cache key names the precision; bf16 rounding depends more
on a batch's shape than fp32's, which only matters when a cache holds part of a build (the
batches of a cold build are the same every time, so it still rebuilds the same bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from training.models import resolve_pretrained
from training.precision import Precision, autocast, cast_frozen_linears, resolve_precision

CPU = torch.device("cpu")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 0.95
    chat: bool = False  # render the prompt with the tokenizer's chat template


def stable_int(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class RowSampler:
    """A logits processor that samples (temperature, top-p) with one generator per row.

    It returns logits where only the drawn token is finite, so greedy decoding then simply
    emits the draw.
    """

    def __init__(self, generators: Sequence[torch.Generator], params: SamplingParams) -> None:
        self.generators = generators
        self.params = params

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.params.temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        forced = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            pick = torch.multinomial(sorted_probs[row], 1, generator=generator)
            forced[row, order[row, pick]] = 0.0
        return forced


def policy_fingerprint(reference: str, resolved: str) -> str:
    """Names the weights: a short name stands for itself, a directory for its files."""
    path = Path(resolved)
    if not path.is_dir():
        return reference
    stats = [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in sorted(path.iterdir())
        if p.is_file()
    ]
    return f"{path.resolve()}|{'|'.join(stats)}"


class GenerationCache:
    """Append-only JSONL of ``{"key", "responses"}``; a torn last line is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, list[str]] = {}
        if path.is_file():
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.entries[row["key"]] = row["responses"]

    def get(self, key: str) -> list[str] | None:
        return self.entries.get(key)

    def put_many(self, items: dict[str, list[str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for key, responses in items.items():
                handle.write(json.dumps({"key": key, "responses": responses}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.entries.update(items)


def clean_response(text: str) -> str:
    return " ".join(text.split())


class PolicySampler:
    """Loads a policy lazily (a full cache hit never loads it) and samples k responses."""

    def __init__(
        self,
        reference: str,
        *,
        artifacts_dir: Path,
        cache_dir: Path,
        seed: int,
        batch_rows: int = 64,
        precision: str = "float32",
    ) -> None:
        self.reference = reference
        # "float32" (the v1 builds) or "auto": bf16 autocast where the CPU multiplies bf16
        self.precision: Precision = resolve_precision(precision, CPU)
        self.artifacts_dir = artifacts_dir
        self.seed = seed
        self.batch_rows = batch_rows
        resolved = resolve_pretrained(reference, artifacts_dir)
        self.resolved = resolved
        self.fingerprint = policy_fingerprint(reference, resolved)
        name = hashlib.sha256(self.fingerprint.encode()).hexdigest()[:16]
        self.cache = GenerationCache(cache_dir / f"{name}.jsonl")
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.resolved)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(self.resolved, dtype=self.precision.weights)
        model.requires_grad_(False)
        # frozen Linears stored in bf16 once, instead of autocast recasting them every step
        cast_frozen_linears(model, self.precision.autocast)
        self._model, self._tokenizer = model.eval(), tokenizer

    def render(self, prompt: str, params: SamplingParams) -> str:
        self._load()
        tokenizer = self._tokenizer
        if params.chat and tokenizer.chat_template:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def key(self, prompt: str, params: SamplingParams, k: int) -> str:
        named = [self.fingerprint, prompt, asdict(params), k, self.seed]
        if self.precision.autocast is not None:  # fp32 keys stay those of the v1 builds
            named.append(self.precision.name)
        payload = json.dumps(named, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def sample(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        k: int,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[str]]:
        """k responses per prompt, in prompt order."""
        keys = [self.key(p, params, k) for p in prompts]
        missing = sorted(
            (i for i, key in enumerate(keys) if self.cache.get(key) is None),
            key=lambda i: (len(prompts[i]), i),  # similar lengths share a batch: less padding
        )
        if progress:
            progress(len(prompts) - len(missing))
        per_batch = max(1, self.batch_rows // k)
        for start in range(0, len(missing), per_batch):
            chunk = missing[start : start + per_batch]
            outputs = self._generate([prompts[i] for i in chunk], params, k)
            self.cache.put_many({keys[i]: out for i, out in zip(chunk, outputs, strict=True)})
            if progress:
                progress(len(chunk))
        return [self.cache.get(key) for key in keys]

    @torch.inference_mode()
    def _generate(self, prompts: Sequence[str], params: SamplingParams, k: int) -> list[list[str]]:
        from transformers import GenerationConfig, LogitsProcessorList

        self._load()
        tokenizer, model = self._tokenizer, self._model
        rendered = [self.render(p, params) for p in prompts]
        rows = [text for text in rendered for _ in range(k)]
        generators = [
            torch.Generator().manual_seed(stable_int(self.seed, text, j))
            for text in rendered
            for j in range(k)
        ]
        # a chat template already starts with whatever special tokens the model wants
        encoded = tokenizer(
            rows, return_tensors="pt", padding=True, add_special_tokens=not params.chat
        )
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        with autocast(CPU, self.precision.autocast):
            out = model.generate(
                **encoded,
                generation_config=config,
                logits_processor=LogitsProcessorList([RowSampler(generators, params)]),
            )
        width = encoded["input_ids"].shape[1]
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        cleaned = [clean_response(t) for t in texts]
        return [cleaned[i * k : (i + 1) * k] for i in range(len(prompts))]
