"""How a trainer reports progress and learns it should stop (minGPT-style callbacks).

``training/`` knows nothing of Redis or Celery: the worker passes an object with these two
methods, a script passes a tqdm one or nothing. Trainers call ``on_progress`` after every
step and check ``should_stop`` at step boundaries; when it returns True they write a
checkpoint and raise :class:`TrainingCancelled`.
"""

from __future__ import annotations

from typing import Any, Protocol

from tqdm.auto import tqdm


class TrainingCancelled(Exception):
    """Raised by a trainer that stopped because its callback asked it to (state is saved)."""

    def __init__(self, step: int, checkpoint: str | None = None) -> None:
        super().__init__(f"cancelled at step {step}")
        self.step = step
        self.checkpoint = checkpoint


class TrainerCallback(Protocol):
    def on_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None: ...

    def should_stop(self) -> bool: ...


class NullCallback:
    def on_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class TqdmCallback:
    """Progress bar for the CLI."""

    def __init__(self, description: str = "train") -> None:
        self._description = description
        self._bar = None

    def on_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self._description, initial=step - 1 if step else 0)
        self._bar.update(step - self._bar.n)
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, int | float)}
        self._bar.set_postfix(shown, refresh=False)
        if step >= total:
            self._bar.close()

    def should_stop(self) -> bool:
        return False
