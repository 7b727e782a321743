"""Which reward model is served: resolve a reference, load it off the event loop, warm it
up, and swap it in atomically (requests already admitted keep the model they were given).

A failed load never moves what is served: a promotion loads the new version first and moves
the alias only once it has loaded (409 otherwise, the alias untouched); a version whose files
fail their digests is not loaded; and a server whose alias points at a version that cannot load
(moved by another process, damaged on disk) starts on the version it last served instead, and
says so in ``/ready``, ``/models``, the log and ``generalrm_model_fallback``.
"""

from __future__ import annotations

import logging
import threading

from service.engine import ScoringEngine, ServedModel
from service.errors import PromotionFailed
from service.metrics import Metrics
from service.settings import ServiceSettings
from training.models import SHORT_NAMES
from training.precision import cast_frozen_linears
from training.registry import Registry, ResolvedModel, resolve_model, verify_files
from training.reward_model import RewardModel

log = logging.getLogger(__name__)

WARMUP_ITEMS = [
    {"prompt": "Warm-up.", "response": "Ready."},
    {"prompt": "A slightly longer warm-up prompt to exercise padding.", "response": "Done."},
]


class ModelManager:
    def __init__(self, settings: ServiceSettings, metrics: Metrics, engine: ScoringEngine) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine = engine
        self.reference = settings.model
        self._current: ServedModel | None = None
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.load_error: str | None = None
        self.swap_error: str | None = None
        self.fallback: str | None = None  # why the served version is not the one referenced
        self._failed_label: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def current(self) -> ServedModel | None:
        return self._current

    @property
    def registry(self) -> Registry:
        return Registry.from_artifacts(self.settings.artifacts_dir)

    def load(self, resolved: ResolvedModel) -> ServedModel:
        """Verify, load and warm a resolved model (blocking: call from a thread)."""
        settings = self.settings
        if resolved.from_registry:
            verify_files(resolved.path, resolved.metadata, resolved.label)
        rm = RewardModel.from_pretrained(
            resolved.path,
            device=settings.device,
            dtype=settings.dtype,
            max_input_tokens=settings.max_input_tokens,
            name=resolved.label,
            # the packaged demo has a seeded head by design (README); anything else must be an RM
            allow_new_head=settings.allow_untrained_head or resolved.reference in SHORT_NAMES,
            reward_label=settings.reward_label,
            trust_remote_code=settings.trust_remote_code,
        )
        rm.model.requires_grad_(False)
        cast_frozen_linears(rm.model, rm.autocast_dtype)  # the same numbers, no per-batch cast
        # on the inference thread, which will run this model (see ScoringEngine.call)
        self.engine.call(lambda: rm.score(WARMUP_ITEMS)).result()
        return ServedModel(rm=rm, model=resolved)

    def swap(self, served: ServedModel) -> None:
        with self._lock:
            previous = self._current
            self._current = served
        if previous is not None:
            self.metrics.model_info.remove(previous.label, previous.rm.precision.name)
        self.metrics.model_info.labels(served.label, served.rm.precision.name).set(1)
        if served.model.from_registry:
            try:
                self.registry.record_served(served.name, served.model.version)
            except OSError as exc:  # a read-only registry still serves
                log.warning("could not record %s as served: %s", served.label, exc)
        log.info("serving %s", served.label)

    def follows_registry(self) -> bool:
        """A bare registry name or ``name:alias`` moves when a version is promoted;
        ``name@version``, paths and hub ids are pinned."""
        current = self._current
        return current is not None and current.model.from_registry and "@" not in self.reference

    def check_for_promotion(self) -> str | None:
        # the watcher and a promotion request may both ask: one load at a time
        with self._load_lock:
            return self._check_for_promotion()

    def promote(self, name: str, alias: str, version: str) -> str | None:
        """Point ``name:alias`` at ``version``. When that changes what this server serves, the
        version is loaded first and the alias moves only if it loaded: the outcome is
        ``swapped``, or PromotionFailed (the alias untouched). ``None``: the alias moved and
        the served model is not affected."""
        with self._load_lock:
            registry = self.registry
            target = registry.get(name, version)
            current = self._current
            pinned = current is not None and not self.follows_registry()
            wanted = None if pinned else registry.resolve_if(self.reference, name, alias,
                                                              target.version)
            if wanted is None or (current is not None and wanted.reference == current.label):
                registry.set_alias(name, alias, target.version)
                return None
            resolved = resolve_model(wanted.reference, self.settings.artifacts_dir)
            try:
                served = self.load(resolved)
            except Exception as exc:
                self.metrics.model_swaps.labels("failed").inc()
                log.exception("promotion of %s to %s failed", f"{name}:{alias}", resolved.label)
                raise PromotionFailed(
                    f"{resolved.label} could not be loaded ({type(exc).__name__}: {exc}); the "
                    f"alias {name}:{alias} was not moved and "
                    f"{current.label if current else 'nothing'} keeps serving") from None
            registry.set_alias(name, alias, target.version)
            self.swap(served)
            self._failed_label = None
            self.swap_error = self.load_error = self.fallback = None
            self.metrics.model_swaps.labels("swapped").inc()
            return "swapped"

    def _check_for_promotion(self) -> str | None:
        """Swap in the version the reference now points to, if it moved. Blocking: runs in
        the watcher thread. A version that fails to load is remembered and not retried until
        the reference moves again; the old model keeps serving. Returns the outcome."""
        if self._current is None:  # nothing served yet (e.g. the alias did not exist)
            self.load_initial()
            return "swapped" if self._current is not None else "failed"
        if not self.follows_registry():
            return None
        try:
            target = resolve_model(self.reference, self.settings.artifacts_dir)
        except Exception as exc:  # a deleted alias must not take the server down
            log.warning("cannot resolve %s: %s", self.reference, exc)
            return None
        current = self._current
        label = target.label
        if current is not None and label == current.label:
            return None
        if label == self._failed_label:
            return None
        try:
            served = self.load(target)
        except Exception as exc:
            self._failed_label = label
            self.swap_error = f"could not load {label}: {type(exc).__name__}: {exc}"
            log.exception("promotion to %s failed; still serving %s", label, current and current.label)
            self.metrics.model_swaps.labels("failed").inc()
            return "failed"
        self.swap(served)
        self._failed_label = None
        self.swap_error = self.fallback = None
        self.metrics.model_fallback.set(0)
        self.metrics.model_swaps.labels("swapped").inc()
        return "swapped"

    def start_watching(self) -> None:
        def watch() -> None:
            while not self._stop.wait(self.settings.model_poll_seconds):
                try:
                    self.check_for_promotion()
                except Exception:  # the watcher outlives any single bad poll
                    log.exception("model watcher poll failed")

        self._watcher = threading.Thread(target=watch, name="generalrm-model-watcher", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)

    def load_initial(self) -> None:
        resolved = None
        try:
            resolved = resolve_model(self.reference, self.settings.artifacts_dir)
            self.swap(self.load(resolved))
            self.load_error = self.fallback = None
        except Exception as exc:
            error = f"could not load model {self.reference!r}: {type(exc).__name__}: {exc}"
            if error != self.load_error:  # the watcher retries every poll: log each cause once
                log.exception("could not load model %s", self.reference)
            self.load_error = error
            if resolved is not None and resolved.from_registry and "@" not in self.reference:
                self._fall_back(resolved, error)

    def _fall_back(self, broken: ResolvedModel, error: str) -> None:
        """Serve the version last served under this name, loudly, when the referenced one
        cannot load."""
        last = self.registry.last_served(broken.name)
        if last is None or last.version == broken.version:
            return
        try:
            served = self.load(resolve_model(last.reference, self.settings.artifacts_dir))
        except Exception:
            log.exception("the fallback %s cannot load either", last.reference)
            return
        self.fallback = (f"serving {last.reference}, the version last served: "
                         f"{self.reference} points at {broken.label}, and {error}")
        log.error("FALLBACK: %s", self.fallback)
        self._failed_label = broken.label
        self.swap(served)
        self.metrics.model_fallback.set(1)
