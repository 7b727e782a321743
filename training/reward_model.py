"""Load any ``AutoModelForSequenceClassification`` reward model and score items with it.

The contracts the service relies on:

- A score never depends on the batch it was computed in. Everything is right-padded with an
  attention mask. Encoders (BERT, DeBERTa, MiniLM) pool with their own head (CLS), or, when
  generalrm built the RM from a bare sentence encoder trained with mean pooling, with the
  mean of their token states (:mod:`training.pooled_encoder`, recorded beside the weights in
  sentence-transformers' ``modules.json`` layout, so every load pools as training did); decoders
  (GPT-2, Llama, Qwen, Mistral, ...) are pooled here, at the last *attended* position, from
  the per-position logits of their ``score`` head: the Hugging Face implementation locates the
  last token by searching for ``pad_token_id``, which picks the wrong token when the pad token
  doubles as EOS and the sequence ends in EOS.
- A score is what the model computes: the model gets exactly what its tokenizer produces for
  the rendered item, ``token_type_ids`` included (BERT-style encoders see a prompt/response
  pair as two segments), so ``model(**tokenizer(prompt, response))`` gives the same number
  (for a mean-pooled RM: the recipe of :mod:`training.pooled_encoder`).
- One rendering (:meth:`RewardModel.render`) serves training, evaluation and scoring.
- A model is served only with a trained reward head: a causal LM or a bare encoder would get
  a randomly initialised one, which is refused unless the caller allows a new head (trainers,
  which train it; the packaged demo).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from training.config import Pooling
from training.pooled_encoder import MeanPooledRewardModel, SavedLayout, mean_pool, read_layout
from training.precision import (
    Precision,
    autocast,
    canonical_rows_and_length,
    pick_device,
    resolve_precision,
)

log = logging.getLogger(__name__)

Item = Mapping[str, Any]


class InputError(ValueError):
    """The client sent an item that cannot be scored (the service maps this to 422)."""


class InputTooLongError(InputError):
    """An item exceeds ``max_input_tokens`` and the client asked not to truncate."""


class ModelLoadError(ValueError):
    """A model directory or id that cannot serve as a reward model as it is (the message says
    why and what to do)."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "merges.txt")


@dataclass(frozen=True)
class Encoded:
    """One item as the model takes it: its input ids and, for models whose tokenizer makes
    them (BERT-style two-segment inputs), its token type ids."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


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
        reward_index: int = 0,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.autocast_dtype = autocast_dtype  # mixed precision of the forward (None: off)
        self.tokenizer = tokenizer
        self.name = name
        self.max_input_tokens = min(max_input_tokens, self._model_max_positions())
        self.reward_index = reward_index  # the label whose logit is the reward
        self.is_decoder = isinstance(getattr(model, "score", None), torch.nn.Module)
        # what the head reads: the mean of the token states, the last attended token, or the
        # first token ([CLS], through the architecture's own pooler)
        self.pooling = ("mean" if isinstance(model, MeanPooledRewardModel)
                        else "last" if self.is_decoder else "cls")
        # BERT-style encoders tell the two segments of a (prompt, response) pair apart
        self.uses_token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
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
        allow_new_head: bool = True,
        reward_label: int | str | None = None,
        trust_remote_code: bool = False,
        pooling: Pooling = "auto",
        **model_kwargs: Any,
    ) -> RewardModel:
        """Load from a local directory or a hub id.

        A backbone without a trained scalar head (a sentence encoder, a causal LM) gets a
        freshly initialised one (seeded by ``seed``, so every load makes the same head) when
        ``allow_new_head`` is true, which is what a trainer wants; otherwise it is refused with
        :class:`ModelLoadError`, which is what a server wants. A classifier with several
        labels needs ``reward_label``: the index or name of the label whose logit is the reward.
        ``pooling`` (see :func:`choose_pooling`): what a new head on a bare encoder reads;
        a trained RM always pools as it was trained.
        """
        source = str(path_or_id)
        local = Path(source)
        if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
            raise ModelLoadError(
                f"{name or source}: the directory holds no tokenizer files; save the tokenizer "
                "with the model (tokenizer.save_pretrained(dir))")
        torch_device = pick_device(device)
        precision = resolve_precision(dtype, torch_device)
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise ModelLoadError(
                    f"{name or source}: the model ships its own code; load it only if you trust "
                    "it (trust_remote_code, GENERALRM_TRUST_REMOTE_CODE=true)") from None
            raise
        classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        num_labels = config.num_labels if classifier else 1
        layout = SavedLayout(None, False) if classifier else read_layout(source)
        mean = choose_pooling(pooling, config, classifier, layout, name or source) == "mean"
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if mean:
                model, new_head = MeanPooledRewardModel.from_pretrained(
                    source, config, new_head=not layout.reward_head, dtype=precision.weights,
                    trust_remote_code=trust_remote_code, **model_kwargs)
            else:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=num_labels, dtype=precision.weights,
                    output_loading_info=True, trust_remote_code=trust_remote_code,
                    **model_kwargs,
                )
                # any weight the checkpoint lacks is random: the head, or a pooler it reads
                new_head = sorted(info.get("missing_keys", ()))
        if new_head and not allow_new_head:
            kind = ", ".join(config.architectures or [config.model_type])
            raise ModelLoadError(
                f"{name or source} ({kind}) has no trained reward head: its {new_head[0]} would "
                "be randomly initialised and every score meaningless. Serve a reward model (a "
                "sequence classifier, e.g. one trained with the train_rm job), or allow an "
                "untrained head explicitly (GENERALRM_ALLOW_UNTRAINED_HEAD=true)")
        model.to(torch_device).eval()
        index = reward_index(model.config, reward_label, name or source)
        return cls(model, tokenizer, name=name or source, max_input_tokens=max_input_tokens,
                   reward_index=index, autocast_dtype=precision.autocast)

    def save_pretrained(self, directory: str | Path,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Weights (safetensors) and tokenizer; ``state_dict``: the full weights when the
        model itself holds only a shard of them (FSDP)."""
        self.model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
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

    @property
    def precision(self) -> Precision:
        return Precision(next(self.model.parameters()).dtype, self.autocast_dtype)

    @property
    def fixed_shapes(self) -> bool:
        """Whether scoring pads batches to canonical shapes (bf16 on a CPU: see
        :func:`training.precision.canonical_rows_and_length`)."""
        return self.autocast_dtype is not None and self.device.type == "cpu"

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

    def encode(self, item: Item, *, truncate: bool = True) -> Encoded:
        """Token ids of one item, left-truncated so that the response survives."""
        return self.encode_many([item], truncate=truncate)[0]

    def encode_many(self, items: Sequence[Item], *, truncate: bool = True) -> list[Encoded]:
        """``encode`` for many items with one batched tokenizer call per kind of input (the
        fast tokenizer then works outside the GIL); the ids are the same as one by one."""
        rendered = [self.render(item) for item in items]
        groups: dict[tuple[bool, bool], list[int]] = {}
        for index, r in enumerate(rendered):
            groups.setdefault((r.has_bos, r.pair is not None), []).append(index)
        encoded: list[Encoded] = [Encoded([]) for _ in rendered]
        for (has_bos, paired), indices in groups.items():
            texts = [rendered[i].text for i in indices]
            pairs = [rendered[i].pair for i in indices] if paired else None
            # the template's own BOS, not a second one
            out = self.tokenizer(texts, pairs, add_special_tokens=not has_bos)
            types = out.get("token_type_ids") if self.uses_token_types else None
            for row, i in enumerate(indices):
                encoded[i] = self._fit(out["input_ids"][row], types[row] if types else None, truncate)
        return encoded

    def encode_text(self, text: str, *, truncate: bool = True) -> Encoded:
        """Token ids of an already formatted text (OpenRLHF's ``query``)."""
        tok = self.tokenizer
        if tok.pad_token and tok.pad_token != tok.eos_token:
            text = strip_repeats(text, tok.pad_token)  # OpenRLHF ≤ 0.8 sent padded batches
        has_bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
        out = tok(text, add_special_tokens=not has_bos)
        types = out.get("token_type_ids") if self.uses_token_types else None
        return self._fit(out["input_ids"], types, truncate)

    def _fit(self, ids: list[int], types: list[int] | None, truncate: bool) -> Encoded:
        limit = self.max_input_tokens
        if len(ids) <= limit:
            return Encoded(list(ids), list(types) if types is not None else None)
        if not truncate:
            raise InputTooLongError(
                f"an item has {len(ids)} tokens, more than max_input_tokens={limit}; "
                "shorten it or send truncate=true to drop the prompt's beginning"
            )
        lead = 1 if ids and ids[0] in self._lead_ids else 0
        keep = [*range(lead), *range(len(ids) - (limit - lead), len(ids))]
        return Encoded([ids[k] for k in keep], [types[k] for k in keep] if types is not None else None)

    # ------------------------------------------------------------------ scoring
    def pad(self, batch: Sequence[Encoded], width: int | None = None) -> dict[str, torch.Tensor]:
        """Right-padded model inputs of a batch: input_ids, attention_mask (and token_type_ids);
        ``width``: pad to this length instead of the longest item's."""
        width = width or max(len(item) for item in batch)
        input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            input_ids[row, : len(item)] = torch.as_tensor(item.input_ids, dtype=torch.long)
            mask[row, : len(item)] = 1
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if self.uses_token_types:
            types = torch.zeros((len(batch), width), dtype=torch.long)
            for row, item in enumerate(batch):
                if item.token_type_ids is not None:
                    types[row, : len(item)] = torch.as_tensor(item.token_type_ids, dtype=torch.long)
            inputs["token_type_ids"] = types
        device = self.device
        return {key: value.to(device) for key, value in inputs.items()}

    def forward(
        self,
        inputs: Mapping[str, torch.Tensor],
        *,
        return_features: bool = False,
        params: Mapping[str, torch.Tensor] | None = None,
        module: torch.nn.Module | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rewards of shape (B,), differentiable; optionally the pooled features (B, H).

        ``inputs`` come from :meth:`pad`. The features are the hidden state the head reads:
        the last attended token for decoders, the mean of the attended tokens for a
        mean-pooled encoder, the first token for other encoders. ``params``
        substitutes some of the model's parameters (by name) for this call only, so that a
        caller can differentiate through a step of them (MetaRM's second-order rule).
        ``module``: what to run instead of ``self.model`` — a distributed wrapper of it (DDP)
        in training.
        """
        last = inputs["attention_mask"].sum(dim=1) - 1
        rows = torch.arange(inputs["input_ids"].shape[0], device=inputs["input_ids"].device)
        kwargs = {**inputs, "output_hidden_states": return_features}
        with self._capture_score_logits() as captured, autocast(self.device, self.autocast_dtype):
            if params is None:
                out = (module or self.model)(**kwargs)
            else:
                out = torch.func.functional_call(self.model, dict(params), args=(), kwargs=kwargs)
        k = self.reward_index
        rewards = captured["logits"][rows, last, k] if self.is_decoder else out.logits[:, k]
        if not return_features:
            return rewards
        hidden = out.hidden_states[-1]
        if self.pooling == "mean":
            features = mean_pool(hidden, inputs["attention_mask"])
        else:
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

    def rewards(self, items: Sequence[Item], *, truncate: bool = True,
                params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Differentiable rewards of ``items`` in one padded forward pass, shape (B,)."""
        return self.forward(self.pad(self.encode_many(items, truncate=truncate)), params=params)

    @torch.inference_mode()
    def score_ids(self, batch: Sequence[Encoded]) -> list[float]:
        """Scores of one padded forward pass over already encoded items; in bf16 on a CPU the
        batch is scored in its canonical shape, so that a score does not depend on the batch."""
        if not self.fixed_shapes:
            return self.forward(self.pad(batch)).float().cpu().tolist()
        rows, width = canonical_rows_and_length(len(batch), max(len(item) for item in batch))
        padded = [*batch, *[batch[0]] * (rows - len(batch))]  # fillers, discarded
        return self.forward(self.pad(padded, width)).float().cpu().tolist()[: len(batch)]

    def score(
        self, items: Sequence[Item], *, truncate: bool = True, batch_size: int = 32
    ) -> list[float]:
        """Score items in order (convenience for scripts; the service batches by tokens)."""
        encoded = self.encode_many(items, truncate=truncate)
        scores: list[float] = []
        for start in range(0, len(encoded), batch_size):
            scores.extend(self.score_ids(encoded[start : start + batch_size]))
        return scores


def _is_causal_lm(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "is_decoder", False)) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])


def choose_pooling(pooling: Pooling, config: PretrainedConfig, classifier: bool,
                   layout: SavedLayout, name: str) -> str:
    """``mean`` (:class:`~training.pooled_encoder.MeanPooledRewardModel`) or ``head`` (the
    architecture's own sequence-classification head: the pooler over [CLS] for BERT, the last
    token for decoders).

    - A sequence classifier keeps its own trained head; a mean-pooled RM generalrm saved keeps
      its mean: ``auto`` follows them, a contrary choice is refused.
    - A bare encoder: ``auto`` is mean when its own sentence-transformers Pooling says it was
      trained with mean pooling (all-MiniLM-L6-v2), the head otherwise; ``cls``/``mean`` force.
    - A causal LM pools at its last token: ``mean`` is refused.
    """
    if classifier:
        if pooling == "mean":
            raise ModelLoadError(
                f"{name} is a sequence classifier with its own trained head, which it keeps; "
                "mean pooling gives a new head to a bare encoder (use pooling: auto)")
        return "head"
    if layout.reward_head:
        if pooling == "cls":
            raise ModelLoadError(
                f"{name} is a reward model trained with mean pooling (its 2_Dense head reads "
                "the mean of the token states); pooling: cls would replace that head with a "
                "new one (use pooling: auto)")
        return "mean"
    if _is_causal_lm(config):
        if pooling == "mean":
            raise ModelLoadError(f"{name} is a causal LM, whose reward head reads its last "
                                 "token; mean pooling is for encoders (use pooling: auto)")
        return "head"
    if pooling == "auto":
        return "mean" if layout.pooling == "mean" else "head"
    return "mean" if pooling == "mean" else "head"


def reward_index(config: PretrainedConfig, reward_label: int | str | None, name: str) -> int:
    """The logit that is the reward: the only one of a single-label head, or the label the
    caller names (index or name) of a multi-label classifier."""
    labels = int(config.num_labels)
    if reward_label is None:
        if labels == 1:
            return 0
        raise ModelLoadError(
            f"{name} is a classifier with {labels} labels ({dict(config.id2label)}); say which "
            "label's logit is the reward (reward_label, GENERALRM_REWARD_LABEL: an index or a "
            "label name)")
    if isinstance(reward_label, str) and not reward_label.lstrip("-").isdigit():
        by_name = {str(v): int(k) for k, v in config.id2label.items()}
        if reward_label not in by_name:
            raise ModelLoadError(f"{name}: no label {reward_label!r}; labels are {sorted(by_name)}")
        return by_name[reward_label]
    index = int(reward_label)
    if not 0 <= index < labels:
        raise ModelLoadError(f"{name}: reward label index {index} is outside 0..{labels - 1}")
    return index


def strip_repeats(text: str, unit: str) -> str:
    """``text`` without leading and trailing repeats of ``unit``, in linear time and in C (a
    loop of slices copies the string once per repeat: quadratic, 100 s on a 4 MB query; a
    Python loop over the repeats holds the GIL against the event loop)."""
    repeats = re.compile(f"(?:{re.escape(unit)})*")
    start = repeats.match(text).end()
    backwards = re.compile(f"(?:{re.escape(unit[::-1])})*")
    tail = backwards.match(text[::-1], 0, len(text) - start).end()
    return text[start : len(text) - tail]
