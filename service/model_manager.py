"""Which reward model is served: resolve a reference, load it off the event loop, warm it
up, and swap it in atomically (requests already admitted keep the model they were given)."""

from __future__ import annotations

import logging
import threading

from service.engine import ScoringEngine, ServedModel
from service.metrics import Metrics
from service.settings import ServiceSettings
from training.registry import ResolvedModel, resolve_model
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
        self._failed_label: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def current(self) -> ServedModel | None:
        return self._current

    def load(self, resolved: ResolvedModel) -> ServedModel:
        """Load and warm a resolved model (blocking: call from a thread)."""
        rm = RewardModel.from_pretrained(
            resolved.path,
            device=self.settings.device,
            dtype=self.settings.dtype,
            max_input_tokens=self.settings.max_input_tokens,
            name=resolved.label,
        )
        # on the inference thread, which will run this model (see ScoringEngine.call)
        self.engine.call(lambda: rm.score(WARMUP_ITEMS)).result()
        return ServedModel(rm=rm, model=resolved)

    def swap(self, served: ServedModel) -> None:
        with self._lock:
            previous = self._current
            self._current = served
        if previous is not None:
            self.metrics.model_info.remove(previous.label)
        self.metrics.model_info.labels(served.label).set(1)
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
        self.swap_error = None
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
        try:
            self.swap(self.load(resolve_model(self.reference, self.settings.artifacts_dir)))
            self.load_error = None
        except Exception as exc:
            error = f"could not load model {self.reference!r}: {type(exc).__name__}: {exc}"
            if error != self.load_error:  # the watcher retries every poll: log each cause once
                log.exception("could not load model %s", self.reference)
            self.load_error = error
