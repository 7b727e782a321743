"""Read the evidence benchmark's data (data v2, ``benchdata/v2/<task>/``).

Files of one task (written by ``bench.datagen``; the datasheet is ``benchdata/README.md``):

- ``manifest.json``: ``{"task", "version": 2, "seed", "source_domains", "heldout_domains",
  "policy", "gold", "params", "stats"}``;
- ``source.jsonl``: one source prompt a line, ``{"id", "task", "domain", "split": "train" |
  "val", "prompt", "candidates": [str], "gold": [float], "kinds": [str]}``;
- ``source_pairs.jsonl``: ``{"id", "task", "domain", "split", "prompt", "chosen", "rejected",
  "gold_chosen", "gold_rejected", "kind"}`` (higher gold chosen, |Δgold| ≥ the builder's gap);
- ``heldout.jsonl``: one held-out prompt a line, like ``source.jsonl`` with ``"part":
  "control" | "eval"`` instead of ``split``. The control part (about a third) trains the
  positive control and is the unlabeled pool of adaptation and MetaRM meta sets; the eval part
  is only ever evaluated.

Every error names the file and line. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchdata

VERSION = 2
DEFAULT_ROOT = benchdata.ROOT / "v2"
TASKS = ("csg", "ka")
# KA candidate kinds that are a dictionary gloss (the true one or another word's); the rest
# ("policy") are the base policy's own answers.
GLOSS_KINDS = frozenset({"gloss", "sibling", "hypernym"})
DEFAULT_PAIR_GAP = 0.3  # |Δgold| of a training pair when the manifest does not say


class EvidenceDataError(ValueError):
    """A data file is missing or a line does not have the v2 format (the message says where)."""


@dataclass(frozen=True)
class PromptSet:
    """One prompt with its cached candidates and their gold scores."""

    id: str
    task: str
    domain: str
    group: str  # source: "train" | "val"; held-out: "control" | "eval"
    prompt: str
    candidates: tuple[str, ...]
    gold: tuple[float, ...]
    kinds: tuple[str, ...]

    @property
    def oracle_gain(self) -> float:
        """max gold − mean gold: what a perfect reranker adds over a uniform draw."""
        return max(self.gold) - sum(self.gold) / len(self.gold)


@dataclass(frozen=True)
class SourcePair:
    id: str
    domain: str
    split: str
    prompt: str
    chosen: str
    rejected: str
    gold_chosen: float
    gold_rejected: float
    kind: str = ""


@dataclass
class TaskData:
    task: str
    manifest: dict[str, Any]
    source: list[PromptSet]
    source_pairs: list[SourcePair]
    heldout: list[PromptSet]
    root: Path = field(default_factory=Path)

    @property
    def heldout_domains(self) -> list[str]:
        return list(self.manifest["heldout_domains"])

    @property
    def source_domains(self) -> list[str]:
        return list(self.manifest["source_domains"])

    @property
    def pair_gap(self) -> float:
        params = self.manifest.get("params") or {}
        for key in ("min_gap", "pair_gap", "min_gold_gap", "gap"):
            if isinstance(params.get(key), int | float):
                return float(params[key])
        return DEFAULT_PAIR_GAP

    def source_split(self, split: str) -> list[PromptSet]:
        return [p for p in self.source if p.group == split]

    def pairs(self, split: str) -> list[SourcePair]:
        return [p for p in self.source_pairs if p.split == split]

    def heldout_part(self, part: str) -> list[PromptSet]:
        return [p for p in self.heldout if p.group == part]

    def items(self) -> list[tuple[str, str]]:
        """Every (prompt, response) the benchmark scores, once each, in a fixed order."""
        seen: dict[tuple[str, str], None] = {}
        for ps in [*self.source, *self.heldout]:
            for c in ps.candidates:
                seen.setdefault((ps.prompt, c), None)
        for pair in self.source_pairs:
            seen.setdefault((pair.prompt, pair.chosen), None)
            seen.setdefault((pair.prompt, pair.rejected), None)
        return list(seen)

    def subsample(self, prompts_per_domain: int, seed: int = 0) -> TaskData:
        """At most ``prompts_per_domain`` prompts of each (domain, split/part), and the source
        pairs of the prompts kept (``--quick``)."""
        rng = random.Random(seed)

        def cut(sets: list[PromptSet]) -> list[PromptSet]:
            groups: dict[tuple[str, str], list[PromptSet]] = {}
            for ps in sets:
                groups.setdefault((ps.domain, ps.group), []).append(ps)
            kept = {ps.id for members in groups.values()
                    for ps in rng.sample(members, min(prompts_per_domain, len(members)))}
            return [ps for ps in sets if ps.id in kept]

        source, heldout = cut(self.source), cut(self.heldout)
        prompts = {(ps.domain, ps.prompt) for ps in source}
        pairs = [p for p in self.source_pairs if (p.domain, p.prompt) in prompts]
        return TaskData(self.task, self.manifest, source, pairs, heldout, self.root)


# ---------------------------------------------------------------------- readers
def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise EvidenceDataError(f"{path}: missing (build data v2 with python -m bench.datagen)")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvidenceDataError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise EvidenceDataError(f"{path}:{number}: a line must be a JSON object")
            yield number, row


def _need(row: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in row:
        raise EvidenceDataError(f"{where}: no {key!r}")
    if not isinstance(row[key], kind):
        raise EvidenceDataError(f"{where}: {key!r} has the wrong type ({type(row[key]).__name__})")
    return row[key]


def _prompt_set(row: dict[str, Any], where: str, group_key: str, groups: Sequence[str]) -> PromptSet:
    group = _need(row, group_key, str, where)
    if group not in groups:
        raise EvidenceDataError(f"{where}: {group_key!r} must be one of {list(groups)}, got {group!r}")
    candidates = _need(row, "candidates", list, where)
    gold = _need(row, "gold", list, where)
    kinds = row.get("kinds") or ["policy"] * len(candidates)
    if not (len(candidates) == len(gold) == len(kinds)) or len(candidates) < 2:
        raise EvidenceDataError(f"{where}: candidates, gold and kinds need the same length ≥ 2")
    if not all(isinstance(c, str) for c in candidates):
        raise EvidenceDataError(f"{where}: every candidate must be a string")
    if not all(isinstance(g, int | float) and not isinstance(g, bool) for g in gold):
        raise EvidenceDataError(f"{where}: every gold score must be a number")
    return PromptSet(
        id=str(_need(row, "id", (str, int), where)), task=str(row.get("task", "")),
        domain=_need(row, "domain", str, where), group=group,
        prompt=_need(row, "prompt", str, where), candidates=tuple(candidates),
        gold=tuple(float(g) for g in gold), kinds=tuple(str(k) for k in kinds))


def _source_pair(row: dict[str, Any], where: str) -> SourcePair:
    pair = SourcePair(
        id=str(_need(row, "id", (str, int), where)), domain=_need(row, "domain", str, where),
        split=_need(row, "split", str, where), prompt=_need(row, "prompt", str, where),
        chosen=_need(row, "chosen", str, where), rejected=_need(row, "rejected", str, where),
        gold_chosen=float(_need(row, "gold_chosen", (int, float), where)),
        gold_rejected=float(_need(row, "gold_rejected", (int, float), where)),
        kind=str(row.get("kind", "")))
    if pair.gold_chosen < pair.gold_rejected:
        raise EvidenceDataError(f"{where}: gold_chosen < gold_rejected (chosen must be the better)")
    return pair


def load_task(task: str, root: str | Path | None = None) -> TaskData:
    """Read ``<root>/<task>/`` (root: ``benchdata/v2``)."""
    directory = Path(root or DEFAULT_ROOT) / task
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise EvidenceDataError(f"{manifest_path}: missing (build data v2 with python -m bench.datagen)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for key in ("task", "source_domains", "heldout_domains"):
        if key not in manifest:
            raise EvidenceDataError(f"{manifest_path}: no {key!r}")
    if manifest.get("version") != VERSION:
        raise EvidenceDataError(f"{manifest_path}: version {manifest.get('version')!r}, expected {VERSION}")
    source = [_prompt_set(row, f"{directory / 'source.jsonl'}:{n}", "split", ("train", "val"))
              for n, row in _lines(directory / "source.jsonl")]
    pairs = [_source_pair(row, f"{directory / 'source_pairs.jsonl'}:{n}")
             for n, row in _lines(directory / "source_pairs.jsonl")]
    heldout = [_prompt_set(row, f"{directory / 'heldout.jsonl'}:{n}", "part", ("control", "eval"))
               for n, row in _lines(directory / "heldout.jsonl")]
    unknown = sorted({ps.domain for ps in heldout} - set(manifest["heldout_domains"]))
    if unknown:
        raise EvidenceDataError(f"{directory / 'heldout.jsonl'}: domains {unknown} are not in the manifest")
    return TaskData(task, manifest, source, pairs, heldout, directory)


# ---------------------------------------------------------------------- derived pairs
def candidate_pairs(prompts: Sequence[PromptSet], min_gap: float) -> list[SourcePair]:
    """Every pair of a prompt's candidates whose gold differs by at least ``min_gap``, the
    higher-gold one chosen (how the positive control's held-out pairs are made: the same rule
    as the builder's source pairs)."""
    pairs = []
    for ps in prompts:
        n = len(ps.candidates)
        for i in range(n):
            for j in range(i + 1, n):
                gi, gj = ps.gold[i], ps.gold[j]
                if abs(gi - gj) < min_gap or ps.candidates[i] == ps.candidates[j]:
                    continue
                hi, lo = (i, j) if gi > gj else (j, i)
                pairs.append(SourcePair(
                    id=f"{ps.id}/{hi}-{lo}", domain=ps.domain, split=ps.group, prompt=ps.prompt,
                    chosen=ps.candidates[hi], rejected=ps.candidates[lo],
                    gold_chosen=ps.gold[hi], gold_rejected=ps.gold[lo],
                    kind=f"{ps.kinds[hi]}-{ps.kinds[lo]}"))
    return pairs


NOISE_KINDS = ("uniform", "instance")


def instance_flip_probabilities(pairs: Sequence[SourcePair], rate: float) -> tuple[list[float], float]:
    """Per-pair flip probabilities of instance-dependent noise, and the temperature τ.

    p_i = σ(−|Δgold_i| / τ), with τ chosen by bisection (on log τ) so that the expected flip
    rate (1/N)·Σ_i p_i equals ``rate``. Small-gap pairs (hard even for an annotator) flip
    more often than large-gap ones. Since |Δgold| ≥ 0, every p_i ≤ 1/2 and the mean tends to
    1/2 as τ → ∞, so ``rate`` must be below 0.5.
    """
    if not 0.0 < rate < 0.5:
        raise ValueError(f"instance-dependent noise needs 0 < rate < 0.5, got {rate}")
    gaps = [abs(p.gold_chosen - p.gold_rejected) for p in pairs]

    def probabilities(tau: float) -> list[float]:
        return [1.0 / (1.0 + math.exp(min(g / tau, 700.0))) for g in gaps]

    low, high = math.log(1e-6), math.log(1e6)  # expected rate ≈ 0 at τ = e^low, ≈ 1/2 at e^high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if sum(probabilities(math.exp(middle))) / len(gaps) < rate:
            low = middle
        else:
            high = middle
    tau = math.exp(0.5 * (low + high))
    return probabilities(tau), tau


def plant_noise(pairs: Sequence[SourcePair], rate: float, seed: int, kind: str = "uniform") -> list[bool]:
    """Which pairs get their labels flipped; the same pattern for every method and seed.

    - ``uniform``: exactly round(rate·N) pairs, drawn uniformly without replacement;
    - ``instance``: pair i flips with probability p_i = σ(−|Δgold_i|/τ), independently, with
      τ set so that the expected flip rate is ``rate`` (``instance_flip_probabilities``): the
      realized rate varies around it by about √(rate·(1−rate)/N).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    if rate <= 0 or not pairs:
        return [False] * len(pairs)
    rng = random.Random(seed)
    if kind == "instance":
        probabilities, _ = instance_flip_probabilities(pairs, rate)
        return [rng.random() < p for p in probabilities]
    flipped = set(rng.sample(range(len(pairs)), int(round(rate * len(pairs)))))
    return [i in flipped for i in range(len(pairs))]
