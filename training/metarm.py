"""MetaRM: keep a reward model discriminative on a shifted distribution (arXiv 2405.00438).

One step (DESIGN §7, first order):

1. meta batch X_s: prompts with k responses each from the shifted distribution (the current
   policy's samples, or a new domain's); the difference objective
   ``J(φ) = 2/k² · Σ_{i<j} σ(|r_φ(x,s_i) − r_φ(x,s_j)|)``, averaged over the meta prompts;
2. ascent ``φ' = φ + η ∇J(φ)``;
3. Bradley–Terry loss on the preference batch X_t evaluated at φ'; its gradient ``∇_φ' L_BT``
   is handed to the optimizer at φ (the parameters are restored before the step).

The update is exact: the parameters are snapshotted before the ascent and copied back before
``optimizer.step()``, so the optimizer (and its state) only ever sees φ. With ``meta_lr = 0``
the trainer is plain Bradley–Terry training (the "vanilla" baseline), diagnostics included.

Diagnostics, before and after training: on the shifted samples, the mean |r(x,s_i) − r(x,s_j)|
and the variance of r(x,s_i) − r(x,s_j) over the responses to the same prompt (the quantity
that collapses when an RM stops telling a drifted policy's responses apart); on the source
pairs, the accuracy P(r_chosen > r_rejected).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.callbacks import NullCallback, TrainerCallback, TrainingCancelled
from training.checkpoint import load_latest, restore_checkpoint, save_checkpoint, write_json_atomic

OPTIMIZERS = ("adamw", "sgd")
APPLY_AT = ("phi", "phi_prime")
DEVICES_PREFIXES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")


@dataclass
class MetaRMConfig:
    """Everything a MetaRM run needs; every field has a default except the data."""

    model: str = "minilm"
    """RM to start from: short name (``minilm``), local directory or hub id."""
    pairs_path: str | None = None
    """Source preference pairs (JSONL read by ``training.data.load_pairs``); X_t is drawn from
    them. Not needed when the pairs are passed to the trainer in memory."""
    samples_path: str | None = None
    """Shifted-distribution samples (``training.data.load_samples``: prompt + responses);
    X_s is drawn from them. Not needed when passed in memory, or when ``meta_lr == 0``."""
    output_dir: str = "artifacts/metarm"
    """Run directory: ``checkpoints/``, ``final/`` (the trained RM) and ``metrics.json``."""

    meta_lr: float = 1e-3
    """η, the size of the ascent step on J. 0 turns MetaRM into vanilla Bradley–Terry."""
    responses_per_prompt: int = 4
    """k: responses per meta prompt (a random k when a prompt has more; all of them, if at
    least 2, when it has fewer)."""
    batch_size: int = 8
    """Preference pairs per step (|X_t|)."""
    meta_batch_size: int = 4
    """Meta prompts per step (|X_s|); each brings k responses."""
    epochs: float = 1.0
    """Passes over the preference pairs; fractional values allowed."""
    max_steps: int | None = None
    """Stop after this many steps even if the epochs are not done."""

    apply_at: str = "phi_prime"
    """Where the BT step lands. ``phi_prime`` (default): the ascent is kept,
    φ ← φ' − lr·∇L_BT(φ') — ascend J, then descend L_BT (the alternating reading of the paper).
    ``phi`` (DESIGN §7's literal form): the ascent is undone and the gradient taken at φ' is
    applied to φ. The default departs from DESIGN on purpose: to first order in η the ``phi``
    form adds −lr·η·H_BT·∇J to vanilla's step, whose inner product with ∇J is ≤ 0 (H_BT is
    positive semi-definite), so it cannot raise J and measurably lowers the shifted variance
    MetaRM exists to keep (README, "MetaRM")."""

    lr: float = 1e-5
    """Learning rate of the optimizer applying the BT gradient (at φ' or φ, per ``apply_at``)."""
    optimizer: str = "adamw"
    """``adamw`` or ``sgd`` (plain, no momentum)."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear learning-rate warm-up, then constant."""
    max_grad_norm: float | None = 1.0
    """Clip the BT gradient (at φ') before it is applied; None disables clipping."""
    disable_dropout: bool = True
    """Run the RM without dropout while training (as TRL's RewardTrainer does): the ascent and
    the BT loss then see the same function."""

    max_input_tokens: int = 512
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    checkpoint_every: int = 100
    """Steps between checkpoints (a checkpoint is also written on cancel and at the end)."""
    resume: bool = True
    """Continue from the newest complete checkpoint in ``output_dir`` if there is one."""
    max_diagnostic_pairs: int = 512
    """Source pairs used for the accuracy diagnostic (the first N)."""
    max_diagnostic_prompts: int = 256
    """Shifted prompts used for the reward-difference diagnostics (the first N)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        bad = _type_errors(self)
        if bad:  # range checks below would fail on the wrong types with obscure messages
            raise ValueError("invalid MetaRMConfig: " + "; ".join(bad))

        def need(ok: bool, message: str) -> None:
            if not ok:
                bad.append(message)

        need(self.meta_lr >= 0, f"meta_lr must be >= 0, not {self.meta_lr!r}")
        need(
            self.responses_per_prompt >= 2,
            f"responses_per_prompt must be >= 2, not {self.responses_per_prompt!r}",
        )
        need(self.batch_size >= 1, f"batch_size must be >= 1, not {self.batch_size!r}")
        need(
            self.meta_batch_size >= 1, f"meta_batch_size must be >= 1, not {self.meta_batch_size!r}"
        )
        need(self.epochs > 0, f"epochs must be > 0, not {self.epochs!r}")
        need(
            self.max_steps is None or self.max_steps >= 1,
            f"max_steps must be >= 1 or null, not {self.max_steps!r}",
        )
        need(self.lr > 0, f"lr must be > 0, not {self.lr!r}")
        need(
            self.optimizer in OPTIMIZERS,
            f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}",
        )
        need(
            self.apply_at in APPLY_AT,
            f"apply_at must be one of {APPLY_AT}, not {self.apply_at!r}",
        )
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, not {self.weight_decay!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, not {self.warmup_steps!r}")
        need(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm must be > 0 or null, not {self.max_grad_norm!r}",
        )
        need(
            self.max_input_tokens >= 8,
            f"max_input_tokens must be >= 8, not {self.max_input_tokens!r}",
        )
        need(
            isinstance(self.device, str) and self.device.split(":")[0] in DEVICES_PREFIXES,
            f"device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}",
        )
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        need(
            self.checkpoint_every >= 1,
            f"checkpoint_every must be >= 1, not {self.checkpoint_every!r}",
        )
        need(
            self.max_diagnostic_pairs >= 1,
            f"max_diagnostic_pairs must be >= 1, not {self.max_diagnostic_pairs!r}",
        )
        need(
            self.max_diagnostic_prompts >= 1,
            f"max_diagnostic_prompts must be >= 1, not {self.max_diagnostic_prompts!r}",
        )
        need(isinstance(self.model, str) and bool(self.model), "model must be a non-empty string")
        if bad:
            raise ValueError("invalid MetaRMConfig: " + "; ".join(bad))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MetaRMConfig:
        """Build from a job spec; unknown keys and bad values raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MetaRMConfig keys: {', '.join(unknown)}")
        try:
            return cls(**dict(values))
        except TypeError as exc:  # a comparison on a value of the wrong type
            raise ValueError(f"invalid MetaRMConfig value: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "None": (type(None),),
}


def _type_errors(config: Any) -> list[str]:
    """One message per field whose value does not match its annotation (bool is no number)."""
    errors = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        allowed = [name.strip() for name in str(f.type).split("|")]
        types = tuple(t for name in allowed for t in _TYPES.get(name, (object,)))
        is_bool_as_number = isinstance(value, bool) and "bool" not in allowed
        if not isinstance(value, types) or is_bool_as_number:
            errors.append(f"{f.name} must be {' or '.join(allowed)}, not {value!r}")
    return errors


@dataclass
class MetaRMResult:
    model_dir: Path
    """``output_dir/final``: loadable with ``RewardModel.from_pretrained``."""
    metrics: dict[str, Any]
    """Flat: ``*_before`` / ``*_after`` diagnostics, ``steps``, last-step losses, reward stats."""
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-step ``bt_loss`` and ``meta_objective`` of this process's steps (not resumed ones)."""


# ---------------------------------------------------------------------------- data rows
def _get(row: Any, name: str) -> Any:
    return row[name] if isinstance(row, Mapping) else getattr(row, name)


def _response_text(response: Any) -> str:
    if isinstance(response, str):
        return response
    if isinstance(response, Mapping):
        for key in ("response", "text", "content"):
            if isinstance(response.get(key), str):
                return response[key]
    raise ValueError(f"a sampled response must be a string, not {type(response).__name__}")


def pair_triples(pairs: Sequence[Any]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) of PreferencePair objects or mappings."""
    return [(_get(p, "prompt"), _get(p, "chosen"), _get(p, "rejected")) for p in pairs]


def sample_groups(samples: Sequence[Any]) -> list[tuple[str, list[str]]]:
    """(prompt, responses) of PromptSamples objects or mappings; prompts with < 2 responses
    are dropped (no difference to take)."""
    groups = []
    for row in samples:
        responses = [_response_text(r) for r in _get(row, "responses")]
        if len(responses) >= 2:
            groups.append((_get(row, "prompt"), responses))
    return groups


# ---------------------------------------------------------------------------- objectives
def _rewards(rm: Any, items: list[dict[str, str]]) -> torch.Tensor:
    input_ids, mask = rm.pad([rm.encode(item) for item in items])
    return rm.forward(input_ids, mask)


def bradley_terry_loss(rm: Any, triples: Sequence[tuple[str, str, str]]) -> torch.Tensor:
    """``−mean log σ(r_c − r_r)`` with chosen and rejected in one padded forward pass."""
    items = [{"prompt": p, "response": c} for p, c, _ in triples]
    items += [{"prompt": p, "response": r} for p, _, r in triples]
    rewards = _rewards(rm, items)
    n = len(triples)
    return -F.logsigmoid(rewards[:n] - rewards[n:]).mean()


def difference_objective(rm: Any, groups: Sequence[tuple[str, list[str]]]) -> torch.Tensor:
    """J = mean over prompts of ``2/k² · Σ_{i<j} σ(|r_i − r_j|)`` (k = that prompt's count)."""
    items = [{"prompt": p, "response": s} for p, responses in groups for s in responses]
    rewards = _rewards(rm, items)
    per_prompt = []
    start = 0
    for _, responses in groups:
        k = len(responses)
        r = rewards[start : start + k]
        start += k
        i, j = torch.triu_indices(k, k, offset=1, device=r.device)
        per_prompt.append(2.0 / k**2 * torch.sigmoid((r[i] - r[j]).abs()).sum())
    return torch.stack(per_prompt).mean()


# ---------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def _score_all(rm: Any, items: list[dict[str, str]], batch_size: int = 32) -> torch.Tensor:
    out = [
        _rewards(rm, items[s : s + batch_size]).float().cpu()
        for s in range(0, len(items), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0)


def source_accuracy(rm: Any, triples: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """Accuracy P(r_c > r_r), mean margin, and the reward mean/std over all responses."""
    if not triples:
        return {}
    items = [{"prompt": p, "response": c} for p, c, _ in triples]
    items += [{"prompt": p, "response": r} for p, _, r in triples]
    rewards = _score_all(rm, items)
    n = len(triples)
    margin = rewards[:n] - rewards[n:]
    return {
        "source_accuracy": float((margin > 0).float().mean()),
        "source_margin": float(margin.mean()),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
    }


def reward_difference_stats(rm: Any, groups: Sequence[tuple[str, list[str]]]) -> dict[str, float]:
    """Reward differences among responses to the same prompt, over every ordered pair i ≠ j.

    The signed differences are symmetric (mean 0), so their variance is E[d²]; ``mean`` is
    E|d|, ``objective`` is J at these samples.
    """
    if not groups:
        return {}
    items = [{"prompt": p, "response": s} for p, responses in groups for s in responses]
    rewards = _score_all(rm, items)
    diffs, objectives = [], []
    start = 0
    for _, responses in groups:
        k = len(responses)
        r = rewards[start : start + k]
        start += k
        d = r[:, None] - r[None, :]
        off_diagonal = ~torch.eye(k, dtype=torch.bool)
        diffs.append(d[off_diagonal])
        objectives.append(float(torch.sigmoid(d.abs()).triu(1).sum()) * 2.0 / k**2)
    all_diffs = torch.cat(diffs)
    return {
        "shifted_diff_mean": float(all_diffs.abs().mean()),
        "shifted_diff_var": float(all_diffs.pow(2).mean()),
        "shifted_objective": sum(objectives) / len(objectives),
    }


# ---------------------------------------------------------------------------- trainer
class MetaRMTrainer:
    """Train a reward model with MetaRM; ``train()`` returns a :class:`MetaRMResult`.

    ``pairs`` / ``samples`` may be given in memory (PreferencePair / PromptSamples objects or
    mappings with the same fields); otherwise they are read from the config's paths.
    """

    def __init__(
        self,
        config: MetaRMConfig,
        callback: TrainerCallback | None = None,
        *,
        pairs: Sequence[Any] | None = None,
        samples: Sequence[Any] | None = None,
    ) -> None:
        self.config = config
        self.callback = callback or NullCallback()
        self._pairs_given = pairs
        self._samples_given = samples
        self.reward_model: Any = None  # the RewardModel being trained, set by train()

    # ------------------------------------------------------------------ data
    def _load_data(self) -> tuple[list[tuple[str, str, str]], list[tuple[str, list[str]]]]:
        cfg = self.config
        pairs = self._pairs_given
        if pairs is None:
            if not cfg.pairs_path:
                raise ValueError("MetaRM needs source preference pairs: set pairs_path")
            from training.data import load_pairs

            pairs = load_pairs(cfg.pairs_path)
        samples = self._samples_given
        if samples is None and cfg.samples_path:
            from training.data import load_samples

            samples = load_samples(cfg.samples_path)
        triples = pair_triples(pairs)
        groups = sample_groups(samples or [])
        if not triples:
            raise ValueError("MetaRM needs at least one source preference pair")
        if cfg.meta_lr > 0 and not groups:
            raise ValueError(
                "MetaRM with meta_lr > 0 needs shifted samples with at least 2 responses per "
                "prompt: set samples_path (or meta_lr = 0 for vanilla Bradley–Terry)"
            )
        return triples, groups

    def total_steps(self, n_pairs: int) -> int:
        per_epoch = math.ceil(n_pairs / self.config.batch_size)
        total = max(1, math.ceil(per_epoch * self.config.epochs))
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def _generator(self, *salt: int) -> torch.Generator:
        # Every random choice is a pure function of (seed, step/epoch): resume replays exactly.
        seed = self.config.seed
        for value in salt:
            seed = (seed * 1_000_003 + value + 1) % (1 << 62)
        return torch.Generator().manual_seed(seed)

    def _pair_batch(self, triples: list, step: int) -> list[tuple[str, str, str]]:
        size = self.config.batch_size
        per_epoch = math.ceil(len(triples) / size)
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(len(triples), generator=self._generator(1, epoch)).tolist()
        return [triples[i] for i in order[offset * size : (offset + 1) * size]]

    def _meta_batch(self, groups: list, step: int) -> list[tuple[str, list[str]]]:
        size = min(self.config.meta_batch_size, len(groups))
        per_cycle = math.ceil(len(groups) / size)
        cycle, offset = divmod(step, per_cycle)
        order = torch.randperm(len(groups), generator=self._generator(2, cycle)).tolist()
        chosen = [groups[i] for i in order[offset * size : (offset + 1) * size]]
        k = self.config.responses_per_prompt
        gen = self._generator(3, step)
        batch = []
        for prompt, responses in chosen:
            if len(responses) > k:
                keep = sorted(torch.randperm(len(responses), generator=gen)[:k].tolist())
                responses = [responses[i] for i in keep]
            batch.append((prompt, responses))
        return batch

    # ------------------------------------------------------------------ pieces
    def _load_model(self) -> Any:
        from training.models import resolve_pretrained
        from training.reward_model import RewardModel

        cfg = self.config
        rm = RewardModel.from_pretrained(
            resolve_pretrained(cfg.model),
            device=cfg.device,
            dtype=cfg.dtype,
            max_input_tokens=cfg.max_input_tokens,
            seed=cfg.seed,
        )
        rm.model.train(not cfg.disable_dropout)
        for param in rm.model.parameters():
            param.requires_grad_(True)
        return rm

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _diagnostics(self, rm: Any, triples: list, groups: list) -> dict[str, float]:
        was_training = rm.model.training
        rm.model.eval()
        try:
            stats = source_accuracy(rm, triples[: self.config.max_diagnostic_pairs])
            stats.update(reward_difference_stats(rm, groups[: self.config.max_diagnostic_prompts]))
        finally:
            rm.model.train(was_training)
        return stats

    def meta_step(
        self,
        rm: Any,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        pair_batch: Sequence[tuple[str, str, str]],
        meta_batch: Sequence[tuple[str, list[str]]],
    ) -> dict[str, float]:
        """One MetaRM update of ``params`` (all of r_φ's trainable parameters)."""
        cfg = self.config
        stats: dict[str, float] = {}
        snapshot: list[torch.Tensor] | None = None
        if cfg.meta_lr > 0:
            objective = difference_objective(rm, meta_batch)
            ascent = torch.autograd.grad(objective, params, allow_unused=True)
            if cfg.apply_at == "phi":
                snapshot = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, ascent, strict=True):
                    if g is not None:
                        p.add_(g, alpha=cfg.meta_lr)  # φ' = φ + η ∇J(φ)
            stats["meta_objective"] = float(objective.detach())
        optimizer.zero_grad(set_to_none=True)
        loss = bradley_terry_loss(rm, pair_batch)  # at φ'
        loss.backward()
        if snapshot is not None:
            with torch.no_grad():
                for p, saved in zip(params, snapshot, strict=True):
                    p.copy_(saved)  # back to φ; .grad keeps ∇_φ' L_BT
        if cfg.max_grad_norm is not None:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        stats["bt_loss"] = float(loss.detach())
        return stats

    # ------------------------------------------------------------------ run
    def train(self) -> MetaRMResult:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        triples, groups = self._load_data()
        total = self.total_steps(len(triples))

        rm = self._load_model()
        self.reward_model = rm
        params = [p for p in rm.model.parameters() if p.requires_grad]
        optimizer = self._optimizer(params)
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )

        start = 0
        before: dict[str, float] | None = None
        checkpoint = load_latest(out) if cfg.resume else None
        if checkpoint is not None:
            state = restore_checkpoint(
                checkpoint, model=rm.model, optimizer=optimizer, scheduler=scheduler
            )
            start = int(state["step"])
            before = state["extra"].get("before")
        if before is None:
            before = self._diagnostics(rm, triples, groups)

        def save(step: int) -> Path:
            return save_checkpoint(
                out,
                step=step,
                model=rm.model,
                optimizer=optimizer,
                scheduler=scheduler,
                config=cfg,
                extra={"before": before},
            )

        history: list[dict[str, float]] = []
        last: dict[str, float] = {}
        for step in range(start, total):
            if self.callback.should_stop():
                raise TrainingCancelled(step, str(save(step)))
            meta_batch = self._meta_batch(groups, step) if cfg.meta_lr > 0 else []
            last = self.meta_step(
                rm, params, optimizer, self._pair_batch(triples, step), meta_batch
            )
            scheduler.step()
            last["lr"] = scheduler.get_last_lr()[0]
            history.append(last)
            self.callback.on_progress(step + 1, total, last)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                save(step + 1)
        if start < total:
            save(total)  # a re-run of a finished job resumes here and trains no further

        after = self._diagnostics(rm, triples, groups)
        metrics: dict[str, Any] = {"steps": total, "meta_lr": cfg.meta_lr}
        metrics.update({f"{k}_before": v for k, v in before.items()})
        metrics.update({f"{k}_after": v for k, v in after.items()})
        metrics.update({f"last_{k}": v for k, v in last.items()})
        # The statistics /score's normalize option needs, measured on the source responses.
        for key in ("reward_mean", "reward_std"):
            if key in after:
                metrics[key] = after[key]

        model_dir = _save_final(rm, out)
        write_json_atomic(out / "metrics.json", metrics)
        return MetaRMResult(model_dir=model_dir, metrics=metrics, steps=total, history=history)


def _save_final(rm: Any, out: Path) -> Path:
    """Write ``out/final`` atomically (a temp dir renamed into place)."""
    final = out / "final"
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rm.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
