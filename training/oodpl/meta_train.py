"""OOD-PL bilevel meta-training of a reward model (DESIGN §7, Jia arXiv 2402.14760).

Tasks are source domains i, each with sampled data D_xy^i (prompts with responses from the
domain's sampling distribution p_i) and preference pairs D_PL^i. One outer step k:

1. pick a task i and reset the policy parameters θ to θ_0 (``carry`` keeps θ instead);
2. inner loop, D plain-SGD steps of the KL-regularised policy optimisation fitted by
   weighted likelihood:  θ_{t+1} = θ_t + α ∇_θ (1/n) Σ_j w_j(φ) log π_θ(ỹ_j|x̃_j),
   w_j = softmax over the responses of one prompt of r_φ(x̃,ỹ)/β, n = prompts in the batch;
3. outer loss ℓ_PL = −mean log σ(A(θ_D) − A(θ_0)) on a batch of D_PL^i, A(θ) = log π_θ(y_w|x)
   − log π_θ(y_l|x) (``outer_margin: reference``, as in DPO: summed log-probs of real responses
   are tens of nats apart and saturate σ(A); per-token means would favour short responses;
   both remain options), g = ∇_θ ℓ_PL(θ_D);
4. hypergradient, ``first_order``: ∇_φ ℓ_PL ≈ Σ_t Σ_j c_tj ∂w_tj/∂φ with
   c_tj = (α/n)·⟨∇_θ log π_θt(ỹ_j|x̃_j), g⟩, i.e. the chain rule with every inner Jacobian
   ∂θ_D/∂θ_{t+1} replaced by the identity (exact for D = 1). All c_tj of one inner batch
   come from a single directional derivative of θ ↦ (log π_θ(ỹ_j|x̃_j))_j along g at the
   snapshot θ_t — forward-mode AD (``torch.func.jvp``) or a central finite difference —
   never from per-sample gradients. The surrogate Σ stopgrad(c_tj)·w_tj(φ) is then
   back-propagated into φ. ``exact`` differentiates through the unrolled inner loop
   (``create_graph``), for small models and tests. ``precomputed`` (D = 1, θ reset every
   step): to first order in α, g is taken at θ_0, so c_j no longer depends on φ: per source
   domain G_i = ∇_θ ℓ_PL,i(θ_0) over ``precompute_pairs`` of its pairs is computed once, and
   every sample's d_j = ⟨∇_θ log π_θ0(ỹ_j|x̃_j), G_i⟩ once; an outer step is then the RM's
   forward and backward on the inner batch, about what a BT step costs. The shortcut is
   compared with ``exact`` on a few outer steps at the end of training (reported);
5. φ ← AdamW step on that hypergradient (optionally plus ``bt_weight`` × a direct
   Bradley–Terry loss of r_φ on the same pairs).

The RM runs in eval mode (no dropout) so that w(φ) in the inner loop and in the surrogate
are the same function. Evaluation always reports summed-log-prob margins (``outer_pl_accuracy``:
A(θ_D) > 0) and the reference-normalized one (``pl_margin_moved_right``: A(θ_D) − A(θ_0) > 0,
the share of pairs the inner step moved the right way), whatever margin trains.

Over several processes (``processes``: a :class:`~training.distributed.Processes` that
``accelerate launch`` started, see ``training.launch``) every rank holds the RM (wrapped in
DDP) and the policy, and draws the same tasks and batches (one seed). ``precomputed``: each
rank computes its share of every G_i's pairs (the shares summed over ranks) and of the
samples' d_j (the tables gathered whole on every rank); an outer step is then each rank's
share of the inner batch's prompts (each with all its responses: w is a softmax over them)
through the RM, its gradient averaged by DDP. ``first_order``: the inner loop's θ-gradient and
g are summed over ranks from each rank's share of the inner prompts and of the outer pairs (θ
moves the same on every rank), and each rank's surrogate on its share reaches φ through DDP.
``exact`` runs in one process only. With any share normalised by the whole batch, the
hypergradient is the one-process one up to float rounding. Evaluation spreads the tasks over
the ranks; rank 0 alone reads the callback (every rank stops at the same step), runs the end's
hypergradient check, writes checkpoints and the RM; every rank resumes from the checkpoint
rank 0 picked.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.atomic import replace_dir, write_json_atomic
from training.callbacks import NullCallback, TrainerCallback, TrainingCancelled
from training.checkpoint import (
    FINAL_MODEL_DIR,
    checkpoint_path,
    load_latest,
    restore_checkpoint,
    save_checkpoint,
)
from training.config import ConfigError
from training.data import PreferencePair, as_pair, load_benchmark, load_pairs, load_samples
from training.distributed import Processes
from training.losses import bradley_terry_loss
from training.models import resolve_pretrained
from training.oodpl.config import (
    EXACT_NEEDS_ONE_PROCESS,
    MetaTrainConfig,
    replicated_only,
    resolve_hypergradient,
)
from training.oodpl.objective import group_softmax, weighted_log_likelihood
from training.oodpl.results import MetaTrainResult
from training.policy import Policy, lora_from_fields
from training.precision import cast_frozen_linears, mixed_precision
from training.registry import METADATA_FILE
from training.reward_model import RewardModel

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------- data
@dataclass
class MetaTask:
    """One source distribution: ``samples`` (D_xy: ``.prompt``, ``.responses``) and
    ``pairs`` (D_PL: ``.prompt``, ``.chosen``, ``.rejected``) — e.g. the objects of
    ``training.data`` or anything with those attributes."""

    name: str
    samples: Sequence[Any]
    pairs: Sequence[Any]


@dataclass
class InnerBatch:
    """Flattened (prompt, response) rows of a few prompts; ``groups`` = responses per prompt.
    ``total_prompts``: set on a rank's share of a batch, the prompts of the whole batch."""

    prompts: list[str]
    responses: list[str]
    groups: list[int]
    total_prompts: int | None = None

    @property
    def num_prompts(self) -> int:
        """n of the weighted log-likelihood: the whole batch's prompts."""
        return len(self.groups) if self.total_prompts is None else self.total_prompts

    def share(self, prompts: Sequence[int]) -> InnerBatch:
        """The rows of these prompts (indices into ``groups``), normalised as the whole."""
        starts = [0]
        for size in self.groups:
            starts.append(starts[-1] + size)
        rows = [j for i in prompts for j in range(starts[i], starts[i + 1])]
        return InnerBatch([self.prompts[j] for j in rows], [self.responses[j] for j in rows],
                          [self.groups[i] for i in prompts], self.num_prompts)


@dataclass
class PairBatch:
    """Outer pairs: texts for the policy's log-likelihoods, the pairs themselves for the RM."""

    pairs: list[PreferencePair]

    @property
    def prompts(self) -> list[str]:
        return [p.prompt for p in self.pairs]

    @property
    def chosen(self) -> list[str]:
        return [p.chosen for p in self.pairs]

    @property
    def rejected(self) -> list[str]:
        return [p.rejected for p in self.pairs]

    def rm_items(self) -> list[dict[str, Any]]:
        """Chosen items, then rejected items, as the RM scores them."""
        return [p.chosen_item() for p in self.pairs] + [p.rejected_item() for p in self.pairs]


def make_inner_batch(samples: Sequence[Any], k: int, rng: random.Random) -> InnerBatch:
    """Up to ``k`` responses (drawn without replacement) of each prompt in ``samples``."""
    prompts, responses, groups = [], [], []
    for sample in samples:
        pool = [r for r in sample.responses if isinstance(r, str)]
        chosen = pool if len(pool) <= k else rng.sample(pool, k)
        if not chosen:
            continue
        prompts.extend([sample.prompt] * len(chosen))
        responses.extend(chosen)
        groups.append(len(chosen))
    return InnerBatch(prompts, responses, groups)


def make_pair_batch(pairs: Sequence[Any]) -> PairBatch:
    return PairBatch([as_pair(p) for p in pairs])


def pair_key(pair: PreferencePair) -> tuple[str, str, str]:
    return (pair.prompt, pair.chosen, pair.rejected)


def flat_grad(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                      for p in params])


def rm_rewards(rm: RewardModel, prompts: Sequence[str], responses: Sequence[str],
               module: torch.nn.Module | None = None) -> torch.Tensor:
    """Differentiable r_φ(x, y), shape (B,); ``module``: the RM's distributed wrapper (DDP)."""
    items = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    return rm.forward(rm.pad(rm.encode_many(items)), module=module)


# ---------------------------------------------------------------------- config

def load_tasks(config: MetaTrainConfig) -> list[MetaTask]:
    """Source tasks from the benchmark or from two JSONL files grouped by ``domain``."""
    if config.task is not None:
        bench = load_benchmark(config.task, root=config.bench_root)
        names = config.domains or list(bench.source_domains)
        unknown = sorted(set(names) - set(bench.source_domains))
        if unknown:
            raise ConfigError(f"domains: {unknown} are not source domains of {config.task!r}")
        return [
            MetaTask(name, bench.samples(name, config.split), bench.pairs(name, config.split))
            for name in names
        ]
    if config.samples_file is None:
        raise ConfigError("no data: set task, or samples_file and pairs_file, or pass tasks=")
    samples, pairs = load_samples(config.samples_file), load_pairs(config.pairs_file)
    names = config.domains or sorted({s.domain for s in samples if s.domain} & {p.domain for p in pairs if p.domain})
    return [
        MetaTask(
            name,
            [s for s in samples if s.domain == name],
            [p for p in pairs if p.domain == name],
        )
        for name in names
    ]


# ---------------------------------------------------------------------- trainer
class MetaTrainer:
    """Bilevel meta-training of r_φ through a KL-regularised inner policy optimisation."""

    def __init__(
        self,
        config: MetaTrainConfig,
        callback: TrainerCallback | None = None,
        *,
        tasks: Sequence[MetaTask] | None = None,
        reward_model: RewardModel | None = None,
        policy: Policy | None = None,
        processes: Processes | None = None,
    ) -> None:
        self.config = config
        self.callback = callback or NullCallback()
        self._tasks = list(tasks) if tasks is not None else None
        self.rm = reward_model
        self.policy = policy
        self.rng = random.Random(config.seed)
        self.processes = processes or Processes.single()
        if self.processes.distributed:
            if self.processes.strategy != "ddp":
                raise ConfigError(replicated_only("meta-training"))
            if resolve_hypergradient(config) == "exact":
                raise ConfigError(EXACT_NEEDS_ONE_PROCESS)
        self.rm_module: torch.nn.Module | None = None  # the RM's DDP wrapper (None: rm.model)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Load models and data (idempotent); called by ``train``, useful in tests."""
        c = self.config
        torch.manual_seed(c.seed)
        if self._tasks is None:
            self._tasks = load_tasks(c)
        self._tasks = [t for t in self._tasks if t.samples and t.pairs]
        if not self._tasks:
            raise ConfigError("no task has both samples (D_xy) and pairs (D_PL)")
        device = str(self.processes.device or c.device)
        if self.rm is None:
            self.rm = RewardModel.from_pretrained(
                resolve_pretrained(c.reward_model, c.artifacts_dir),
                device=device, dtype=c.dtype, max_input_tokens=c.rm_max_tokens,
                name=c.reward_model, seed=c.seed,
            )
        self.rm.model.eval()
        if self.policy is None:
            self.policy = Policy.from_pretrained(
                c.policy, device=device, dtype=c.dtype,
                lora=lora_from_fields(c.policy_lora_r, c.policy_lora_alpha, c.policy_lora_targets),
                max_prompt_tokens=c.max_prompt_tokens, max_response_tokens=c.max_response_tokens,
                artifacts_dir=c.artifacts_dir, seed=c.seed, chat_template=c.chat_template,
            )
        self.policy.model.eval()
        self.policy.autocast_dtype = mixed_precision(self.policy.device, c.bf16, self.policy.dtype)
        cast_frozen_linears(self.policy.model, self.policy.autocast_dtype)  # θ's base is frozen
        self.rm.autocast_dtype = mixed_precision(self.rm.device, c.bf16, self.rm.precision.weights)
        self.theta = self.policy.trainable_parameters()
        if not self.theta:
            raise ConfigError("policy: no trainable parameters (θ)")
        self.theta0 = self._snapshot()
        self.theta_ref = self._snapshot()  # π_ref of the reference margins (θ_0 moves with carry)
        self._reference_margins: dict[tuple[str, str, str], float] = {}
        self._coefficients: dict[str, dict[tuple[str, str], float]] = {}
        self.hypergradient = resolve_hypergradient(c)
        self.phi = [p for p in self.rm.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.phi, lr=c.outer_lr, weight_decay=c.weight_decay)

    @property
    def tasks(self) -> list[MetaTask]:
        return list(self._tasks or [])

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.theta.items()}

    @torch.no_grad()
    def _load_theta(self, values: dict[str, torch.Tensor]) -> None:
        for name, param in self.theta.items():
            param.copy_(values[name])

    # ------------------------------------------------------------------ this rank's share
    # Each rank computes its contribution to a loss of the whole batch (sums normalised by the
    # whole batch, means scaled by the rank's share of it); the contributions add up over
    # ranks, explicitly for θ-gradients and through DDP for φ's.
    def _my_prompts(self, batch: InnerBatch) -> tuple[InnerBatch, float]:
        """This rank's prompts of ``batch``, each with all its responses (w is a softmax over
        them), and 1; or, when there are fewer prompts than ranks, a weightless stand-in and 0
        (every rank runs each pass through φ's DDP wrapper)."""
        mine = self.processes.shard(range(len(batch.groups)))
        return (batch.share(mine), 1.0) if mine else (batch.share([0]), 0.0)

    def _my_pairs(self, pairs: PairBatch) -> tuple[PairBatch, float]:
        """This rank's share of ``pairs`` and its fraction of them (0: a weightless stand-in)."""
        mine = self.processes.shard(pairs.pairs)
        if not mine:
            return PairBatch(pairs.pairs[:1]), 0.0
        return PairBatch(mine), len(mine) / len(pairs.pairs)

    @contextlib.contextmanager
    def _phi_pass(self, sync: bool) -> Iterator[torch.nn.Module | None]:
        """A forward and backward of r_φ through its distributed wrapper (yielded); gradients
        averaged over ranks only with ``sync``, the step's last pass (the others accumulate)."""
        with self.processes.no_sync(self.rm_module, skip=not sync):
            yield self.rm_module

    def _phi_backward(self, contribution: torch.Tensor) -> None:
        """Back-propagate this rank's contribution into φ; DDP averages over ranks, so it is
        scaled by their number (the gradient is then the sum of the contributions)."""
        self.processes.backward(contribution * self.processes.world_size)

    @property
    def _meta_pass_syncs(self) -> bool:
        """Whether the meta-gradient's last pass through φ is the step's last (no BT term)."""
        return self.config.bt_weight == 0

    # ------------------------------------------------------------------ pieces of a step
    def weights(self, batch: InnerBatch, module: torch.nn.Module | None = None) -> torch.Tensor:
        rewards = rm_rewards(self.rm, batch.prompts, batch.responses, module).to(self.policy.dtype)
        return group_softmax(rewards, batch.groups, self.config.beta)

    def _inner_objective(self, batch: InnerBatch, weights: torch.Tensor, params=None) -> torch.Tensor:
        logp = self.policy.sequence_logprobs(batch.prompts, batch.responses, params=params)
        return weighted_log_likelihood(logp, weights, batch.num_prompts)

    def pl_margins(self, pairs: PairBatch, params=None, *, per_token: bool = False) -> torch.Tensor:
        """A = log π(y_w|x) − log π(y_l|x) for each pair, one forward pass (log-probs summed
        over response tokens, or their per-token means)."""
        n = len(pairs.prompts)
        encoded = self.policy.encode(pairs.prompts * 2, pairs.chosen + pairs.rejected)
        logp = self.policy.batch_logprobs(encoded, params)
        if per_token:
            logp = logp / encoded.response_mask.sum(dim=1).clamp(min=1).to(logp.dtype)
        return logp[:n] - logp[n:]

    @torch.no_grad()
    def reference_margins(self, pairs: PairBatch) -> torch.Tensor:
        """A(θ_ref) (summed log-probs) of each pair, θ_ref = the policy as loaded, cached by
        pair: the reference of ``outer_margin: reference`` and of ``pl_margin_moved_right``."""
        missing = [p for p in pairs.pairs if pair_key(p) not in self._reference_margins]
        if missing:
            values = self.pl_margins(make_pair_batch(missing), self.theta_ref)
            self._reference_margins.update(zip(map(pair_key, missing), values.tolist(), strict=True))
        return torch.tensor([self._reference_margins[pair_key(p)] for p in pairs.pairs],
                            dtype=self.policy.dtype, device=self.policy.device)

    def outer_margins(self, pairs: PairBatch, params=None) -> torch.Tensor:
        """The margins ℓ_PL is taken on (``outer_margin``)."""
        margin = self.config.outer_margin
        margins = self.pl_margins(pairs, params, per_token=margin == "per_token")
        if margin == "reference":
            margins = margins - self.reference_margins(pairs)
        return margins

    def outer_loss(self, pairs: PairBatch, params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℓ_PL, its margins)."""
        margins = self.outer_margins(pairs, params)
        return -F.logsigmoid(margins).mean(), margins

    def outer_gradient(self, pairs: Sequence[PreferencePair], chunk: int = 8,
                       of: int | None = None) -> dict[str, torch.Tensor]:
        """∇_θ ℓ_PL over ``pairs`` at the policy's current θ, in chunks (G_i of ``precomputed``);
        with ``of``, ``pairs`` are a share of that many: this share's part of their mean."""
        params = list(self.theta.values())
        total = [torch.zeros_like(p) for p in params]
        for start in range(0, len(pairs), chunk):
            part = make_pair_batch(pairs[start : start + chunk])
            loss, _ = self.outer_loss(part)
            loss = loss * (len(part.pairs) / (of or len(pairs)))  # the mean over all pairs
            for acc, g in zip(total, self._grads(loss, params), strict=True):
                acc += g.detach()
        return dict(zip(self.theta, total, strict=True))

    def _grads(self, output: torch.Tensor, params: Sequence[torch.Tensor], **kw) -> list[torch.Tensor]:
        grads = torch.autograd.grad(output, list(params), allow_unused=True, **kw)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]

    def directional_logprobs(
        self, params: dict[str, torch.Tensor], tangent: dict[str, torch.Tensor], batch: InnerBatch
    ) -> torch.Tensor:
        """⟨∇_θ log π_θ(ỹ_j|x̃_j), tangent⟩ at θ = params for every row j, shape (B,)."""
        encoded = self.policy.encode(batch.prompts, batch.responses)
        if self.config.directional == "jvp":
            _, out = torch.func.jvp(
                lambda theta: self.policy.batch_logprobs(encoded, theta), (params,), (tangent,)
            )
            return out.detach()
        norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in tangent.values()))
        if norm == 0.0:
            return torch.zeros(len(batch.prompts), dtype=self.policy.dtype, device=self.policy.device)
        h = self.config.fd_eps / norm
        with torch.no_grad(), self.policy.full_precision():
            plus = self.policy.batch_logprobs(encoded, {n: params[n] + h * tangent[n] for n in params})
            minus = self.policy.batch_logprobs(encoded, {n: params[n] - h * tangent[n] for n in params})
        return (plus - minus) / (2 * h)

    def meta_gradient(
        self, inner_batches: Sequence[InnerBatch], pairs: PairBatch, task: MetaTask | None = None,
        *, mode: str | None = None,
    ) -> dict[str, float]:
        """Accumulate ∇_φ ℓ_PL into the RM's ``.grad`` (zeroed first) starting from the
        policy's current θ; leaves θ_D in the policy (``precomputed`` leaves θ alone).
        ``mode`` defaults to the run's resolved ``hypergradient``. Returns scalar metrics."""
        for p in self.phi:
            p.grad = None
        mode = mode or self.hypergradient
        if mode == "exact":
            return self._exact_meta_gradient(inner_batches, pairs)
        if mode == "precomputed":
            if task is None:
                raise ValueError("precomputed: the outer step's task is needed")
            return self._precomputed_meta_gradient(inner_batches, task)
        return self._first_order_meta_gradient(inner_batches, pairs)

    # ------------------------------------------------------------------ precomputed (D = 1)
    def precompute(self) -> None:
        """G_i per task and d_j per (prompt, response) of its samples, at θ_0 (see module doc).
        G_i is dropped once its task's d_j are known: a full-fine-tuning θ is large."""
        c = self.config
        procs = self.processes  # each rank takes a share of the pairs and of the rows
        rng = random.Random(c.seed + 15_485_863)  # not the training order's generator
        self._load_theta(self.theta0)
        self._coefficients = {}
        for task in self._tasks:
            pairs = [as_pair(p) for p in task.pairs]
            if len(pairs) > c.precompute_pairs:
                pairs = rng.sample(pairs, c.precompute_pairs)
            gradient = self.outer_gradient(procs.shard(pairs), of=len(pairs))
            procs.sum_tensors_(list(gradient.values()))
            rows = list(dict.fromkeys(
                (s.prompt, r) for s in task.samples for r in s.responses if isinstance(r, str)))
            mine = procs.shard(rows)
            values: list[float] = []
            for start in range(0, len(mine), 16):
                chunk = mine[start : start + 16]
                batch = InnerBatch([p for p, _ in chunk], [r for _, r in chunk], [1] * len(chunk))
                values += self.directional_logprobs(self.theta0, gradient, batch).double().tolist()
            self._coefficients[task.name] = dict(zip(rows, procs.unshard(values, len(rows)),
                                                     strict=True))
            del gradient

    def _precomputed_meta_gradient(self, inner_batches: Sequence[InnerBatch], task: MetaTask) -> dict[str, float]:
        (batch,) = inner_batches
        if not self._coefficients:
            self.precompute()
        table = self._coefficients[task.name]
        mine, present = self._my_prompts(batch)
        directional = torch.tensor(
            [table[(p, r)] for p, r in zip(mine.prompts, mine.responses, strict=True)],
            dtype=self.policy.dtype, device=self.policy.device)
        coeff = self.config.inner_lr * directional / mine.num_prompts
        with self._phi_pass(sync=self._meta_pass_syncs) as module:
            self._phi_backward((coeff * self.weights(mine, module)).sum() * present)
        return {}

    def _first_order_meta_gradient(
        self, inner_batches: Sequence[InnerBatch], pairs: PairBatch
    ) -> dict[str, float]:
        alpha = self.config.inner_lr
        procs = self.processes
        names, params = list(self.theta), list(self.theta.values())
        shares = [self._my_prompts(batch) for batch in inner_batches]
        snapshots = []
        for mine, present in shares:
            with torch.no_grad():
                weights = self.weights(mine)
            snapshots.append(self._snapshot())
            grads = self._grads(self._inner_objective(mine, weights) * present, params)
            procs.sum_tensors_(grads)  # θ moves the same on every rank
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.add_(g, alpha=alpha)
        my_pairs, share = self._my_pairs(pairs)
        outer_loss, margins = self.outer_loss(my_pairs)
        grads = self._grads(outer_loss * share, params)
        procs.sum_tensors_(grads)
        g = dict(zip(names, grads, strict=True))
        for t, (theta_t, (mine, present)) in enumerate(zip(snapshots, shares, strict=True)):
            coeff = alpha * self.directional_logprobs(theta_t, g, mine) / mine.num_prompts
            with self._phi_pass(sync=self._meta_pass_syncs and t == len(shares) - 1) as module:
                self._phi_backward((coeff.detach() * self.weights(mine, module)).sum() * present)
        return procs.sum({key: value * share
                          for key, value in self._outer_metrics(margins, outer_loss).items()})

    def _exact_meta_gradient(
        self, inner_batches: Sequence[InnerBatch], pairs: PairBatch
    ) -> dict[str, float]:
        alpha = self.config.inner_lr
        theta_t = {n: p.detach().clone().requires_grad_(True) for n, p in self.theta.items()}
        for batch in inner_batches:
            objective = self._inner_objective(batch, self.weights(batch), params=theta_t)
            grads = self._grads(objective, list(theta_t.values()), create_graph=True)
            theta_t = {n: v + alpha * g for (n, v), g in zip(theta_t.items(), grads, strict=True)}
        outer_loss, margins = self.outer_loss(pairs, params=theta_t)
        phi_grads = self._grads(outer_loss, self.phi)
        for p, g in zip(self.phi, phi_grads, strict=True):
            p.grad = g.detach()
        self._load_theta({n: v.detach() for n, v in theta_t.items()})
        return self._outer_metrics(margins, outer_loss)

    @staticmethod
    def _outer_metrics(margins: torch.Tensor, loss: torch.Tensor) -> dict[str, float]:
        return {
            "outer_loss": float(loss.detach()),
            "outer_margin_positive": float((margins.detach() > 0).float().mean()),
        }

    def _bt_loss(self, pairs: PairBatch, module: torch.nn.Module | None = None) -> torch.Tensor:
        n = len(pairs.pairs)
        rewards = self.rm.forward(self.rm.pad(self.rm.encode_many(pairs.rm_items())), module=module)
        return bradley_terry_loss(rewards[:n] - rewards[n:])

    # ------------------------------------------------------------------ one outer step
    def _pick_task(self, step: int) -> MetaTask:
        if self.config.task_sampling == "round_robin":
            return self._tasks[step % len(self._tasks)]
        return self.rng.choice(self._tasks)

    def draw_batches(self, task: MetaTask) -> tuple[list[InnerBatch], PairBatch]:
        c = self.config
        inner = []
        for _ in range(c.inner_steps):
            prompts = self.rng.sample(list(task.samples), min(c.inner_batch_prompts, len(task.samples)))
            inner.append(make_inner_batch(prompts, c.responses_per_prompt, self.rng))
        pairs = self.rng.sample(list(task.pairs), min(c.outer_batch_pairs, len(task.pairs)))
        return inner, make_pair_batch(pairs)

    def outer_step(self, step: int) -> dict[str, Any]:
        c = self.config
        task = self._pick_task(step)
        inner, pairs = self.draw_batches(task)
        self._load_theta(self.theta0)
        metrics = self.meta_gradient(inner, pairs, task)
        if c.bt_weight > 0:
            mine, share = self._my_pairs(pairs)
            with self._phi_pass(sync=True) as module:
                bt = self._bt_loss(mine, module)
                self._phi_backward(c.bt_weight * bt * share)
            metrics["bt_loss"] = self.processes.sum({"bt_loss": float(bt.detach()) * share})["bt_loss"]
        grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.phi if p.grad is not None))
        metrics["hypergrad_norm"] = float(grad_norm)
        if c.max_grad_norm > 0:
            self.processes.clip_grad_norm_(self.phi, c.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if c.carry:
            self.theta0 = self._snapshot()
        else:
            self._load_theta(self.theta0)
        metrics["task"] = task.name
        return metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _rm_accuracy(self, pairs: PairBatch) -> float:
        n = len(pairs.pairs)
        rewards = self.rm.rewards(pairs.rm_items())
        return float((rewards[:n] > rewards[n:]).float().mean())

    def evaluate(self, tasks: Sequence[MetaTask] | None = None, seed: int | None = None) -> dict[str, Any]:
        """Run the inner loop from θ_0 with the current r_φ on fixed batches of each task, then
        score that task's pairs with π_θD (θ is restored after): ``outer_pl_accuracy`` = share
        with A(θ_D) > 0 (summed log-probs), ``pl_margin_moved_right`` = share with A(θ_D) −
        A(θ_ref) > 0, ``outer_loss`` = ℓ_PL as trained (``outer_margin``); and the RM's own
        pairwise accuracy on those pairs. Over several processes the tasks are spread over the
        ranks and every rank gets every task's numbers."""
        c = self.config
        procs = self.processes
        rng = random.Random(c.seed + 7919 if seed is None else seed)
        tasks = list(tasks if tasks is not None else self._tasks)
        mine: dict[str, dict[str, float]] = {}
        saved = self._snapshot()
        for index, task in enumerate(tasks):
            batches = []  # drawn on every rank, so that the draws of later tasks stay the same
            for _ in range(c.inner_steps):
                prompts = rng.sample(list(task.samples), min(c.inner_batch_prompts, len(task.samples)))
                batches.append(make_inner_batch(prompts, c.responses_per_prompt, rng))
            if index % procs.world_size != procs.rank:
                continue
            self._load_theta(self.theta0)
            for batch in batches:
                with torch.no_grad():
                    weights = self.weights(batch)
                grads = self._grads(self._inner_objective(batch, weights), list(self.theta.values()))
                with torch.no_grad():
                    for p, g in zip(self.theta.values(), grads, strict=True):
                        p.add_(g, alpha=c.inner_lr)
            pairs = make_pair_batch(list(task.pairs)[: c.eval_pairs])
            with torch.no_grad():
                summed = self.pl_margins(pairs)
                moved = summed - self.reference_margins(pairs)
                trained = {"sum": summed, "reference": moved}.get(c.outer_margin)
                if trained is None:
                    trained = self.outer_margins(pairs)
            mine[task.name] = {
                "outer_pl_accuracy": float((summed > 0).float().mean()),
                "pl_margin_moved_right": float((moved > 0).float().mean()),
                "outer_loss": float(-F.logsigmoid(trained).mean()),
                "rm_accuracy": self._rm_accuracy(pairs),
            }
        self._load_theta(saved)
        found = {name: values for part in procs.gather(mine) for name, values in part.items()}
        per_task = {task.name: found[task.name] for task in tasks}
        names = next(iter(per_task.values())).keys()
        return {
            **{name: sum(t[name] for t in per_task.values()) / len(per_task) for name in names},
            "per_task": per_task,
        }

    def check_hypergradient(self, steps: int, seed: int | None = None) -> dict[str, Any]:
        """Cosine between the ``precomputed`` φ-gradient and the ``exact`` one on ``steps``
        random outer steps, both on the same inner batch and the same pairs (the check isolates
        the approximation — g at θ_0 and the inner Jacobian taken as identity — from which
        pairs G_i averages over). θ and φ.grad are left as they were; φ is not stepped."""
        rng = random.Random(self.config.seed + 104_729 if seed is None else seed)
        saved_rng, self.rng = self.rng, rng
        saved_theta = self._snapshot()
        cosines, ratios = [], []
        try:
            for _ in range(steps):
                task = rng.choice(self._tasks)
                inner, pairs = self.draw_batches(task)
                self._load_theta(self.theta0)
                self.meta_gradient(inner, pairs, mode="exact")
                exact = flat_grad(self.phi)
                self._load_theta(self.theta0)
                for p in self.phi:
                    p.grad = None
                gradient = self.outer_gradient(pairs.pairs, chunk=len(pairs.pairs))
                (batch,) = inner
                directional = self.directional_logprobs(self.theta0, gradient, batch)
                coeff = self.config.inner_lr * directional / batch.num_prompts
                (coeff * self.weights(batch)).sum().backward()
                shortcut = flat_grad(self.phi)
                norms = float(exact.norm() * shortcut.norm())
                cosines.append(float(exact @ shortcut) / norms if norms else float("nan"))
                ratios.append(float(shortcut.norm() / exact.norm()) if float(exact.norm()) else float("nan"))
        finally:
            self.rng = saved_rng
            self._load_theta(saved_theta)
            for p in self.phi:
                p.grad = None
        finite = [x for x in cosines if not math.isnan(x)]
        return {
            "steps": steps, "cosines": cosines, "norm_ratios": ratios,
            "cosine_min": min(finite) if finite else None,
            "cosine_mean": sum(finite) / len(finite) if finite else None,
        }

    # ------------------------------------------------------------------ run
    def _checkpoint(self, step: int) -> Path:
        """Rank 0 writes (the replicas are whole and equal on every rank)."""
        c = self.config
        if not self.processes.is_main:
            return checkpoint_path(c.output_dir, step)
        models: dict[str, torch.nn.Module] = {"rm": self.rm.model}
        if c.carry:  # otherwise θ_0 is the seeded initial policy, rebuilt identically
            models["policy"] = self.policy.model
        return save_checkpoint(
            c.output_dir, step=step, model=models, optimizer=self.optimizer, config=c,
            extra={"rng": self.rng.getstate(), "history": self.history}, keep=c.keep_checkpoints,
        )

    def _resume(self) -> int:
        c = self.config
        procs = self.processes  # every rank resumes from the checkpoint rank 0 finds
        latest = procs.from_main(load_latest(c.output_dir) if procs.is_main else None)
        if latest is None:
            return 0
        models: dict[str, torch.nn.Module] = {"rm": self.rm.model}
        if c.carry:
            models["policy"] = self.policy.model
        state = restore_checkpoint(latest, model=models, optimizer=self.optimizer)
        self.rng.setstate(state["extra"]["rng"])
        self.history = list(state["extra"].get("history", []))
        if c.carry:
            self.theta0 = self._snapshot()
        log.info("resumed meta-training from %s (step %d)", latest, state["step"])
        return int(state["step"])

    def train(self) -> MetaTrainResult:
        c = self.config
        started = time.monotonic()
        self.setup()
        self.history: list[dict[str, Any]] = []
        start = self._resume()
        self.rm_module, self.optimizer = self.processes.prepare(self.rm.model, self.optimizer)
        if start == 0:
            initial = self.evaluate()
            self.history.append({"step": 0, **{k: v for k, v in initial.items() if k != "per_task"}})
        else:  # the step-0 evaluation came back with the checkpoint's history
            initial = next((h for h in self.history if h["step"] == 0), None)
        precompute_seconds = None
        if self.hypergradient == "precomputed" and start < c.outer_steps:
            tick = time.monotonic()
            self.precompute()  # again after a resume: deterministic, the draws are not stored
            precompute_seconds = time.monotonic() - tick
        step_times = []
        for step in range(start + 1, c.outer_steps + 1):
            if self.processes.main_decides(self.callback.should_stop()):
                checkpoint = self._checkpoint(step - 1)
                raise TrainingCancelled(step - 1, str(checkpoint))
            tick = time.monotonic()
            metrics = self.outer_step(step - 1)
            step_times.append(time.monotonic() - tick)
            if c.eval_every and step % c.eval_every == 0 and step < c.outer_steps:
                evaluation = self.evaluate()
                metrics.update({f"eval_{k}": v for k, v in evaluation.items() if k != "per_task"})
            self.history.append({"step": step, **metrics})
            self.callback.on_progress(step, c.outer_steps, metrics)
            if c.checkpoint_every and step % c.checkpoint_every == 0 and step < c.outer_steps:
                self._checkpoint(step)
        final = self.evaluate()
        metrics = {
            **final,
            "steps": c.outer_steps,
            "hypergradient": self.hypergradient,
            "outer_margin": c.outer_margin,
            "precompute_seconds": precompute_seconds,
            "seconds_per_outer_step": sum(step_times) / len(step_times) if step_times else None,
        }
        if self.hypergradient == "precomputed" and c.hypergradient_checks:
            procs = self.processes  # rank 0 checks (no collective inside), the others wait
            check = self.check_hypergradient(c.hypergradient_checks) if procs.is_main else None
            metrics["hypergradient_check"] = procs.from_main(check)
        if initial is not None:
            for name in ("outer_pl_accuracy", "pl_margin_moved_right", "outer_loss", "rm_accuracy"):
                if name in initial:
                    metrics[f"initial_{name}"] = initial[name]
        metrics["wall_time_s"] = time.monotonic() - started
        return self._save(metrics)

    def _save(self, metrics: dict[str, Any]) -> MetaTrainResult:
        c = self.config
        out = Path(c.output_dir)
        metadata = {
            "kind": "reward_model",
            "base_model": c.reward_model,
            "algorithm": "ood-pl-meta-train",
            "policy": c.policy,
            "domains": [t.name for t in self._tasks],
            "metrics": {k: v for k, v in metrics.items() if k != "per_task"},
            "config": c.to_dict(),
        }

        def write(directory: Path) -> None:
            self.rm.save_pretrained(directory)
            write_json_atomic(directory / METADATA_FILE, metadata)

        rm_dir = out / FINAL_MODEL_DIR
        if self.processes.is_main:
            replace_dir(rm_dir, write)
            write_json_atomic(out / "metrics.json", {"metrics": metrics, "history": self.history})
            self._checkpoint(c.outer_steps)  # a re-run after a crash here resumes to the end
        self.processes.barrier()
        return MetaTrainResult(
            output_dir=str(out), rm_dir=str(rm_dir), steps=c.outer_steps,
            metrics=metrics, history=self.history, metadata=metadata,
        )
