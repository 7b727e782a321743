"""The data-v2 reader: the format, its errors, derived pairs (bench/evidence/data.py)."""

from __future__ import annotations

import json

import pytest

from bench.evidence.data import EvidenceDataError, candidate_pairs, load_task, plant_noise
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
