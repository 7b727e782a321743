"""Reward models that generalrm builds from a bare encoder with mean pooling, and how their
pooling is recorded beside the weights (sentence-transformers' layout).

A bare encoder (``BertModel``, the packaged all-MiniLM-L6-v2) has no reward head. Hugging
Face's ``AutoModelForSequenceClassification`` would give it one that reads the pooler,
``tanh(dense(h_CLS))``; sentence encoders such as all-MiniLM-L6-v2 were trained with the mean
of their token states instead, and say so in ``1_Pooling/config.json``. A mean-pooled RM is

    r(x) = w · mean_pool(h, m) + b,   mean_pool(h, m) = Σ_t m_t h_t / max(Σ_t m_t, 1e-9)

with ``h`` the encoder's last hidden state, ``m`` the attention mask and (w, b) a linear
score head. It is saved in the layout sentence-transformers reads (``modules.json``):

    config.json, model.safetensors   the encoder alone, without a pooler: AutoModel loads it
                                     (with add_pooling_layer=False, or with a fresh pooler
                                     the mean never reads)
    tokenizer files
    modules.json                     Transformer "" → Pooling "1_Pooling" → Dense "2_Dense"
    1_Pooling/config.json            pooling_mode_mean_tokens: true
    2_Dense/config.json              in_features H, out_features 1, identity activation
    2_Dense/model.safetensors        linear.weight (1, H), linear.bias (1,)

The score with Hugging Face alone (what :class:`~training.reward_model.RewardModel` serves)::

    enc = tokenizer(prompt, response, return_tensors="pt")
    h = AutoModel.from_pretrained(d)(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    head = safetensors.torch.load_file(f"{d}/2_Dense/model.safetensors")
    r = pooled @ head["linear.weight"].T + head["linear.bias"]

A directory whose ``modules.json`` ends in such a one-output Dense after a mean Pooling is a
mean-pooled RM; one with a Pooling and no reward Dense is a bare sentence encoder, whose
Pooling says how it was trained (what ``pooling: auto`` follows).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import cached_file

MODULES_FILE = "modules.json"
POOLING_DIR = "1_Pooling"
HEAD_DIR = "2_Dense"
HEAD_WEIGHTS = "model.safetensors"
# sentence-transformers' module types, as modules.json names them
TRANSFORMER_TYPE = "sentence_transformers.models.Transformer"
POOLING_TYPE = "sentence_transformers.models.Pooling"
DENSE_TYPE = "sentence_transformers.models.Dense"
IDENTITY = "torch.nn.modules.linear.Identity"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t m_t h_t / max(Σ_t m_t, 1e-9) over the sequence, as sentence-transformers' mean
    pooling; in fp32 at least, so that a bf16 forward pass does not also round the sum."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    mask = attention_mask.unsqueeze(-1).to(dtype)
    return (hidden.to(dtype) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


@dataclass(frozen=True)
class SavedLayout:
    """What a model directory's sentence-transformers files say: the pooling its Pooling
    module uses (``mean``, ``cls``, ...; None without one) and whether a one-output Dense
    after it is a trained reward head."""

    pooling: str | None
    reward_head: bool


def _read_json(source: str, filename: str) -> Any:
    # a local directory or a hub id (cached, offline too); None when the file is absent
    path = cached_file(source, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    return json.loads(Path(path).read_text()) if path else None


def read_layout(source: str) -> SavedLayout:
    """The sentence-transformers layout of ``source`` (see the module docstring)."""
    modules = _read_json(source, MODULES_FILE)
    if not isinstance(modules, list):
        return SavedLayout(None, False)
    by_type = {m.get("type"): m for m in modules if isinstance(m, dict)}
    pooling_module = by_type.get(POOLING_TYPE)
    if pooling_module is None:
        return SavedLayout(None, False)
    pooling_config = _read_json(source, f"{pooling_module['path']}/config.json") or {}
    modes = [mode for mode in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                               "weightedmean_tokens", "lasttoken")
             if pooling_config.get(f"pooling_mode_{mode}")]
    pooling = {"cls_token": "cls", "mean_tokens": "mean"}.get(modes[0], modes[0]) if modes else None
    last = modules[-1] if modules else {}
    head = None
    if last.get("type") == DENSE_TYPE:
        head = _read_json(source, f"{last['path']}/config.json")
    reward_head = (pooling == "mean" and isinstance(head, dict) and head.get("out_features") == 1
                   and head.get("activation_function") == IDENTITY)
    return SavedLayout(pooling, reward_head)


def _without_pooler(config: PretrainedConfig) -> dict[str, Any]:
    # a pooler nobody reads would be a parameter without a gradient, which DDP
    # (find_unused_parameters=False) refuses; build the encoder without it where it can be
    try:
        model_class = AutoModel._model_mapping[type(config)]
    except KeyError:  # an architecture with its own code: built as it is
        return {}
    parameters = inspect.signature(model_class.__init__).parameters
    return {"add_pooling_layer": False} if "add_pooling_layer" in parameters else {}


class MeanPooledRewardModel(torch.nn.Module):
    """encoder → :func:`mean_pool` → ``classifier`` (Linear(H, 1)): the reward model of the
    module docstring. ``config`` is the encoder's (num_labels 1), so the code that reads a
    Hugging Face classifier's config reads this one alike; the head is named ``classifier`` as
    BERT's, so that peft's sequence-classification LoRA trains it in full."""

    def __init__(self, encoder: torch.nn.Module, classifier: torch.nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier
        self.config: PretrainedConfig = encoder.config
        # FSDP's wrap policy looks for the blocks here, as on a Hugging Face model
        self._no_split_modules = getattr(encoder, "_no_split_modules", None)

    @classmethod
    def from_pretrained(cls, source: str, config: PretrainedConfig, *, new_head: bool,
                        dtype: torch.dtype | None = None,
                        **model_kwargs: Any) -> tuple[MeanPooledRewardModel, list[str]]:
        """The encoder of ``source`` with its saved head (``2_Dense``), or with a new one
        (``new_head``; initialised as Hugging Face initialises BERT's classifier, from the
        caller's torch seed). Returns the model and the weights that are not in ``source``."""
        config.num_labels = 1  # one logit, the reward (a bare encoder's config says 2)
        encoder, info = AutoModel.from_pretrained(
            source, config=config, dtype=dtype, output_loading_info=True,
            **_without_pooler(config), **model_kwargs)
        missing = sorted(info.get("missing_keys", ()))
        classifier = torch.nn.Linear(config.hidden_size, 1, dtype=encoder.dtype)
        if new_head:
            classifier.weight.data.normal_(0.0, getattr(config, "initializer_range", 0.02))
            classifier.bias.data.zero_()
            missing += ["classifier.weight", "classifier.bias"]
        else:
            path = cached_file(source, f"{HEAD_DIR}/{HEAD_WEIGHTS}")
            state = load_file(path)
            classifier.load_state_dict({"weight": state["linear.weight"],
                                        "bias": state["linear.bias"]})
        return cls(encoder, classifier), missing

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.encoder.get_input_embeddings()

    @property
    def is_gradient_checkpointing(self) -> bool:
        # peft asks; absent, it would assume so and hook the embeddings' outputs
        # (transformers 5 renamed the property; the old name warns)
        flag = getattr(self.encoder, "is_activation_checkpointing", None)
        if flag is None:
            flag = getattr(self.encoder, "is_gradient_checkpointing", False)
        return bool(flag)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                output_hidden_states: bool | None = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        # peft's wrapper passes labels / return_dict / output_attentions=None: nothing to do
        for unused in ("labels", "return_dict"):
            kwargs.pop(unused, None)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self.encoder(**inputs, output_hidden_states=output_hidden_states, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones(out.last_hidden_state.shape[:2],
                                        device=out.last_hidden_state.device)
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        logits = self.classifier(pooled.to(self.classifier.weight.dtype))
        return SequenceClassifierOutput(logits=logits, hidden_states=out.hidden_states)

    def save_pretrained(self, directory: str | Path, *, safe_serialization: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The layout of the module docstring; ``state_dict``: the full weights by this
        module's parameter names when the module holds a shard of them (FSDP)."""
        directory = Path(directory)
        state = state_dict if state_dict is not None else self.state_dict()
        encoder_state = {k.removeprefix("encoder."): v for k, v in state.items()
                         if k.startswith("encoder.")}
        self.encoder.save_pretrained(str(directory), safe_serialization=safe_serialization,
                                     state_dict=encoder_state)
        hidden = int(self.config.hidden_size)
        (directory / POOLING_DIR).mkdir(parents=True, exist_ok=True)
        (directory / HEAD_DIR).mkdir(parents=True, exist_ok=True)
        _write_json(directory / MODULES_FILE, [
            {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE},
            {"idx": 1, "name": "1", "path": POOLING_DIR, "type": POOLING_TYPE},
            {"idx": 2, "name": "2", "path": HEAD_DIR, "type": DENSE_TYPE},
        ])
        _write_json(directory / POOLING_DIR / "config.json", {
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False})
        _write_json(directory / HEAD_DIR / "config.json", {
            "in_features": hidden, "out_features": 1, "bias": True,
            "activation_function": IDENTITY})
        head = {"linear.weight": state["classifier.weight"], "linear.bias": state["classifier.bias"]}
        save_file({k: v.detach().to("cpu").contiguous() for k, v in head.items()},
                  str(directory / HEAD_DIR / HEAD_WEIGHTS))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
