"""The reward models the benchmark compares: one ``Method`` per row, in a registry.

A method is ``fit(context, seed) -> Fitted``: it trains a fast-track RM (heads on cached
features, ``bench.evidence.head``) from what the ``TaskContext`` offers — source training
pairs (with any planted noise), the held-out control part's prompts and candidates (unlabeled
for the methods; labeled pairs only for the positive control), and other methods' fitted RMs
of the same seed (``context.fitted``, cached: MetaRM starts from BT's head). Issue 17 adds rows
by registering more methods; the harness evaluates whatever is registered.

The Secrets-II rows reuse the trainer's own pieces: preference strength is
``training.bt.strength_file.strength_rows`` over an ensemble of M heads (member m of seed s
trains with its own seed, like ``StrengthConfig.member_config``); flipping is
``training.bt.trainer.apply_strength``; per-pair smoothing ``pair_smoothing``; the adaptive
margin λ·μ̂ and every loss term come from an ``RMTrainConfig`` through
``training.losses.reward_model_loss``. MetaRM rounds call ``MetaRMTrainer.meta_step`` on a
head (``FeatureRewardModel``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bench.evidence.data import PromptSet, SourcePair, TaskData
from bench.evidence.features import FeatureTable
from bench.evidence.head import (
    FeatureRewardModel,
    HeadSettings,
    PairRows,
    RewardHead,
    frozen_copy,
    new_head,
    score,
    train_head,
)
from bench.evidence.metrics import pairwise_counts, top_k
from training.bt.config import RMTrainConfig
from training.bt.strength_file import strength_rows
from training.bt.trainer import apply_strength, pair_smoothing, set_dropout
from training.data import PreferencePair
from training.losses import LossWeights
from training.metarm.config import MetaRMConfig
from training.metarm.trainer import MetaRMTrainer, sample_groups

IN_MEMORY = "(in memory)"  # RMTrainConfig wants a train_file; the pairs come from the context


@dataclass
class RunSettings:
    """What every method of a run shares (the knobs issue 17 turns)."""

    head: HeadSettings = field(default_factory=HeadSettings)
    strength_members: int = 5
    label_smoothing: float = 0.1
    margin_scale: float = 1.0
    simcse_weight: float = 0.1
    simcse_temperature: float = 0.05
    simcse_dropout: float = 0.05
    combo_selection_seeds: int = 3  # seeds whose source-val M2 decides the combo's components
    metarm_rounds: int = 3
    metarm_steps: int = 40
    metarm_meta_lr: float = 0.1
    # η per update form, picked on the source side (bench.evidence.metarm_select); empty: metarm_meta_lr
    metarm_meta_lr_by_update: dict[str, float] = field(default_factory=dict)
    metarm_meta_lr_grid: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    metarm_select_seeds: int = 3
    metarm_meta_batch: int = 8
    metarm_learning_rate: float = 3e-4
    oodpl_policy: str = "smollm2-135m"
    # α of the inner step. The precomputed coefficients are the hypergradient to first order in α:
    # on SmolLM2 + MiniLM their cosine with the exact one is 0.970-0.988 at 1e-3 and 0.17-0.91 at
    # 0.1 (README), so the rows run at 1e-3, where the surrogate is the paper's gradient
    oodpl_inner_lr: float = 1e-3
    oodpl_beta: float = 1.0
    # the BT term's weight beside the meta term; None: picked on the source val split from the
    # grid (bench.evidence.oodpl.select_bt_weight). At α = 1e-3, 0.01 weighs the two terms as
    # α = 0.1 with weight 1 did (the meta term is linear in α)
    oodpl_bt_weight: float | None = None
    oodpl_bt_weight_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    oodpl_select_seeds: int = 3
    oodpl_precompute_pairs: int = 16
    oodpl_prompts_per_domain: int = 8
    encoder: str = "minilm"  # the RM that MetaTrainer.setup loads (the precompute ignores it)
    artifacts_dir: str = "artifacts"
    cache_dir: str | None = None


@dataclass
class Fitted:
    """A fitted RM: the mean reward of ``heads``; MetaRM also keeps each round's RM."""

    heads: list[RewardHead]
    rounds: list[Fitted] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    row_rewards: dict[int, float] | None = None  # a model scored once (the fine-tune track)


@dataclass
class TaskContext:
    task: str
    data: TaskData
    table: FeatureTable
    features: torch.Tensor  # standardized, the chosen pooling
    settings: RunSettings
    train_pairs: list[SourcePair]  # as labelled: planted flips already swapped
    flipped: list[bool]
    control_pairs: list[SourcePair]
    fits: dict[tuple[str, int], Fitted] = field(default_factory=dict)

    def rows(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        return self.table.index([(prompt, r) for r in responses])

    def pair_rows(self, pairs: Sequence[SourcePair]) -> PairRows:
        return PairRows(self.table.index([(p.prompt, p.chosen) for p in pairs]),
                        self.table.index([(p.prompt, p.rejected) for p in pairs]))

    def rewards(self, fitted: Fitted, prompts: Sequence[PromptSet]) -> list[np.ndarray]:
        """Per prompt, the RM's rewards of its candidates (one scoring pass)."""
        rows = torch.cat([self.rows(ps.prompt, ps.candidates) for ps in prompts])
        flat = self.score(fitted, rows)
        out, start = [], 0
        for ps in prompts:
            out.append(flat[start : start + len(ps.candidates)])
            start += len(ps.candidates)
        return out

    def score(self, fitted: Fitted, rows: torch.Tensor) -> np.ndarray:
        """Rewards of feature rows under ``fitted``."""
        if fitted.row_rewards is not None:
            return np.array([fitted.row_rewards[int(i)] for i in rows], dtype=np.float64)
        return score(fitted.heads, self.features, rows)

    def pair_accuracy(self, fitted: Fitted, pairs: Sequence[SourcePair]) -> float:
        rows = self.pair_rows(pairs)
        d = self.score(fitted, rows.chosen) - self.score(fitted, rows.rejected)
        return float(np.mean(d > 0)) if len(d) else math.nan

    def source_val_accuracy(self, fitted: Fitted) -> float:
        """M2 on the source validation prompts' candidates: what settings, the combo's
        components and the sweep's "best" rows are picked on (never the held-out parts)."""
        prompts = self.data.source_split("val")
        rewards = self.rewards(fitted, prompts)
        counts = [pairwise_counts(r, np.asarray(ps.gold)) for ps, r in zip(prompts, rewards, strict=True)]
        total = sum(c for _, c in counts)
        return sum(c for c, _ in counts) / total if total else math.nan

    def fitted(self, method: str, seed: int) -> Fitted:
        """Another method's RM of this seed (fitted once, then cached)."""
        key = (method, seed)
        if key not in self.fits:
            self.fits[key] = METHODS[method].fit(self, seed)
        return self.fits[key]


@dataclass(frozen=True)
class Method:
    name: str
    paper: str
    claim: str
    fit: Callable[[TaskContext, int], Fitted]
    baseline: str | None = "bt"  # the row it is compared with (paired by seed and prompt)
    role: str = "method"  # "method", "baseline", "control"
    rounds: bool = False  # MetaRM: M3 over rounds
    seeds: int | None = None  # a fixed number of seeds (the fine-tune track), else the run's
    default: bool = True  # run unless asked for by name (--methods) when False


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


# ---------------------------------------------------------------------- Bradley–Terry
def rm_config(**options: Any) -> RMTrainConfig:
    """The train-rm config a Secrets-II option means (only its loss knobs are used here)."""
    return RMTrainConfig.from_dict({"train_file": IN_MEMORY, **options})


def loss_weights(config: RMTrainConfig) -> LossWeights:
    """As ``RMTrainer.__init__`` builds them."""
    return LossWeights(label_smoothing=config.label_smoothing, center_coef=config.center_coef,
                       simcse_weight=config.simcse_weight, simcse_temperature=config.simcse_temperature,
                       simcse_representation=config.simcse_representation)


def fit_bt(ctx: TaskContext, seed: int) -> Fitted:
    return Fitted([train_head(ctx.features, ctx.pair_rows(ctx.train_pairs), ctx.settings.head, seed)])


register(Method("bt", "—", "pooled Bradley–Terry on the source domains", fit_bt, baseline=None,
                role="baseline"))


# ---------------------------------------------------------------------- Secrets of RLHF II
def as_preference_pairs(pairs: Sequence[SourcePair]) -> list[PreferencePair]:
    return [PreferencePair(p.prompt, p.chosen, p.rejected, domain=p.domain, id=p.id) for p in pairs]


def strength(ctx: TaskContext, seed: int) -> tuple[list[float], list[RewardHead]]:
    """μ̂ of every training pair from an ensemble of M heads (``strength_rows``), cached."""
    key = ("_strength", seed)
    if key not in ctx.fits:
        rows = ctx.pair_rows(ctx.train_pairs)
        members, diffs = [], []
        for m in range(ctx.settings.strength_members):
            member_seed = 20_000 + seed * ctx.settings.strength_members + m
            head = train_head(ctx.features, rows, ctx.settings.head, member_seed)
            members.append(head)
            diffs.append((score([head], ctx.features, rows.chosen)
                          - score([head], ctx.features, rows.rejected)).tolist())
        table = strength_rows(as_preference_pairs(ctx.train_pairs), diffs)
        ctx.fits[key] = Fitted(members, info={"mu": [r["mu"] for r in table]})
    cached = ctx.fits[key]
    return cached.info["mu"], cached.heads


def fit_with_strength(ctx: TaskContext, seed: int, **options: Any) -> Fitted:
    """One train-rm config's Secrets-II options (flip, margin, smoothing, SimCSE) on a head."""
    s = ctx.settings
    config = rm_config(**options)
    pairs = as_preference_pairs(ctx.train_pairs)
    mu: list[float] | None = None
    flipped: list[int] = []
    if config.needs_strength:
        mu, _ = strength(ctx, seed)
        pairs, mu, flipped = apply_strength(pairs, mu, config)
    smoothing = pair_smoothing(mu, config)
    rows = PairRows(ctx.table.index([(p.prompt, p.chosen) for p in pairs]),
                    ctx.table.index([(p.prompt, p.rejected) for p in pairs]))
    if config.margin == "adaptive":
        rows.margin = config.margin_scale * torch.tensor(mu, dtype=torch.float32)
    elif config.margin == "fixed":
        rows.margin = torch.full((len(pairs),), config.margin_value)
    if smoothing is not None:
        rows.smoothing = torch.tensor(smoothing, dtype=torch.float32)
    head = None
    if config.simcse_weight > 0 and config.simcse_dropout is not None:
        head = new_head(ctx.features.shape[1], s.head, seed)
        set_dropout(head, config.simcse_dropout)
    fitted = train_head(ctx.features, rows, s.head, seed, weights=loss_weights(config), head=head)
    planted = [i for i, f in enumerate(ctx.flipped) if f]
    info: dict[str, Any] = {"flipped_pairs": len(flipped)}
    if planted and flipped:
        info["planted_flips_caught"] = len(set(planted) & set(flipped)) / len(planted)
    return Fitted([fitted], info=info)


def fit_strength_ensemble(ctx: TaskContext, seed: int) -> Fitted:
    """The strength estimator's M heads, their mean reward as the RM."""
    _, members = strength(ctx, seed)
    return Fitted(list(members))


SECRETS_OPTIONS: dict[str, Callable[[RunSettings], dict[str, Any]]] = {}


def secrets(name: str, claim: str, options: Callable[[RunSettings], dict[str, Any]]) -> Method:
    """A Secrets-II row: the train-rm options ``options(settings)`` on a head."""
    def fit(ctx: TaskContext, seed: int) -> Fitted:
        return fit_with_strength(ctx, seed, **options(ctx.settings))

    SECRETS_OPTIONS[name] = options
    return register(Method(name, "Secrets of RLHF II", claim, fit))


def _secrets_rows() -> None:
    secrets("flip", "flipping the pairs with negative preference strength (μ̂ < 0) helps",
            lambda s: {"flip": "negative"})
    secrets("margin", "an adaptive margin m = λ·μ̂ helps",
            lambda s: {"margin": "adaptive", "margin_scale": s.margin_scale})
    secrets("smooth_negative", "label smoothing of the pairs with μ̂ < 0 (the paper's soft label) helps",
            lambda s: {"label_smoothing": s.label_smoothing, "smooth_pairs": "negative"})
    secrets("smooth_all", "label smoothing of every pair (a global α) helps",
            lambda s: {"label_smoothing": s.label_smoothing, "smooth_pairs": "all"})
    secrets("simcse", "a SimCSE term on the preference differences {f_c − f_r, f_r − f_c} helps",
            lambda s: {"simcse_weight": s.simcse_weight, "simcse_temperature": s.simcse_temperature,
                       "simcse_dropout": s.simcse_dropout, "simcse_representation": "difference"})
    register(Method("strength", "Secrets of RLHF II", "the strength estimator's M-head ensemble "
                    "(mean reward) is a better RM than one BT head", fit_strength_ensemble))


_secrets_rows()

# ---------------------------------------------------------------------- the best combination
COMBO_COMPONENTS = ("flip", "margin", "smooth_negative", "smooth_all", "simcse")
SMOOTHING_FORMS = ("smooth_negative", "smooth_all")  # one α per pair: at most one form


def combo_selection(ctx: TaskContext) -> dict[str, Any]:
    """Which Secrets-II components the ``combo`` row combines, picked on the source
    validation split only (cached per context).

    score(row) = mean over seeds s < ``combo_selection_seeds`` of the source-val M2 of the
    row's seed-s RM (``source_val_accuracy``; those fits are the rows' own, cached, so the
    selection costs no extra training). A component qualifies when score > score(bt); if both
    smoothing forms qualify, the higher-scoring one is kept (ties: ``smooth_negative``, the
    paper's form). The qualifying components' train-rm options are merged into one config;
    with none, combo is BT.
    """
    key = ("_combo", -1)
    if key not in ctx.fits:
        seeds = range(ctx.settings.combo_selection_seeds)
        scores = {name: float(np.mean([ctx.source_val_accuracy(ctx.fitted(name, seed)) for seed in seeds]))
                  for name in ("bt", *COMBO_COMPONENTS)}
        qualifying = [n for n in COMBO_COMPONENTS if scores[n] > scores["bt"]]
        why = {n: f"source-val M2 {scores[n]:.4f} {'>' if n in qualifying else '≤'} BT's {scores['bt']:.4f}"
               for n in COMBO_COMPONENTS}
        smoothing = [n for n in qualifying if n in SMOOTHING_FORMS]
        if len(smoothing) == 2:
            drop = "smooth_all" if scores["smooth_negative"] >= scores["smooth_all"] else "smooth_negative"
            qualifying.remove(drop)
            why[drop] += "; both smoothing forms qualify, the other scores higher"
        options: dict[str, Any] = {}
        for name in qualifying:
            options.update(SECRETS_OPTIONS[name](ctx.settings))
        notes = [] if qualifying else ["no component beats BT on source val: combo is BT"]
        if {"flip", "smooth_negative"} <= set(qualifying):
            # the trainer flips first (apply_strength), and a flipped pair's μ̂ changes sign
            notes.append("with flip, smooth_negative smooths no pair: after flipping no μ̂ < 0 is left")
        info = {"components": qualifying, "options": options, "source_val_M2": scores, "why": why,
                "picked_on": f"source val split, mean of seeds 0..{len(seeds) - 1}", "note": "; ".join(notes)}
        ctx.fits[key] = Fitted([], info=info)
    return ctx.fits[key].info


def fit_combo(ctx: TaskContext, seed: int) -> Fitted:
    selection = combo_selection(ctx)
    info = {"components": selection["components"]}
    if not selection["components"]:
        return Fitted(ctx.fitted("bt", seed).heads, info=info)
    fitted = fit_with_strength(ctx, seed, **selection["options"])
    return Fitted(fitted.heads, info={**fitted.info, **info})


register(Method("combo", "Secrets of RLHF II", "the best combination of flip, margin, smoothing and "
                "SimCSE (components picked on source val) helps", fit_combo))


# ---------------------------------------------------------------------- MetaRM
def shifted_samples(ctx: TaskContext, fitted: Fitted, prompts: Sequence[PromptSet]) -> list[dict[str, Any]]:
    """Each prompt's top-4 candidates under ``fitted``: what a best-of-n policy produces."""
    rewards = ctx.rewards(fitted, prompts)
    return [{"prompt": ps.prompt, "responses": [ps.candidates[i] for i in top_k(r)]}
            for ps, r in zip(prompts, rewards, strict=True)]


def metarm_rounds(ctx: TaskContext, seed: int, *, meta_lr: float, update: str,
                  start: Fitted | None = None, pairs: Sequence[SourcePair] | None = None,
                  meta_prompts: Sequence[PromptSet] | None = None,
                  val_pairs: Sequence[SourcePair] | None = None) -> Fitted:
    """R rounds from BT's head of this seed: shift = top-4 of the control part's candidates
    under the previous round's RM; then ``metarm_steps`` MetaRMTrainer steps on the source
    pairs with that meta set (a fresh optimiser per round, as ``/adapt``'s rounds).

    ``start``, ``pairs``, ``meta_prompts`` and ``val_pairs`` replace BT's head, the source
    training pairs, the control part and the source val pairs: the meta_lr selection
    (``select_meta_lr``) runs the same rounds on a source-only simulation of the shift."""
    s = ctx.settings
    start = ctx.fitted("bt", seed) if start is None else start
    head = frozen_copy(start.heads[0])
    for p in head.parameters():
        p.requires_grad_(True)
    pairs = as_preference_pairs(ctx.train_pairs if pairs is None else pairs)
    meta_prompts = ctx.data.heldout_part("control") if meta_prompts is None else meta_prompts
    val_pairs = ctx.data.pairs("val") if val_pairs is None else val_pairs
    rounds = [Fitted([frozen_copy(head)])]
    diagnostics = []
    for r in range(1, s.metarm_rounds + 1):
        samples = shifted_samples(ctx, rounds[-1], meta_prompts)
        config = MetaRMConfig.from_dict({
            "meta_lr": meta_lr, "update": update, "learning_rate": s.metarm_learning_rate,
            "batch_size": s.head.batch_size, "meta_batch_size": s.metarm_meta_batch,
            "responses_per_prompt": 4, "max_steps": s.metarm_steps, "seed": seed * 100 + r,
            "standardize": True, "meta_max_grad_norm": 1.0, "max_grad_norm": s.head.max_grad_norm,
        })
        trainer = MetaRMTrainer(config, pairs=pairs, samples=samples)
        groups = sample_groups(samples)
        rm = FeatureRewardModel(head, ctx.features, ctx.table.rows)
        head.eval()  # disable_dropout: the ascent and the BT loss see one function
        params = [p for p in head.parameters() if p.requires_grad]
        optimizer = trainer._optimizer(params)
        last: dict[str, float] = {}
        for step in range(s.metarm_steps):
            meta_batch = trainer._meta_batch(groups, step) if meta_lr > 0 else []
            last = trainer.meta_step(rm, params, optimizer, trainer._pair_batch(pairs, step), meta_batch)
        fitted = Fitted([frozen_copy(head)])
        rounds.append(fitted)
        diagnostics.append({"round": r, **{k: float(v) for k, v in last.items()},
                            "source_val_accuracy": ctx.pair_accuracy(fitted, val_pairs)})
    return Fitted(rounds[-1].heads, rounds=rounds, info={"rounds": diagnostics, "meta_lr": meta_lr})


def metarm(name: str, claim: str, *, meta_lr: float | None, update: str, baseline: str | None) -> Method:
    """A MetaRM row; ``meta_lr=None`` takes η from the run's settings: the update form's entry
    of ``metarm_meta_lr_by_update`` (picked on the source side, ``metarm_select``) if any,
    else ``metarm_meta_lr``."""
    def fit(ctx: TaskContext, seed: int) -> Fitted:
        s = ctx.settings
        lr = s.metarm_meta_lr_by_update.get(update, s.metarm_meta_lr) if meta_lr is None else meta_lr
        return metarm_rounds(ctx, seed, meta_lr=lr, update=update)

    return register(Method(name, "MetaRM", claim, fit, baseline=baseline, rounds=True))


# the rows whose η is a setting (picked on the source side), by update form
METARM_UPDATES = {"metarm": "first_order", "metarm_second_order": "second_order",
                  "metarm_alternating": "alternating"}

metarm("vanilla_rounds", "rounds of BT on the same steps (MetaRM's baseline)", meta_lr=0.0,
       update="first_order", baseline="bt")
metarm("metarm", "MetaRM, the paper's rule (first order): after 3 rounds, better on the shifted "
       "set than vanilla rounds", meta_lr=None, update="first_order", baseline="vanilla_rounds")
metarm("metarm_second_order", "MetaRM, the paper's rule in full (through the ascent)", meta_lr=None,
       update="second_order", baseline="vanilla_rounds")
metarm("metarm_alternating", "alternating ascent on J and descent on L (not the paper's rule)",
       meta_lr=None, update="alternating", baseline="vanilla_rounds")
