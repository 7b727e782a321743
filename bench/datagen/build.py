"""Build one benchmark task: choose domains and prompts, sample, score, pair, split, write.

Everything random draws from ``random.Random`` seeded by (seed, task, domain, purpose) and
from the per-row generators of :mod:`bench.datagen.generate`, so the same seed rebuilds the
same bytes. The output of a task is written beside the old one and swapped in at the end.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.datagen.generate import PolicySampler
from bench.datagen.tasks import Entry, Task
from training.data import default_bench_root, pairs_filename, samples_filename

MIN_PROMPTS = 2  # a domain needs at least one train and one test prompt


class BuildError(ValueError):
    """The requested build cannot be made (unknown domain, too few prompts, ...)."""


@dataclass
class BuildConfig:
    out: Path = field(default_factory=default_bench_root)
    seed: int = 0
    policy: str = "smollm2-135m"
    domains: int | None = None  # how many domains; None = the task's default list
    prompts_per_domain: int = 16
    k: int = 4
    heldout: list[str] | None = None
    label_noise: Sequence[float] = (0.2, 0.4)
    test_fraction: float = 0.25
    artifacts_dir: Path = Path("artifacts")
    cache_dir: Path | None = None  # default: <artifacts_dir>/cache/generations
    batch_rows: int = 64
    quiet: bool = False

    def generation_cache(self) -> Path:
        return self.cache_dir or self.artifacts_dir / "cache" / "generations"


@dataclass
class Prompt:
    id: str
    domain: str
    entry: Entry
    part: str
    responses: list[str] = field(default_factory=list)
    gold: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def rng_for(seed: int, task: Task, *purpose: str) -> random.Random:
    return random.Random(":".join([str(seed), task.name, *purpose]))


# ----------------------------------------------------------------------------- domains
def choose_domains(
    task: Task, eligible: Sequence[str], config: BuildConfig
) -> tuple[list[str], list[str]]:
    """(source, held-out) domains. Held-out domains are always part of the selection."""
    ordered = [d for d in task.default_domains if d in eligible]
    ordered += sorted(d for d in eligible if d not in ordered)
    if config.heldout is not None:
        unknown = [d for d in config.heldout if d not in eligible]
        if unknown:
            raise BuildError(
                f"{task.name}: held-out domain(s) {unknown} unknown or too small; "
                f"eligible: {', '.join(ordered)}"
            )
        heldout = list(dict.fromkeys(config.heldout))
    else:
        count = len(task.default_heldout) if config.domains is None else max(1, config.domains // 4)
        heldout = [d for d in task.default_heldout if d in eligible][:count]
    if not heldout:
        raise BuildError(f"{task.name}: no held-out domain")
    if config.domains is None:
        total = len([d for d in task.default_domains if d in eligible])
    else:
        total = config.domains
    others = [d for d in ordered if d not in heldout]
    wanted = total - len(heldout)
    if wanted < 1:
        raise BuildError(
            f"{task.name}: --domains {total} leaves no source domain beside held-out {heldout}"
        )
    if wanted > len(others):
        raise BuildError(f"{task.name}: only {len(others) + len(heldout)} domains are eligible")
    return others[:wanted], heldout


def unique_prompt_entries(
    candidates: dict[str, list[Entry]], domains: Sequence[str]
) -> dict[str, list[Entry]]:
    """Drop entries whose prompt text occurs twice anywhere: splits stay disjoint by prompt."""
    seen = Counter(e.prompt for d in domains for e in candidates[d])
    return {d: [e for e in candidates[d] if seen[e.prompt] == 1] for d in domains}


def select_prompts(task: Task, config: BuildConfig, domains: Sequence[str]) -> list[Prompt]:
    pools = unique_prompt_entries(task.candidates(), domains)
    prompts: list[Prompt] = []
    for domain in domains:
        pool = pools[domain]
        n = min(config.prompts_per_domain, len(pool))
        if n < MIN_PROMPTS:
            raise BuildError(f"{task.name}/{domain}: only {len(pool)} usable prompts")
        picked = rng_for(config.seed, task, domain, "prompts").sample(pool, n)
        n_test = min(n - 1, max(1, round(config.test_fraction * n)))
        for index, entry in enumerate(picked):
            part = "test" if index < n_test else "train"
            prompts.append(Prompt(f"{task.name}/{domain}/{index:04d}", domain, entry, part))
    return prompts


# ----------------------------------------------------------------------------- pairs
def gold_ranked_pairs(prompt: Prompt, near_tie: float) -> list[dict[str, Any]]:
    """Every two responses whose gold differs by at least ``near_tie``, better one chosen."""
    pairs = []
    n = len(prompt.responses)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = prompt.responses[i], prompt.responses[j]
            ga, gb = prompt.gold[i], prompt.gold[j]
            if a == b or abs(ga - gb) < near_tie:
                continue
            (c, gc, sc), (r, gr, sr) = sorted(
                [(a, ga, prompt.sources[i]), (b, gb, prompt.sources[j])], key=lambda t: -t[1]
            )
            pairs.append({"chosen": c, "rejected": r, "gold_chosen": gc, "gold_rejected": gr,
                          "kind": f"{sc}>{sr}"})
    return pairs


def make_pairs(task: Task, config: BuildConfig, prompt: Prompt, pool: list[Entry]) -> list[dict]:
    rows = []
    extra = task.extra_pairs(
        prompt.entry, pool, rng_for(config.seed, task, prompt.id, "extra"), task.near_tie
    )
    for text, score, source in extra:
        rows.append({"chosen": prompt.entry.reference, "rejected": text,
                     "gold_chosen": task.gold(prompt.entry.reference, prompt.entry),
                     "gold_rejected": score, "kind": f"reference>{source}"})
    rows += gold_ranked_pairs(prompt, task.near_tie)
    return [
        {"id": f"{prompt.id}/{n}", "prompt": prompt.entry.prompt, "chosen": row["chosen"],
         "rejected": row["rejected"], "domain": prompt.domain, "task": task.name,
         "gold_chosen": row["gold_chosen"], "gold_rejected": row["gold_rejected"],
         "flipped": False, "kind": row["kind"]}
        for n, row in enumerate(rows)
    ]


def plant_noise(pairs: list[dict], fraction: float, rng: random.Random) -> list[dict]:
    """Swap chosen/rejected in exactly round(fraction * n) pairs, recorded as ``flipped``."""
    flip = set(rng.sample(range(len(pairs)), round(fraction * len(pairs))))
    noisy = []
    for index, pair in enumerate(pairs):
        pair = dict(pair)
        if index in flip:
            pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
            pair["gold_chosen"], pair["gold_rejected"] = pair["gold_rejected"], pair["gold_chosen"]
            pair["flipped"] = True
        noisy.append(pair)
    return noisy


# ----------------------------------------------------------------------------- writing
def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def describe(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.pstdev(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def build_task(task: Task, config: BuildConfig) -> Path:
    """Build ``{out}/{task}/`` and return it."""
    candidates = task.candidates()
    eligible = [d for d, pool in candidates.items() if len(pool) >= MIN_PROMPTS]
    source, heldout = choose_domains(task, eligible, config)
    domains = source + heldout
    prompts = select_prompts(task, config, domains)

    sampler = PolicySampler(
        config.policy,
        artifacts_dir=config.artifacts_dir,
        cache_dir=config.generation_cache(),
        seed=config.seed,
        batch_rows=config.batch_rows,
    )
    with tqdm(total=len(prompts), desc=f"{task.name}: sampling", unit="prompt",
              disable=config.quiet) as bar:
        generated = sampler.sample([p.entry.prompt for p in prompts], task.params, config.k,
                                   progress=bar.update)
    for prompt, samples in zip(prompts, generated, strict=True):
        prompt.responses = [*samples, prompt.entry.reference]
        prompt.sources = ["policy"] * len(samples) + ["reference"]
        prompt.gold = [task.gold(r, prompt.entry) for r in prompt.responses]

    final = config.out / task.name
    tmp = config.out / f".{task.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pools = unique_prompt_entries(candidates, domains)
    stats: dict[str, Any] = {}
    for domain in domains:
        folder = tmp / domain
        folder.mkdir(parents=True)
        mine = [p for p in prompts if p.domain == domain]
        domain_stats: dict[str, Any] = {"prompts": {}, "pairs": {}, "pair_kinds": Counter()}
        for part in ("train", "test"):
            chosen = [p for p in mine if p.part == part]
            samples = [
                {"id": p.id, "prompt": p.entry.prompt, "responses": p.responses, "gold": p.gold,
                 "sources": p.sources, "domain": domain, "task": task.name,
                 "origin": p.entry.source}
                for p in chosen
            ]
            pairs = [row for p in chosen for row in make_pairs(task, config, p, pools[domain])]
            write_jsonl(folder / samples_filename(part), samples)
            write_jsonl(folder / pairs_filename(part), pairs)
            domain_stats["prompts"][part] = len(chosen)
            domain_stats["pairs"][part] = len(pairs)
            domain_stats["pair_kinds"].update(row["kind"] for row in pairs)
            if part == "train":
                for noise in config.label_noise:
                    rng = rng_for(config.seed, task, domain, f"noise{noise:g}")
                    write_jsonl(folder / pairs_filename(part, noise), plant_noise(pairs, noise, rng))
        policy_gold = [g for p in mine for g, s in zip(p.gold, p.sources, strict=True) if s == "policy"]
        reference_gold = [p.gold[-1] for p in mine]
        domain_stats["pair_kinds"] = dict(sorted(domain_stats["pair_kinds"].items()))
        domain_stats["gold_policy"] = describe(policy_gold)
        domain_stats["gold_reference"] = describe(reference_gold)
        domain_stats["available_prompts"] = len(pools[domain])
        stats[domain] = domain_stats

    splits = {
        "task": task.name,
        "title": task.title,
        "seed": config.seed,
        "source_domains": source,
        "heldout_domains": heldout,
        "policy": config.policy,
        "k": config.k,
        "prompts_per_domain": config.prompts_per_domain,
        "test_fraction": config.test_fraction,
        "near_tie": task.near_tie,
        "label_noise": [float(p) for p in config.label_noise],
        "sampling": asdict(task.params),
        "gold": task.gold_name,
        "stats": stats,
    }
    (tmp / "splits.json").write_text(json.dumps(splits, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
