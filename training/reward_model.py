"""Load any ``AutoModelForSequenceClassification`` reward model and score items with it.

The contract the service relies on: a score never depends on the batch it was computed in.
Everything is right-padded with an attention mask. Encoders (BERT, DeBERTa, MiniLM) pool
with their own head (CLS); decoders (GPT-2, Llama, Qwen, Mistral, ...) are pooled here, at
the last *attended* position, from the per-position logits of their ``score`` head: the
Hugging Face implementation locates the last token by searching for ``pad_token_id``, which
picks the wrong token when the pad token doubles as EOS and the sequence ends in EOS.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Item = Mapping[str, Any]


class InputError(ValueError):
    """The client sent an item that cannot be scored (the service maps this to 422)."""


class InputTooLongError(InputError):
    """An item exceeds ``max_input_tokens`` and the client asked not to truncate."""


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that have it, fp16 on the others."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True)
class ItemText:
    """An item rendered for the tokenizer: either one text, or a (prompt, response) pair."""

    text: str
    pair: str | None = None
    has_bos: bool = False  # the rendered text already starts with the BOS token


def _message_list(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InputError(f"'{field}' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise InputError(f"'{field}[{i}]' must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise InputError(f"'{field}[{i}]' needs string 'role' and 'content'")
        out.append({"role": role, "content": content})
    return out


def item_messages(item: Item) -> list[dict[str, str]]:
    """Normalize ``{"prompt","response"}`` or ``{"messages": [...]}`` to a message list."""
    if "messages" in item:
        return _message_list(item["messages"], "messages")
    prompt, response = item.get("prompt"), item.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise InputError("an item is {'prompt': str, 'response': str} or {'messages': [...]}")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


class RewardModel:
    """A sequence-classification reward model with its tokenizer, ready to score."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str = "",
        max_input_tokens: int = 512,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_input_tokens = min(max_input_tokens, self._model_max_positions())
        self.is_decoder = isinstance(getattr(model, "score", None), torch.nn.Module)
        self._ensure_pad_token()
        self._lead_ids = {
            i for i in (tokenizer.bos_token_id, tokenizer.cls_token_id) if i is not None
        }

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_input_tokens: int = 512,
        name: str | None = None,
        seed: int = 0,
        **model_kwargs: Any,
    ) -> RewardModel:
        """Load from a local directory or a hub id.

        A backbone without a trained scalar head (e.g. a sentence encoder) gets a freshly
        initialised one; ``seed`` makes that head the same on every load.
        """
        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_id))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path_or_id), num_labels=1, dtype=torch_dtype, **model_kwargs
            )
        model.to(torch_device).eval()
        return cls(model, tokenizer, name=name or str(path_or_id), max_input_tokens=max_input_tokens)

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))

    def _model_max_positions(self) -> int:
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return int(limit) if limit else 1 << 30

    def _ensure_pad_token(self) -> None:
        tok = self.tokenizer
        if tok.pad_token is None:
            # Pooling here never looks at pad ids, so reusing EOS/UNK cannot move a score.
            tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise ValueError(f"{self.name}: tokenizer has no pad, eos or unk token to pad with")
        tok.padding_side = "right"
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tok.pad_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ text -> ids
    def render(self, item: Item) -> ItemText:
        messages = item_messages(item)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False)
            bos = tok.bos_token
            return ItemText(text=text, has_bos=bool(bos) and text.startswith(bos))
        prompt = "\n".join(m["content"] for m in messages[:-1])
        response = messages[-1]["content"]
        if self.is_decoder:
            return ItemText(text=prompt + response)
        return ItemText(text=prompt, pair=response)

    def encode(self, item: Item, *, truncate: bool = True) -> list[int]:
        """Token ids of one item, left-truncated so that the response survives."""
        rendered = self.render(item)
        ids = self.tokenizer(
            rendered.text,
            rendered.pair,
            add_special_tokens=not rendered.has_bos,  # the template's own BOS, not a second one
        )["input_ids"]
        return self._fit(ids, truncate)

    def encode_many(self, items: Sequence[Item], *, truncate: bool = True) -> list[list[int]]:
        """``encode`` for many items with one batched tokenizer call per kind of input (the
        fast tokenizer then works outside the GIL); the ids are the same as one by one."""
        rendered = [self.render(item) for item in items]
        groups: dict[tuple[bool, bool], list[int]] = {}
        for index, r in enumerate(rendered):
            groups.setdefault((r.has_bos, r.pair is not None), []).append(index)
        encoded: list[list[int]] = [[] for _ in rendered]
        for (has_bos, paired), indices in groups.items():
            texts = [rendered[i].text for i in indices]
            pairs = [rendered[i].pair for i in indices] if paired else None
            ids = self.tokenizer(texts, pairs, add_special_tokens=not has_bos)["input_ids"]
            for i, row in zip(indices, ids, strict=True):
                encoded[i] = self._fit(row, truncate)
        return encoded

    def encode_text(self, text: str, *, truncate: bool = True) -> list[int]:
        """Token ids of an already formatted text (OpenRLHF's ``query``)."""
        tok = self.tokenizer
        if tok.pad_token and tok.pad_token != tok.eos_token:
            # OpenRLHF decodes left-padded batches with special tokens kept.
            while text.startswith(tok.pad_token):
                text = text[len(tok.pad_token) :]
            while text.endswith(tok.pad_token):
                text = text[: -len(tok.pad_token)]
        has_bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
        ids = tok(text, add_special_tokens=not has_bos)["input_ids"]
        return self._fit(ids, truncate)

    def _fit(self, ids: list[int], truncate: bool) -> list[int]:
        limit = self.max_input_tokens
        if len(ids) <= limit:
            return ids
        if not truncate:
            raise InputTooLongError(
                f"an item has {len(ids)} tokens, more than max_input_tokens={limit}; "
                "shorten it or send truncate=true to drop the prompt's beginning"
            )
        lead = 1 if ids and ids[0] in self._lead_ids else 0
        return ids[:lead] + ids[len(ids) - (limit - lead) :]

    # ------------------------------------------------------------------ scoring
    def pad(self, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rewards of shape (B,), differentiable; optionally the pooled features (B, H).

        The features are the hidden state the head reads: the last attended token for
        decoders, the first token for encoders.
        """
        last = attention_mask.sum(dim=1) - 1
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        with self._capture_score_logits() as captured:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=return_features,
            )
        rewards = captured["logits"][rows, last, 0] if self.is_decoder else out.logits[:, 0]
        if not return_features:
            return rewards
        hidden = out.hidden_states[-1]
        features = hidden[rows, last] if self.is_decoder else hidden[:, 0]
        return rewards, features

    @contextlib.contextmanager
    def _capture_score_logits(self) -> Iterator[dict[str, torch.Tensor]]:
        captured: dict[str, torch.Tensor] = {}
        if not self.is_decoder:
            yield captured
            return

        def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            captured["logits"] = output

        handle = self.model.score.register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    def rewards(self, items: Sequence[Item], *, truncate: bool = True) -> torch.Tensor:
        """Differentiable rewards of ``items`` in one padded forward pass, shape (B,)."""
        input_ids, mask = self.pad([self.encode(item, truncate=truncate) for item in items])
        return self.forward(input_ids, mask)

    @torch.inference_mode()
    def score_ids(self, batch: Sequence[Sequence[int]]) -> list[float]:
        """Scores of one padded forward pass over already encoded items."""
        input_ids, mask = self.pad(batch)
        return self.forward(input_ids, mask).float().cpu().tolist()

    def score(
        self, items: Sequence[Item], *, truncate: bool = True, batch_size: int = 32
    ) -> list[float]:
        """Score items in order (convenience for scripts; the service batches by tokens)."""
        encoded = [self.encode(item, truncate=truncate) for item in items]
        scores: list[float] = []
        for start in range(0, len(encoded), batch_size):
            scores.extend(self.score_ids(encoded[start : start + batch_size]))
        return scores
