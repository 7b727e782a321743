"""Read preference pairs, sampled responses and the offline benchmark (``benchdata``).

Formats (JSONL, one object per line):

- pairs: ``{"id", "prompt", "chosen", "rejected", "domain"?, "task"?, "gold_chosen"?,
  "gold_rejected"?, "flipped"?, ...}``; TRL-style rows are accepted too: ``chosen`` and
  ``rejected`` as message lists, with or without a ``prompt`` (string or message list).
- samples (D_xy): ``{"id", "prompt", "responses": [str], "gold": [float]?, "domain", "task"}``.

Every error names the file, the line and what is wrong: a bad line in a 100k-line file
must be findable without a debugger.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import benchdata

PAIR_FIELDS = ("id", "prompt", "chosen", "rejected", "domain", "margin")
PARTS = ("train", "test")


class DataError(ValueError):
    """A data file is missing, malformed, or does not match the expected format."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


Messages = list[dict[str, str]]


@dataclass
class PreferencePair:
    """``chosen`` is preferred to ``rejected`` as an answer to ``prompt``.

    ``prompt``, ``chosen`` and ``rejected`` are text (what a policy reads, what a table
    shows). A conversational pair (TRL's message format) also keeps its messages, so that a
    reward model scores the conversation itself: every RM call site scores
    :meth:`chosen_item` / :meth:`rejected_item`, which the RM renders with its one rendering
    function (its chat template, or a text pair), in training as in serving. ``margin`` is
    TRL's per-pair margin column.
    """

    prompt: str
    chosen: str
    rejected: str
    domain: str | None = None
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    margin: float | None = None
    messages: tuple[Messages, Messages, Messages] | None = None  # (prompt, chosen, rejected)

    @property
    def flipped(self) -> bool:
        """Label noise was planted here: chosen/rejected are swapped relative to gold."""
        return bool(self.meta.get("flipped", False))

    def _item(self, response: str, response_messages: Messages | None) -> dict[str, Any]:
        if self.messages is None:
            return {"prompt": self.prompt, "response": response}
        return {"messages": [*self.messages[0], *response_messages]}

    def chosen_item(self) -> dict[str, Any]:
        """What the RM scores for the chosen side."""
        return self._item(self.chosen, self.messages[1] if self.messages else None)

    def rejected_item(self) -> dict[str, Any]:
        return self._item(self.rejected, self.messages[2] if self.messages else None)

    def swapped(self) -> PreferencePair:
        """The same pair with the labels the other way round (a flip)."""
        messages = (self.messages[0], self.messages[2], self.messages[1]) if self.messages else None
        return replace(self, chosen=self.rejected, rejected=self.chosen, messages=messages)


def as_pair(pair: Any) -> PreferencePair:
    """A :class:`PreferencePair` from one, or from a mapping with the same fields."""
    if isinstance(pair, PreferencePair):
        return pair
    if isinstance(pair, Mapping):
        return PreferencePair(prompt=pair["prompt"], chosen=pair["chosen"],
                              rejected=pair["rejected"], domain=pair.get("domain"),
                              id=pair.get("id"), meta=dict(pair.get("meta") or {}),
                              margin=pair.get("margin"))
    return PreferencePair(prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected,
                          domain=getattr(pair, "domain", None), id=getattr(pair, "id", None),
                          meta=dict(getattr(pair, "meta", None) or {}))


@dataclass
class PromptSamples:
    prompt: str
    responses: list[str]
    gold: list[float] | None = None
    domain: str | None = None
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- file names
def noise_tag(noise: float) -> str:
    """``0.2`` -> ``noise0.2``: the one spelling shared by the builder and the loader."""
    if not 0.0 < noise < 1.0:
        raise ValueError(f"label noise must be in (0, 1), got {noise}")
    return f"noise{noise:g}"


def pairs_filename(part: str = "train", noise: float | None = None) -> str:
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if noise is None:
        return f"pairs.{part}.jsonl"
    if part != "train":
        raise ValueError("label noise is planted in training pairs only")
    return f"pairs.{part}.{noise_tag(noise)}.jsonl"


def samples_filename(part: str = "train") -> str:
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    return f"samples.{part}.jsonl"


# ----------------------------------------------------------------------------- raw rows
def iter_jsonl(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a non-object line is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(path, number, f"expected a JSON object, got {type(row).__name__}")
            yield number, row


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSONL, or a ``.json`` file holding one list of objects (line = list index + 1)."""
    if path.suffix != ".json":
        yield from iter_jsonl(path)
        return
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"invalid JSON ({exc.msg})") from None
    if not isinstance(payload, list):
        raise DataError(path, None, "a .json data file must hold a list of objects")
    for index, row in enumerate(payload, start=1):
        if not isinstance(row, dict):
            raise DataError(path, index, f"item {index} is not a JSON object")
        yield index, row


class _Row:
    """Field access that reports the file and line of the row on any mistake."""

    def __init__(self, path: Path, line: int, row: Mapping[str, Any]) -> None:
        self.path, self.line, self.row = path, line, row

    def fail(self, message: str) -> DataError:
        return DataError(self.path, self.line, message)

    def text(self, name: str, *, required: bool = True) -> str | None:
        value = self.row.get(name)
        if value is None:
            if required:
                raise self.fail(f"missing field '{name}'")
            return None
        if not isinstance(value, str):
            raise self.fail(f"field '{name}' must be a string, got {type(value).__name__}")
        return value

    def number(self, name: str) -> float | None:
        value = self.row.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(f"field '{name}' must be a finite number, got {value!r}")
        return float(value)

    def messages(self, name: str, value: Any) -> list[dict[str, str]]:
        if not isinstance(value, list) or not value:
            raise self.fail(f"field '{name}' must be a string or a non-empty list of messages")
        for i, message in enumerate(value):
            if (
                not isinstance(message, Mapping)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise self.fail(f"'{name}[{i}]' must be an object with string 'role' and 'content'")
        return [{"role": m["role"], "content": m["content"]} for m in value]


# ----------------------------------------------------------------------------- pairs
def _render_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """A conversation's prompt as one text, for policies and tables; reward models score the
    messages themselves (:meth:`PreferencePair.chosen_item`)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _completion_text(messages: Sequence[Mapping[str, str]]) -> str:
    return "\n\n".join(m["content"] for m in messages)


def _common_prefix(a: list[dict[str, str]], b: list[dict[str, str]]) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def _pair_from_row(row: _Row) -> PreferencePair:
    raw_chosen, raw_rejected = row.row.get("chosen"), row.row.get("rejected")
    for name, value in (("chosen", raw_chosen), ("rejected", raw_rejected)):
        if value is None:
            raise row.fail(f"missing field '{name}'")
    meta: dict[str, Any] = {}
    messages = None
    if isinstance(raw_chosen, str) and isinstance(raw_rejected, str):
        prompt = row.text("prompt")
        chosen, rejected = raw_chosen, raw_rejected
    else:
        # TRL conversational format
        chosen_msgs = row.messages("chosen", raw_chosen)
        rejected_msgs = row.messages("rejected", raw_rejected)
        raw_prompt = row.row.get("prompt")
        if raw_prompt is None:  # implicit prompt: the shared beginning of both conversations
            n = _common_prefix(chosen_msgs, rejected_msgs)
            if n == 0:
                raise row.fail(
                    "no 'prompt' and the 'chosen'/'rejected' conversations share no beginning"
                )
            prompt_msgs, chosen_msgs, rejected_msgs = (
                chosen_msgs[:n], chosen_msgs[n:], rejected_msgs[n:]
            )
        elif isinstance(raw_prompt, str):
            prompt_msgs = [{"role": "user", "content": raw_prompt}]
        else:
            prompt_msgs = row.messages("prompt", raw_prompt)
        prompt = _render_prompt(prompt_msgs)
        chosen, rejected = _completion_text(chosen_msgs), _completion_text(rejected_msgs)
        messages = (prompt_msgs, chosen_msgs, rejected_msgs)
    for name in ("gold_chosen", "gold_rejected"):
        value = row.number(name)
        if value is not None:
            meta[name] = value
    flipped = row.row.get("flipped")
    if flipped is not None:
        if not isinstance(flipped, bool):
            raise row.fail(f"field 'flipped' must be true or false, got {flipped!r}")
        meta["flipped"] = flipped
    for key, value in row.row.items():
        if key not in PAIR_FIELDS and key not in meta and key not in ("gold_chosen", "gold_rejected"):
            meta[key] = value
    identifier = row.row.get("id")
    return PreferencePair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        domain=row.text("domain", required=False),
        id=None if identifier is None else str(identifier),
        meta=meta,
        margin=row.number("margin"),
        messages=messages,
    )


def load_pairs(path: Path | str, *, allow_empty: bool = False) -> list[PreferencePair]:
    """Preference pairs from a JSONL (or JSON list) file, in file order.

    An empty file is an error unless ``allow_empty``: a training set without pairs is almost
    always a wrong path, while a benchmark part may legitimately have none.
    """
    path = Path(path)
    pairs = [_pair_from_row(_Row(path, line, row)) for line, row in _rows(path)]
    if not pairs and not allow_empty:
        raise DataError(path, None, "no preference pairs in file")
    return pairs


# ----------------------------------------------------------------------------- samples
def _samples_from_row(row: _Row) -> PromptSamples:
    responses = row.row.get("responses")
    if not isinstance(responses, list) or not responses:
        raise row.fail("field 'responses' must be a non-empty list of strings")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise row.fail(f"'responses[{i}]' must be a string, got {type(response).__name__}")
    gold = row.row.get("gold")
    if gold is not None:
        if not isinstance(gold, list) or len(gold) != len(responses):
            raise row.fail(
                f"field 'gold' must be a list with one number per response ({len(responses)})"
            )
        for i, value in enumerate(gold):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise row.fail(f"'gold[{i}]' must be a finite number, got {value!r}")
        gold = [float(v) for v in gold]
    meta = {
        k: v
        for k, v in row.row.items()
        if k not in ("id", "prompt", "responses", "gold", "domain")
    }
    identifier = row.row.get("id")
    return PromptSamples(
        prompt=row.text("prompt"),
        responses=list(responses),
        gold=gold,
        domain=row.text("domain", required=False),
        id=None if identifier is None else str(identifier),
        meta=meta,
    )


def load_samples(path: Path | str, *, allow_empty: bool = False) -> list[PromptSamples]:
    """Prompts with sampled responses (and their gold rewards), in file order."""
    path = Path(path)
    samples = [_samples_from_row(_Row(path, line, row)) for line, row in _rows(path)]
    if not samples and not allow_empty:
        raise DataError(path, None, "no prompts in file")
    return samples


# ----------------------------------------------------------------------------- benchmark
@dataclass
class Benchmark:
    """One task of the offline benchmark: ``{root}/{task}/splits.json`` and domain folders."""

    task: str
    root: Path
    splits: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.root / self.task

    @property
    def source_domains(self) -> list[str]:
        return list(self.splits["source_domains"])

    @property
    def heldout_domains(self) -> list[str]:
        return list(self.splits["heldout_domains"])

    @property
    def domains(self) -> list[str]:
        return self.source_domains + self.heldout_domains

    @property
    def label_noise(self) -> list[float]:
        return list(self.splits.get("label_noise", []))

    def _domain_dir(self, domain: str) -> Path:
        if domain not in self.domains:
            raise DataError(
                self.directory / "splits.json",
                None,
                f"unknown domain {domain!r}; this task has {', '.join(self.domains)}",
            )
        return self.directory / domain

    def pairs(
        self, domain: str, part: str = "train", noise: float | None = None
    ) -> list[PreferencePair]:
        path = self._domain_dir(domain) / pairs_filename(part, noise)
        return load_pairs(path, allow_empty=True)

    def samples(self, domain: str, part: str = "train") -> list[PromptSamples]:
        return load_samples(self._domain_dir(domain) / samples_filename(part), allow_empty=True)


def default_bench_root() -> Path:
    """The benchmark shipped with this installation (the ``benchdata`` package)."""
    return benchdata.ROOT


def load_benchmark(task: str, root: Path | str | None = None) -> Benchmark:
    """Open a built benchmark task (``csg`` or ``ka``); build it with ``make data``.
    ``root`` defaults to the installed benchmark (:func:`default_bench_root`)."""
    root = Path(root) if root is not None else default_bench_root()
    splits_path = root / task / "splits.json"
    if not splits_path.is_file():
        raise DataError(splits_path, None, "not found; build the benchmark with `make data`")
    try:
        splits = json.loads(splits_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(splits_path, exc.lineno, f"invalid JSON ({exc.msg})") from None
    for key in ("source_domains", "heldout_domains"):
        if not isinstance(splits.get(key), list):
            raise DataError(splits_path, None, f"missing list '{key}'")
    return Benchmark(task=task, root=root, splits=splits)
