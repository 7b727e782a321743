"""A causal-LM policy π_θ: load by reference, optional LoRA, sample, and score log π(y|x).

Used by OOD-PL meta-training (the inner loop's policy), meta-test adaptation and DPO.
``sequence_logprobs`` is differentiable and can run on substituted parameters
(``params=``, through :func:`torch.func.functional_call`) so that callers can evaluate the
policy at snapshots θ_t, differentiate through an unrolled inner loop, or take a
forward-mode directional derivative with :func:`torch.func.jvp`.

Prompts are rendered with the tokenizer's chat template (a user turn plus the generation
prompt) when it has one and plain text otherwise. A response given as text is the
assistant's text, tokenized, followed by EOS under a chat template (the end of the turn is
part of the answer) and not in plain-text mode (a continuation has no natural end). A
response the policy sampled is a :class:`Sample`: its log-likelihood is that of the token
ids it was sampled as (ending in EOS only if the model emitted EOS), never of its decoded
text re-tokenized, which can split differently, lose tokens the decoder skips, or gain an
EOS a truncated sample never had.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from training.atomic import utc_now, write_json_atomic
from training.models import resolve_pretrained
from training.precision import autocast, pick_device, pick_dtype
from training.registry import METADATA_FILE

log = logging.getLogger(__name__)


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft). Dropout defaults to 0 so log π is deterministic."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: peft's default for the architecture


@dataclass(frozen=True)
class Sample:
    """One response sampled from the policy.

    ``text`` is what a reward model scores (decoded without special tokens, stripped);
    ``token_ids`` are the generated ids exactly as sampled, up to and including the first
    EOS and nothing after it (no padding); ``finished`` is True iff that EOS is there, False
    when ``max_new_tokens`` cut the response.
    """

    text: str
    token_ids: tuple[int, ...]
    finished: bool


Response = str | Sample  # text is tokenized (+ EOS under a chat template); a Sample keeps its ids


@dataclass
class PolicyBatch:
    """Right-padded prompt+response token ids and a mask of the response tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # 1 where the token is part of the response (a target)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class Policy:
    """A causal LM and its tokenizer; ``model`` is a peft model when LoRA is on."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        reference: str = "",
        chat_template: bool | None = None,
        max_prompt_tokens: int = 256,
        max_response_tokens: int = 256,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.reference = reference
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if chat_template is None else chat_template
        if self.use_chat_template and not has_template:
            raise ValueError(f"{reference}: chat_template=True but the tokenizer has none")
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.autocast_dtype: torch.dtype | None = None  # mixed precision (set by trainers)
        self._keeps_logits_by_mask = keeps_logits_by_mask(model)
        if tokenizer.pad_token_id is None:
            # Padding is always masked, so any id serves; EOS is what generate() expects.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        reference: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        lora: LoraSpec | None = None,
        chat_template: bool | None = None,
        max_prompt_tokens: int = 256,
        max_response_tokens: int = 256,
        artifacts_dir: str | Path = "artifacts",
        trainable: bool = True,
        seed: int = 0,
        attn_implementation: str | None = "eager",
    ) -> Policy:
        """Load a causal LM (a short name, local dir or hub id, or a saved LoRA adapter dir).

        ``lora`` adds a fresh adapter (seeded); a directory holding ``adapter_config.json``
        loads its base model and that adapter. Eager attention is the default because
        forward-mode AD and double backward are supported there on every backend.
        """
        path = resolve_pretrained(str(reference), artifacts_dir)
        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        adapter_config = Path(path) / "adapter_config.json"
        if adapter_config.is_file():
            base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
            model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
            if lora is not None:
                raise ValueError(f"{path} already holds a LoRA adapter; pass lora=None")
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            if lora is not None:
                model = add_lora(model, lora, seed=seed)
            elif not trainable:
                model.requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model.to(torch_device).eval()
        return cls(
            model,
            tokenizer,
            reference=str(reference),
            chat_template=chat_template,
            max_prompt_tokens=max_prompt_tokens,
            max_response_tokens=max_response_tokens,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """θ: the LoRA parameters, or every parameter when fully fine-tuned."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ text -> ids
    def prompt_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if self.use_chat_template:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            has_bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
            ids = tok(text, add_special_tokens=not has_bos)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        if len(ids) > self.max_prompt_tokens:  # keep the end of the prompt, next to the answer
            lead = 1 if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else 0
            ids = ids[:lead] + ids[len(ids) - (self.max_prompt_tokens - lead) :]
        return ids

    def response_ids(self, response: str) -> list[int]:
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = ids[: self.max_response_tokens]
        eos = self.tokenizer.eos_token_id
        if self.use_chat_template and eos is not None:
            ids = [*ids, eos]
        return ids

    def encode(self, prompts: Sequence[str], responses: Sequence[Response]) -> PolicyBatch:
        """Prompts and responses → a batch; a :class:`Sample` keeps its sampled ids."""
        return self.encode_ids(prompts, [r.token_ids if isinstance(r, Sample) else self.response_ids(r)
                                         for r in responses])

    def encode_ids(self, prompts: Sequence[str], response_ids: Sequence[Sequence[int]]) -> PolicyBatch:
        """Prompts (rendered as for sampling) followed by these exact response ids: no
        re-tokenization, no EOS appended, no truncation of the response."""
        if len(prompts) != len(response_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(response_ids)} responses")
        rows = [(self.prompt_ids(p), list(r)) for p, r in zip(prompts, response_ids, strict=True)]
        width = max(len(p) + len(r) for p, r in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        response_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            input_ids[i, : len(p) + len(r)] = torch.as_tensor(p + r, dtype=torch.long)
            attention[i, : len(p) + len(r)] = 1
            response_mask[i, len(p) : len(p) + len(r)] = 1
        device = self.device
        return PolicyBatch(input_ids.to(device), attention.to(device), response_mask.to(device))

    # ------------------------------------------------------------------ log-likelihoods
    def batch_logprobs(
        self, batch: PolicyBatch, params: Mapping[str, torch.Tensor] | None = None,
        *, module: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """log π(y|x) summed over response tokens, shape (B,), differentiable.

        ``params`` substitutes some of the model's parameters (by ``named_parameters``
        name) for this call only; the others are the module's own. ``module``: what to run
        instead of ``self.model`` — a distributed wrapper of it (DDP) in training.

        Only the positions that predict a response token go through the LM head and the
        log-softmax: over a vocabulary of tens of thousands, the prompt positions' logits
        cost about a quarter of a LoRA step on CPU (SmolLM2-135M, 16 sequences of 65
        tokens: 10.0 s forward + backward with every position's logits, 7.7 s without).
        """
        predicts_response = torch.zeros_like(batch.response_mask, dtype=torch.bool)
        predicts_response[:, :-1] = batch.response_mask[:, 1:].bool()  # position t predicts t+1
        inputs: dict[str, Any] = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "use_cache": False,
        }
        if self._keeps_logits_by_mask:
            inputs["logits_to_keep"] = predicts_response
        with autocast(self.device, self.autocast_dtype):
            if params is None:
                logits = (module or self.model)(**inputs).logits
            else:
                logits = torch.func.functional_call(self.model, dict(params), args=(),
                                                    kwargs=inputs).logits
        logits = logits.to(self.dtype)  # the log-softmax in the weights' precision
        if not self._keeps_logits_by_mask:
            logits = logits[predicts_response]
        targets = batch.input_ids[:, 1:][predicts_response[:, :-1]]
        token_logp = -F.cross_entropy(logits, targets, reduction="none")
        rows = torch.arange(len(batch), device=token_logp.device).unsqueeze(1).expand_as(predicts_response)
        return torch.zeros(len(batch), dtype=token_logp.dtype, device=token_logp.device).index_add(
            0, rows[predicts_response], token_logp
        )

    def sequence_logprobs(
        self,
        prompts: Sequence[str],
        responses: Sequence[Response],
        *,
        params: Mapping[str, torch.Tensor] | None = None,
        module: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        return self.batch_logprobs(self.encode(prompts, responses), params, module=module)

    @torch.no_grad()
    def logprobs_chunked(
        self,
        prompts: Sequence[str],
        responses: Sequence[Response],
        *,
        batch_size: int = 16,
        reference: bool = False,
    ) -> torch.Tensor:
        """Non-differentiable log π(y|x) in chunks; ``reference=True`` disables the adapter."""
        out = []
        for start in range(0, len(prompts), batch_size):
            batch = self.encode(prompts[start : start + batch_size], responses[start : start + batch_size])
            if reference:
                with self.reference_mode():
                    out.append(self.batch_logprobs(batch))
            else:
                out.append(self.batch_logprobs(batch))
        if not out:
            return torch.zeros(0)
        return torch.cat(out).float().cpu()

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """No mixed precision inside (finite differences: a bf16 central difference is noise)."""
        saved, self.autocast_dtype = self.autocast_dtype, None
        try:
            yield
        finally:
            self.autocast_dtype = saved

    def reference_mode(self):
        """Context in which the model is π_ref: the LoRA adapter disabled."""
        if not self.is_lora:
            raise ValueError("reference log-probs need a LoRA policy (or a separate reference)")
        return self.model.disable_adapter()

    # ------------------------------------------------------------------ sampling
    def sample(self, prompts: Sequence[str], k: int = 1, **sampling: Any) -> list[list[str]]:
        """The texts of :meth:`sample_responses` (same arguments): what a reward model scores."""
        return [[s.text for s in group] for group in self.sample_responses(prompts, k, **sampling)]

    @torch.no_grad()
    def sample_responses(
        self,
        prompts: Sequence[str],
        k: int = 1,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 16,
    ) -> list[list[Sample]]:
        """k samples per prompt (``temperature=0``: greedy, k copies), in prompt order."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        was_training = self.model.training
        self.model.eval()
        results: list[list[Sample]] = []
        prompts_per_call = max(1, batch_size // max(k, 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), prompts_per_call):
                chunk = [self.prompt_ids(p) for p in prompts[start : start + prompts_per_call]]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, ids in enumerate(chunk):  # left padding: generation continues every row
                    input_ids[i, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
                    attention[i, width - len(ids) :] = 1
                sampling = temperature > 0
                with autocast(self.device, self.autocast_dtype):
                    generated = self.model.generate(
                        input_ids=input_ids.to(self.device),
                        attention_mask=attention.to(self.device),
                        do_sample=sampling,
                        temperature=temperature if sampling else None,
                        top_p=top_p if sampling else None,
                        top_k=0 if sampling else None,
                        num_return_sequences=k if sampling else 1,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=eos,
                    )
                samples = [self._as_sample(row) for row in generated[:, width:].tolist()]
                if not sampling:  # greedy: one decode per prompt, repeated
                    samples = [s for s in samples for _ in range(k)]
                for i in range(len(chunk)):
                    results.append(samples[i * k : (i + 1) * k])
        self.model.train(was_training)
        return results

    def _as_sample(self, generated: list[int]) -> Sample:
        """A row of generate()'s new tokens → the sample: cut after the first EOS (what
        follows is padding); a row without EOS ran to ``max_new_tokens``."""
        eos = self.tokenizer.eos_token_id
        finished = eos is not None and eos in generated
        ids = generated[: generated.index(eos) + 1] if finished else generated
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Sample(text, tuple(ids), finished)

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        directory: str | Path,
        *,
        merge: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save the adapter (or, with ``merge``, a merged full model) + tokenizer + metadata."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.is_lora and merge:
            # one dtype for the saved model: the base may hold bf16 copies of frozen layers
            # (training.precision.cast_frozen_linears)
            merged = copy.deepcopy(self.model).merge_and_unload().to(self.dtype)
            merged.save_pretrained(str(directory), safe_serialization=True)
        else:
            self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
        info = {
            "kind": "policy",
            "base_model": self.reference,
            "lora": self.is_lora and not merge,
            "merged": self.is_lora and merge,
            "chat_template": self.use_chat_template,
            "created_at": utc_now(),
            **(metadata or {}),
        }
        write_json_atomic(directory / METADATA_FILE, info)
        return directory


def keeps_logits_by_mask(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model under its LoRA adapter) takes a boolean (batch, seq)
    ``logits_to_keep`` and returns logits of the kept positions only, flattened. transformers
    models that slice through ``slice_logits_to_keep`` do; older or remote-code models that
    take only an int fall back to full logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
        return False
    return getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None) is not None


def add_lora(model: torch.nn.Module, spec: LoraSpec, *, seed: int = 0) -> torch.nn.Module:
    """Wrap ``model`` with a fresh, seeded LoRA adapter; only the adapter trains."""
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def lora_from_fields(r: int, alpha: int, targets: list[str] | None) -> LoraSpec | None:
    """Config fields → LoraSpec; ``r == 0`` means full fine-tuning (no adapter)."""
    return LoraSpec(r=r, alpha=alpha, target_modules=targets) if r > 0 else None


def kl_estimate(
    policy: Policy,
    prompts: Sequence[str],
    responses: Sequence[Response],
    reference: Policy | None = None,
    *,
    batch_size: int = 16,
) -> float:
    """Monte-Carlo KL(π‖π_ref) = E_{y~π}[log π(y|x) − log π_ref(y|x)] over samples of π.

    ``responses`` must be samples of ``policy``, given as :class:`Sample` records so that
    both log-likelihoods are of the tokens that were sampled (text would be re-tokenized,
    which is not what π drew); ``reference=None`` means the policy with its LoRA adapter
    disabled.
    """
    if not prompts:
        return 0.0
    logp = policy.logprobs_chunked(prompts, responses, batch_size=batch_size)
    if reference is None:
        ref = policy.logprobs_chunked(prompts, responses, batch_size=batch_size, reference=True)
    else:
        ref = reference.logprobs_chunked(prompts, responses, batch_size=batch_size)
    return float((logp - ref).mean())
