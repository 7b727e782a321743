"""Data v2 (issue 15): candidate sets on held-out domains, on which a reward model's ranking
can be measured, and gold-ranked pairs on source domains to train reward models on.

``python -m bench.datagen v2`` writes, for each task, ``{out}/{task}/`` (default
``benchdata/v2/``) and the datasheet ``{out}/README.md``:

- ``manifest.json``: ``{"task", "version": 2, "seed", "source_domains", "heldout_domains",
  "policy", "gold", "params", "stats"}``.
- ``source.jsonl``: one row per source prompt, ``{"id", "task", "domain", "split": "train" |
  "val", "prompt", "candidates", "gold", "kinds"}``; ``val`` (about ``val_fraction`` of each
  source domain) is where knobs are chosen without touching a held-out domain.
- ``source_pairs.jsonl``: ``{"id", "task", "domain", "split", "prompt", "chosen", "rejected",
  "gold_chosen", "gold_rejected", "kind"}``: every two candidates of a source prompt whose
  gold differs by at least the task's ``min_gap``, the higher one chosen; ``kind`` is
  ``"<kind of chosen>><kind of rejected>"``.
- ``heldout.jsonl``: one row per held-out prompt, ``{"id", "task", "domain", "part":
  "control" | "eval", "prompt", "candidates", "gold", "kinds"}``; ``control`` (about
  ``control_fraction`` of each held-out domain) trains only the positive control and serves
  as unlabeled prompts for adaptation, ``eval`` is only ever evaluated.

Prompts, gold and policy sampling are v1's (:mod:`bench.datagen.tasks`); no prompt text occurs
twice in a task and held-out domains never occur on the source side. Everything random draws
from ``random.Random`` seeded by (seed, task, "v2", purpose) and from the sampler's per-row
generators, so one seed rebuilds the same bytes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.datagen.build import (
    BuildError,
    Prompt,
    describe,
    gold_ranked_pairs,
    rng_for,
    unique_prompt_entries,
    write_jsonl,
)
from bench.datagen.generate import PolicySampler
from bench.datagen.tasks import (
    CSG,
    KA,
    KA_SIBLINGS,
    Entry,
    Task,
    ka_knowledge_candidates,
    ka_relatives,
)
from training.data import default_bench_root

VERSION = 2
MIN_HELDOUT_PROMPTS = 3  # one control and two eval prompts at the least
M2_MIN_GAP = 0.1  # the gap of issue 15's within-prompt accuracy (M2); counted in the stats
SOURCE_SPLITS = ("train", "val")
HELDOUT_PARTS = ("control", "eval")


def default_v2_root() -> Path:
    return default_bench_root() / "v2"


@dataclass(frozen=True)
class V2Task:
    """How data v2 builds one v1 task: candidates per prompt, pair gap, held-out choice."""

    task: Task
    heldout_k: int  # policy samples per held-out prompt
    source_k: int  # policy samples per source prompt
    min_gap: float  # source pairs need |Δgold| >= min_gap
    min_gap_why: str
    # a default held-out domain with too few usable prompts is replaced by the first of these
    heldout_fallback: tuple[str, ...]
    description: str
    # candidates besides the policy's, as (text, kind); None: policy samples only
    knowledge: Callable[[Entry, random.Random], list[tuple[str, str]]] | None = None
    usable: Callable[[Entry], bool] = field(default=lambda entry: True)

    @property
    def name(self) -> str:
        return self.task.name


CSG_V2 = V2Task(
    task=CSG,
    heldout_k=16,
    source_k=4,
    min_gap=0.3,
    min_gap_why=(
        "VADER compound spans [-1, 1]; a gap of 0.3 is 15 % of that range, past the shifts "
        "one mildly valenced word makes, so a pair is not decided by one incidental word"
    ),
    heldout_fallback=("drugs", "startrek", "miscellaneous"),
    description=(
        "Domains are `fortunes` categories; a prompt is the first 8 words of a prose entry "
        "(12–60 words, as in v1) and every candidate is a continuation sampled from the base "
        "policy (kind `policy`). Gold is VADER compound sentiment."
    ),
)

KA_V2 = V2Task(
    task=KA,
    heldout_k=4,
    source_k=2,
    min_gap=0.2,
    min_gap_why=(
        "token-F1 against a gloss of ~5–10 content words moves by ~0.1 per shared word; 0.2 "
        "asks for about two words of difference, so a pair is not decided by one "
        "incidental word, while gloss-vs-sibling pairs (typically 0.6–0.9 apart) all stay"
    ),
    heldout_fallback=("noun.feeling", "verb.social", "noun.possession"),
    description=(
        "Domains are WordNet lexicographer files; a prompt asks what a monosemous word means "
        "(v1's wording). Its candidates are the true gloss (`gloss`, gold 1.0), the glosses "
        f"of up to {KA_SIBLINGS} co-hyponyms (`sibling`: the same kind of thing, another "
        "thing), the gloss of its hypernym (`hypernym`: the right kind, too general) and "
        "policy answers through the chat template (`policy`), in a seeded shuffled order. "
        "Only words with a hypernym and at least 2 co-hyponyms with distinct glosses of 4+ "
        "words are used. Gold is token-F1 against the true gloss (function words dropped)."
    ),
    knowledge=ka_knowledge_candidates,
    usable=lambda entry: ka_relatives(entry) is not None,
)

V2_TASKS = {t.name: t for t in (CSG_V2, KA_V2)}


@dataclass
class V2Config:
    out: Path = field(default_factory=default_v2_root)
    seed: int = 0
    policy: str = "smollm2-135m"
    heldout: list[str] | None = None  # None: the task's default held-out domains
    source_domains: int = 12
    source_prompts: int = 60  # per source domain
    heldout_prompts: int = 75  # per held-out domain
    heldout_k: int | None = None  # None: the task's
    source_k: int | None = None  # None: the task's
    val_fraction: float = 0.2
    control_fraction: float = 1 / 3
    min_heldout_usable: int = 80  # a default held-out domain with fewer prompts is replaced
    precision: str = "auto"  # the policy's: bf16 autocast on CPUs with bf16 units
    artifacts_dir: Path = Path("artifacts")
    cache_dir: Path | None = None  # default: <artifacts_dir>/cache/generations
    batch_rows: int = 64
    threads: int = 1  # recorded only: bf16 rounding may depend on how the work is split
    quick: bool = False  # recorded only; the sizes above make a quick build quick
    quiet: bool = False

    def generation_cache(self) -> Path:
        return self.cache_dir or self.artifacts_dir / "cache" / "generations"

    def ks(self, vtask: V2Task) -> tuple[int, int]:
        """(source, held-out) policy samples per prompt."""
        return self.source_k or vtask.source_k, self.heldout_k or vtask.heldout_k


QUICK_SIZES = {"source_domains": 3, "source_prompts": 5, "heldout_prompts": 6,
               "heldout_k": 3, "source_k": 2}


# ----------------------------------------------------------------------------- domains
@cache  # KA checks every WordNet word's relatives: once per process
def usable_pools(vtask: V2Task) -> dict[str, list[Entry]]:
    """Per domain, the entries a v2 prompt can come from: a prompt text that occurs once in the
    whole task (so no choice of domains can make two prompts alike) and ``vtask.usable``."""
    candidates = vtask.task.candidates()
    pools = unique_prompt_entries(candidates, sorted(candidates))
    return {d: [e for e in pool if vtask.usable(e)] for d, pool in sorted(pools.items())}


def choose_v2_domains(
    vtask: V2Task, sizes: dict[str, int], config: V2Config
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(source, held-out, replacements). ``--heldout`` is taken as given; otherwise the v1
    held-out list, each domain with fewer than ``min_heldout_usable`` usable prompts replaced
    by the first fallback that has enough. Source: the v1 domain order, then the rest by
    name, skipping held-out domains and those with fewer than ``source_prompts`` prompts."""
    replaced: list[dict[str, Any]] = []
    if config.heldout is not None:
        heldout = list(dict.fromkeys(config.heldout))
        for domain in heldout:
            if sizes.get(domain, 0) < MIN_HELDOUT_PROMPTS:
                raise BuildError(
                    f"{vtask.name}: held-out domain {domain!r} unknown or with fewer than "
                    f"{MIN_HELDOUT_PROMPTS} usable prompts; eligible: "
                    + ", ".join(d for d, n in sizes.items() if n >= MIN_HELDOUT_PROMPTS)
                )
    else:
        heldout = []
        for domain in vtask.task.default_heldout:
            if sizes.get(domain, 0) >= config.min_heldout_usable:
                heldout.append(domain)
                continue
            substitute = next(
                (d for d in vtask.heldout_fallback
                 if d not in heldout and d not in vtask.task.default_heldout
                 and sizes.get(d, 0) >= config.min_heldout_usable),
                None,
            )
            if substitute is None:
                raise BuildError(f"{vtask.name}: {domain!r} has {sizes.get(domain, 0)} usable "
                                 "prompts and no fallback domain has enough")
            heldout.append(substitute)
            replaced.append({"domain": domain, "usable": sizes.get(domain, 0),
                             "replaced_by": substitute, "replacement_usable": sizes[substitute]})
    ordered = [d for d in vtask.task.default_domains if d in sizes]
    ordered += sorted(d for d in sizes if d not in ordered)
    source = [d for d in ordered if d not in heldout and sizes[d] >= config.source_prompts]
    source = source[: config.source_domains]
    if not source:
        raise BuildError(f"{vtask.name}: no source domain with {config.source_prompts} prompts")
    return source, heldout, replaced


def pick_prompts(
    vtask: V2Task, config: V2Config, pools: dict[str, list[Entry]], domains: Sequence[str],
    per_domain: int, parts: tuple[str, str], first_fraction: float,
) -> list[Prompt]:
    """``per_domain`` seeded draws from each domain's pool; the first ``first_fraction`` of a
    domain's draws (at least one, and leaving one) get ``parts[0]``, the others ``parts[1]``."""
    prompts: list[Prompt] = []
    for domain in domains:
        pool = pools[domain]
        n = min(per_domain, len(pool))
        picked = rng_for(config.seed, vtask.task, "v2", domain, "prompts").sample(pool, n)
        n_first = min(n - 1, max(1, round(first_fraction * n)))
        for index, entry in enumerate(picked):
            part = parts[0] if index < n_first else parts[1]
            prompts.append(Prompt(f"{vtask.name}-v2/{domain}/{index:04d}", domain, entry, part))
    return prompts


# ----------------------------------------------------------------------------- candidates
def fill_candidates(
    vtask: V2Task, config: V2Config, prompts: Sequence[Prompt], samples: Sequence[list[str]]
) -> None:
    """Candidates, kinds and gold of each prompt: the knowledge candidates (KA) and the policy
    samples, shuffled by a per-prompt seed when there are several kinds (a scorer that breaks
    ties by position must not meet the true gloss first every time)."""
    for prompt, policy in zip(prompts, samples, strict=True):
        candidates: list[tuple[str, str]] = []
        if vtask.knowledge is not None:
            rng = rng_for(config.seed, vtask.task, "v2", prompt.id, "knowledge")
            candidates += vtask.knowledge(prompt.entry, rng)
        candidates += [(text, "policy") for text in policy]
        if len({kind for _, kind in candidates}) > 1:
            rng_for(config.seed, vtask.task, "v2", prompt.id, "order").shuffle(candidates)
        prompt.responses = [text for text, _ in candidates]
        prompt.sources = [kind for _, kind in candidates]
        prompt.gold = [vtask.task.gold(text, prompt.entry) for text in prompt.responses]


def candidate_row(vtask: V2Task, prompt: Prompt, part_key: str) -> dict[str, Any]:
    return {"id": prompt.id, "task": vtask.name, "domain": prompt.domain, part_key: prompt.part,
            "prompt": prompt.entry.prompt, "candidates": prompt.responses, "gold": prompt.gold,
            "kinds": prompt.sources}


def pair_rows(vtask: V2Task, prompt: Prompt) -> list[dict[str, Any]]:
    return [
        {"id": f"{prompt.id}/{n}", "task": vtask.name, "domain": prompt.domain,
         "split": prompt.part, "prompt": prompt.entry.prompt, "chosen": pair["chosen"],
         "rejected": pair["rejected"], "gold_chosen": pair["gold_chosen"],
         "gold_rejected": pair["gold_rejected"], "kind": pair["kind"]}
        for n, pair in enumerate(gold_ranked_pairs(prompt, vtask.min_gap))
    ]


# ----------------------------------------------------------------------------- statistics
def kind_group(kind: str) -> str:
    """Policy answers against written text (KA's gloss, sibling and hypernym are all glosses)."""
    return "policy" if kind == "policy" else "gloss"


def oracle_gain(gold: Sequence[float]) -> float:
    """max(gold) − mean(gold): what picking a prompt's best candidate gains over a random one."""
    return max(gold) - statistics.fmean(gold)


def prompt_set_stats(prompts: Sequence[Prompt]) -> dict[str, Any]:
    """Counts, gold mean/std/min/max (all candidates and by kind), the oracle gain averaged
    over prompts (all candidates, and among policy samples alone when other kinds exist), and
    the within-prompt pairs with |Δgold| >= M2_MIN_GAP by kind group."""
    gold = [g for p in prompts for g in p.gold]
    by_kind: dict[str, list[float]] = {}
    for p in prompts:
        for g, kind in zip(p.gold, p.sources, strict=True):
            by_kind.setdefault(kind, []).append(g)
    m2_pairs: Counter[str] = Counter()
    for p in prompts:
        for i in range(len(p.gold)):
            for j in range(i + 1, len(p.gold)):
                if abs(p.gold[i] - p.gold[j]) >= M2_MIN_GAP:
                    m2_pairs["-".join(sorted((kind_group(p.sources[i]),
                                              kind_group(p.sources[j]))))] += 1
    stats: dict[str, Any] = {
        "prompts": len(prompts),
        "parts": dict(sorted(Counter(p.part for p in prompts).items())),
        "candidates": len(gold),
        "gold": describe(gold),
        "gold_by_kind": {k: describe(v) for k, v in sorted(by_kind.items())},
        "oracle_gain": round(statistics.fmean(oracle_gain(p.gold) for p in prompts), 4),
        "m2_pairs": dict(sorted(m2_pairs.items())),
    }
    if len(by_kind) > 1 and "policy" in by_kind:
        policy = [[g for g, k in zip(p.gold, p.sources, strict=True) if k == "policy"]
                  for p in prompts]
        stats["oracle_gain_policy"] = round(statistics.fmean(oracle_gain(g) for g in policy), 4)
    return stats


def pair_stats(pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"pairs": dict(sorted(Counter(p["split"] for p in pairs).items())),
            "pair_kinds": dict(sorted(Counter(p["kind"] for p in pairs).items()))}


# ----------------------------------------------------------------------------- build
def build_v2_task(vtask: V2Task, config: V2Config) -> Path:
    """Build ``{out}/{task}/`` (written beside the old one, swapped in at the end); return it."""
    pools = usable_pools(vtask)
    sizes = {d: len(pool) for d, pool in pools.items()}
    source, heldout, replaced = choose_v2_domains(vtask, sizes, config)
    source_k, heldout_k = config.ks(vtask)
    source_prompts = pick_prompts(vtask, config, pools, source, config.source_prompts,
                                  ("val", "train"), config.val_fraction)
    heldout_prompts = pick_prompts(vtask, config, pools, heldout, config.heldout_prompts,
                                   ("control", "eval"), config.control_fraction)

    sampler = PolicySampler(config.policy, artifacts_dir=config.artifacts_dir,
                            cache_dir=config.generation_cache(), seed=config.seed,
                            batch_rows=config.batch_rows, precision=config.precision)
    for side, prompts, k in (("source", source_prompts, source_k),
                             ("held-out", heldout_prompts, heldout_k)):
        with tqdm(total=len(prompts), desc=f"{vtask.name} v2 {side}: sampling", unit="prompt",
                  disable=config.quiet) as bar:
            samples = sampler.sample([p.entry.prompt for p in prompts], vtask.task.params, k,
                                     progress=bar.update)
        fill_candidates(vtask, config, prompts, samples)

    pairs = [row for p in source_prompts for row in pair_rows(vtask, p)]
    domain_stats: dict[str, Any] = {}
    for domain in source + heldout:
        mine = [p for p in source_prompts + heldout_prompts if p.domain == domain]
        domain_stats[domain] = {"side": "source" if domain in source else "heldout",
                                "usable": sizes[domain], **prompt_set_stats(mine)}
        if domain in source:
            domain_stats[domain].update(pair_stats([r for r in pairs if r["domain"] == domain]))
    manifest = {
        "task": vtask.name,
        "version": VERSION,
        "seed": config.seed,
        "source_domains": source,
        "heldout_domains": heldout,
        "policy": config.policy,
        "gold": vtask.task.gold_name,
        "params": {
            "source_domains": config.source_domains,
            "source_prompts_per_domain": config.source_prompts,
            "heldout_prompts_per_domain": config.heldout_prompts,
            "source_k": source_k,
            "heldout_k": heldout_k,
            "val_fraction": round(config.val_fraction, 4),
            "control_fraction": round(config.control_fraction, 4),
            "min_gap": vtask.min_gap,
            "min_gap_why": vtask.min_gap_why,
            "min_heldout_usable": config.min_heldout_usable,
            "sampling": asdict(vtask.task.params),
            "policy_precision": sampler.precision.name,
            "batch_rows": config.batch_rows,
            "threads": config.threads,
            "knowledge_siblings": KA_SIBLINGS if vtask.knowledge is not None else 0,
            "quick": config.quick,
        },
        "stats": {
            "source": {**prompt_set_stats(source_prompts), **pair_stats(pairs)},
            "heldout": prompt_set_stats(heldout_prompts),
            "domains": domain_stats,
            "heldout_replaced": replaced,
            "usable_prompts": sizes,
        },
    }

    config.out.mkdir(parents=True, exist_ok=True)
    final = config.out / vtask.name
    tmp = config.out / f".{vtask.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_jsonl(tmp / "source.jsonl", [candidate_row(vtask, p, "split") for p in source_prompts])
    write_jsonl(tmp / "source_pairs.jsonl", pairs)
    write_jsonl(tmp / "heldout.jsonl", [candidate_row(vtask, p, "part") for p in heldout_prompts])
    (tmp / "manifest.json").write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
