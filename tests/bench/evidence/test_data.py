"""The data-v2 reader: the format, its errors, derived pairs (bench/evidence/data.py)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from bench.evidence.data import (
    EvidenceDataError,
    SourcePair,
    candidate_pairs,
    instance_flip_probabilities,
    load_task,
    plant_noise,
)
from tests.bench.evidence.fixture import write_task


def test_reads_the_v2_format(tmp_path):
    write_task(tmp_path, "ka")
    data = load_task("ka", tmp_path)
    assert data.heldout_domains == ["h0", "h1", "h2", "h3"] and data.pair_gap == 0.3
    assert {p.group for p in data.heldout} == {"control", "eval"}
    assert len(data.heldout_part("control")) == 12 and len(data.heldout_part("eval")) == 24
    assert data.source_split("val") and all(p.gold_chosen - p.gold_rejected >= 0.3 for p in data.source_pairs)
    items = data.items()
    assert len(items) == len(set(items)) and (data.heldout[0].prompt, data.heldout[0].candidates[0]) in items
    small = data.subsample(1)
    assert len(small.heldout_part("eval")) == 4 and len(small.source_split("train")) == 4
    assert {p.prompt for p in small.source_pairs} <= {p.prompt for p in small.source}


def test_errors_name_file_and_line(tmp_path):
    directory = write_task(tmp_path, "csg")
    lines = (directory / "heldout.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["part"] = "test"
    lines[1] = json.dumps(row)
    (directory / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(EvidenceDataError, match=r"heldout.jsonl:2: 'part' must be one of"):
        load_task("csg", tmp_path)
    with pytest.raises(EvidenceDataError, match="manifest.json: missing"):
        load_task("ka", tmp_path)


def test_candidate_pairs_and_noise(tmp_path):
    write_task(tmp_path, "csg")
    data = load_task("csg", tmp_path)
    prompt = data.heldout_part("control")[0]
    pairs = candidate_pairs([prompt], 0.3)
    n = len(prompt.candidates)
    expected = sum(1 for i in range(n) for j in range(i + 1, n)
                   if abs(prompt.gold[i] - prompt.gold[j]) >= 0.3 and prompt.candidates[i] != prompt.candidates[j])
    assert len(pairs) == expected and all(p.gold_chosen > p.gold_rejected for p in pairs)
    flips = plant_noise(data.source_pairs, 0.25, seed=3)
    assert sum(flips) == round(0.25 * len(flips)) and flips == plant_noise(data.source_pairs, 0.25, seed=3)
    assert not any(plant_noise(data.source_pairs, 0.0, seed=3))


def pairs_with_gaps(n: int, seed: int = 0) -> list[SourcePair]:
    """``n`` pairs whose |Δgold| is spread over [0.3, 2] (as CSG's VADER pairs)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        low = rng.uniform(-1.0, 0.0)
        out.append(SourcePair(str(i), "d", "train", f"p{i}", "c", "r", low + rng.uniform(0.3, 2.0), low))
    return out


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_instance_noise_hits_the_rate_and_flips_small_gaps_more(rate):
    pairs = pairs_with_gaps(4000)
    probabilities, tau = instance_flip_probabilities(pairs, rate)
    assert np.mean(probabilities) == pytest.approx(rate, abs=1e-9)  # the expected rate, by bisection
    gap = pairs[0].gold_chosen - pairs[0].gold_rejected
    assert probabilities[0] == pytest.approx(1 / (1 + math.exp(gap / tau)))  # σ(−|Δgold|/τ)
    flips = np.array(plant_noise(pairs, rate, seed=5, kind="instance"))
    assert abs(flips.mean() - rate) < 3 * math.sqrt(rate * (1 - rate) / len(pairs))
    gaps = np.array([p.gold_chosen - p.gold_rejected for p in pairs])
    small, large = gaps < np.quantile(gaps, 0.25), gaps > np.quantile(gaps, 0.75)
    assert flips[small].mean() > flips[large].mean() + 0.05
    assert flips.tolist() == plant_noise(pairs, rate, seed=5, kind="instance")  # seeded
    assert flips.tolist() != plant_noise(pairs, rate, seed=6, kind="instance")
    # uniform noise ignores the gap: its flips' mean gap is the pairs' mean gap (± sampling)
    uniform = np.array(plant_noise(pairs, rate, seed=5))
    assert uniform.sum() == round(rate * len(pairs))
    assert abs(gaps[uniform].mean() - gaps.mean()) < abs(gaps[flips].mean() - gaps.mean())


def test_instance_noise_refuses_rates_it_cannot_reach():
    pairs = pairs_with_gaps(10)
    with pytest.raises(ValueError, match="rate < 0.5"):
        plant_noise(pairs, 0.5, seed=0, kind="instance")
    with pytest.raises(ValueError, match="noise kind"):
        plant_noise(pairs, 0.2, seed=0, kind="gaussian")
    assert not any(plant_noise(pairs, 0.0, seed=0, kind="instance"))
