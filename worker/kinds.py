"""The job kind table: one place mapping a kind to its queue, spec validator and runner.

Adding a kind = its spec model in ``worker/specs.py``, a module under ``worker/jobs/`` with
``validate(spec, ValidationContext) -> spec`` (torch-free: it runs in the API at submission;
the checks it needs are in ``worker/jobs/checks.py``) and ``run(JobContext) -> JobOutcome``
(runs in a fresh worker process; import the trainer, and so torch, inside it), plus one line
in ``KINDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from training.metarm.config import MetaRMConfig
from worker.celery_app import MULTI_QUEUE
from worker.jobs import adapt, diagnostic, evaluate, meta_train, metarm, strength, train_rm
from worker.specs import JobContext, JobOutcome, ValidationContext, job_processes


def _no_deprecations(_spec: Any) -> list[str]:
    return []


def _params_of(config_cls):
    def deprecations(spec: Any) -> list[str]:
        params = spec.get("params") if isinstance(spec, dict) else None
        return config_cls.deprecated_keys(params) if isinstance(params, dict) else []

    return deprecations


@dataclass(frozen=True)
class JobKind:
    name: str
    queue: str  # "train" or "adapt"
    validate: Callable[[Any, ValidationContext], dict[str, Any]]
    run: Callable[[JobContext], JobOutcome]
    description: str
    # renamed keys a spec still uses: told back to the client with the 202
    deprecations: Callable[[Any], list[str]] = _no_deprecations


KINDS: dict[str, JobKind] = {
    train_rm.KIND: JobKind(
        train_rm.KIND, "train", train_rm.validate, train_rm.run,
        "Bradley-Terry RM training on a preference JSONL; publishes a new RM version",
    ),
    strength.KIND: JobKind(
        strength.KIND, "train", strength.validate, strength.run,
        "preference strength (mean/std of reward differences) from an RM ensemble",
    ),
    meta_train.KIND: JobKind(
        meta_train.KIND, "train", meta_train.validate, meta_train.run,
        "OOD-PL bilevel meta-training of an RM over source domains; publishes a new RM version",
    ),
    metarm.KIND: JobKind(
        metarm.KIND, "train", metarm.validate, metarm.run,
        "MetaRM update of an RM on shifted samples; publishes a new RM version with diagnostics",
        _params_of(MetaRMConfig),
    ),
    adapt.KIND: JobKind(
        adapt.KIND, "adapt", adapt.validate, adapt.run,
        "OOD-PL meta-test: adapt a policy to a domain's prompts (optionally MetaRM rounds); "
        "publishes the policy (and the domain-adapted RM)",
        adapt.deprecated_keys,
    ),
    evaluate.KIND: JobKind(
        evaluate.KIND, "train", evaluate.validate, evaluate.run,
        "accuracy of an RM on a preference file (RewardBench sections when its subsets are "
        "RewardBench's); stored with the model version",
    ),
}

# Only with GENERALRM_ENABLE_DIAGNOSTIC_JOBS: they exist to test the job machinery.
DIAGNOSTIC_KINDS: dict[str, JobKind] = {
    diagnostic.KIND: JobKind(
        diagnostic.KIND, "train", diagnostic.validate, diagnostic.run,
        "counts steps with a checkpoint per step (optionally crashing its worker)",
    ),
}


def available_kinds(diagnostics: bool = False) -> dict[str, JobKind]:
    return {**KINDS, **DIAGNOSTIC_KINDS} if diagnostics else dict(KINDS)


def get_kind(name: Any, diagnostics: bool = False) -> JobKind:
    """The kind called ``name``; KeyError (with the known kinds in its message) otherwise."""
    kinds = available_kinds(diagnostics)
    if not isinstance(name, str) or name not in kinds:
        raise KeyError(f"unknown job kind {name!r}; known kinds: {sorted(kinds)}")
    return kinds[name]


def queue_for(kind: JobKind, spec: dict[str, Any]) -> str:
    """The queue of a validated job: its kind's, or ``multi`` when it runs over several
    processes (workers that see that many GPUs consume it)."""
    return MULTI_QUEUE if job_processes(spec) > 1 else kind.queue
