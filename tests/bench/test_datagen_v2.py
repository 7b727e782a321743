"""Data v2 (issue 15), end to end: ``python -m bench.datagen v2 --quick`` on a tiny policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.datagen import gold
from bench.datagen.__main__ import main
from bench.datagen.build import BuildError
from bench.datagen.generate import PolicySampler
from bench.datagen.tasks import CSG, KA, KA_MIN_SIBLINGS, KA_SIBLINGS
from bench.datagen.v2 import QUICK_SIZES, V2_TASKS, V2Config, choose_v2_domains
from tests.bench.test_datagen import files_of, read_jsonl
from training.precision import cpu_has_bf16_units

TASK_NAMES = ("csg", "ka")
MANIFEST_KEYS = {"task", "version", "seed", "source_domains", "heldout_domains", "policy",
                 "gold", "params", "stats"}
SOURCE_KEYS = {"id", "task", "domain", "split", "prompt", "candidates", "gold", "kinds"}
HELDOUT_KEYS = {"id", "task", "domain", "part", "prompt", "candidates", "gold", "kinds"}
PAIR_KEYS = {"id", "task", "domain", "split", "prompt", "chosen", "rejected", "gold_chosen",
             "gold_rejected", "kind"}
FILES = {"manifest.json", "source.jsonl", "source_pairs.jsonl", "heldout.jsonl"}


def build_quick(out: Path, cache: Path, policy: Path, *extra: str) -> Path:
    argv = ["v2", "--quick", "--out", str(out), "--cache-dir", str(cache), "--policy",
            str(policy), "--threads", "0", "--quiet", *extra]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Path) -> Path:
    root = tmp_path_factory.mktemp("datav2")
    return build_quick(root / "data", root / "cache", tiny_policy)


def manifest_of(root: Path, task: str) -> dict:
    return json.loads((root / task / "manifest.json").read_text(encoding="utf-8"))


def gold_of(task: str, text: str, true_gloss: str | None) -> float:
    return gold.sentiment(text) if task == "csg" else gold.token_f1(text, true_gloss)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_quick_build_writes_the_exact_format(built: Path, task: str) -> None:
    assert {p.name for p in (built / task).iterdir()} == FILES
    manifest = manifest_of(built, task)
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["task"] == task and manifest["version"] == 2 and manifest["seed"] == 0
    assert manifest["params"]["quick"] is True
    assert manifest["params"]["policy_precision"] in ("float32", "bfloat16 autocast")
    source = read_jsonl(built / task / "source.jsonl")
    heldout = read_jsonl(built / task / "heldout.jsonl")
    assert len(source) == QUICK_SIZES["source_domains"] * QUICK_SIZES["source_prompts"]
    assert len(heldout) == len(manifest["heldout_domains"]) * QUICK_SIZES["heldout_prompts"]
    for rows, keys, part_key, parts in ((source, SOURCE_KEYS, "split", {"train", "val"}),
                                        (heldout, HELDOUT_KEYS, "part", {"control", "eval"})):
        for row in rows:
            assert set(row) == keys and row["task"] == task
            assert len(row["candidates"]) == len(row["gold"]) == len(row["kinds"]) > 1
        for domain in {row["domain"] for row in rows}:
            assert {r[part_key] for r in rows if r["domain"] == domain} == parts
    for pair in read_jsonl(built / task / "source_pairs.jsonl"):
        assert set(pair) == PAIR_KEYS
    stats = manifest["stats"]["domains"]
    assert set(stats) == set(manifest["source_domains"]) | set(manifest["heldout_domains"])
    for domain, s in stats.items():
        assert s["prompts"] == sum(r["domain"] == domain for r in source + heldout)
        rows = [r for r in source + heldout if r["domain"] == domain]
        gains = [max(r["gold"]) - sum(r["gold"]) / len(r["gold"]) for r in rows]
        assert s["oracle_gain"] == pytest.approx(sum(gains) / len(gains), abs=1e-4)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_gold_is_the_tasks_gold_of_each_candidate(built: Path, task: str) -> None:
    k_source, k_heldout = QUICK_SIZES["source_k"], QUICK_SIZES["heldout_k"]
    for name, k in (("source.jsonl", k_source), ("heldout.jsonl", k_heldout)):
        for row in read_jsonl(built / task / name):
            assert row["kinds"].count("policy") == k
            truth = row["candidates"][row["kinds"].index("gloss")] if task == "ka" else None
            assert row["gold"] == [gold_of(task, c, truth) for c in row["candidates"]]
            if task == "csg":
                assert set(row["kinds"]) == {"policy"}


def test_ka_candidates_hold_the_true_gloss_with_gold_one(built: Path) -> None:
    truth = {e.prompt: e.reference for pool in KA.candidates().values() for e in pool}
    rows = read_jsonl(built / "ka" / "source.jsonl") + read_jsonl(built / "ka" / "heldout.jsonl")
    first_kinds = set()
    for row in rows:
        kinds = row["kinds"]
        assert kinds.count("gloss") == 1 and kinds.count("hypernym") == 1
        assert KA_MIN_SIBLINGS <= kinds.count("sibling") <= KA_SIBLINGS
        g = kinds.index("gloss")
        assert row["candidates"][g] == truth[row["prompt"]] and row["gold"][g] == 1.0
        others = [c for c, k in zip(row["candidates"], kinds, strict=True) if k != "policy"]
        assert len(set(others)) == len(others)  # gloss, siblings and hypernym all differ
        first_kinds.add(kinds[0])
    assert len(first_kinds) > 1  # the order is shuffled, the true gloss is not always first


@pytest.mark.parametrize("task", TASK_NAMES)
def test_prompts_are_unique_and_heldout_domains_absent_from_source(built: Path, task: str) -> None:
    manifest = manifest_of(built, task)
    source = read_jsonl(built / task / "source.jsonl")
    heldout = read_jsonl(built / task / "heldout.jsonl")
    assert not set(manifest["source_domains"]) & set(manifest["heldout_domains"])
    assert {r["domain"] for r in source} == set(manifest["source_domains"])
    assert {r["domain"] for r in heldout} == set(manifest["heldout_domains"])
    prompts = [r["prompt"] for r in source + heldout]
    assert len(set(prompts)) == len(prompts)
    ids = [r["id"] for r in source + heldout]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_source_pairs_are_every_pair_past_the_gap_better_one_chosen(built: Path, task: str) -> None:
    min_gap = V2_TASKS[task].min_gap
    assert manifest_of(built, task)["params"]["min_gap"] == min_gap
    expected = set()
    split_of = {}
    for row in read_jsonl(built / task / "source.jsonl"):
        split_of[row["prompt"]] = row["split"]
        items = list(zip(row["candidates"], row["gold"], row["kinds"], strict=True))
        for i, (a, ga, ka) in enumerate(items):
            for b, gb, kb in items[i + 1 :]:
                if a != b and abs(ga - gb) >= min_gap:
                    (c, gc, kc), (r, gr, kr) = sorted([(a, ga, ka), (b, gb, kb)], key=lambda t: -t[1])
                    expected.add((row["prompt"], c, r, gc, gr, f"{kc}>{kr}"))
    pairs = read_jsonl(built / task / "source_pairs.jsonl")
    got = {(p["prompt"], p["chosen"], p["rejected"], p["gold_chosen"], p["gold_rejected"], p["kind"])
           for p in pairs}
    assert got == expected and len(got) == len(pairs)
    if task == "ka":  # the true gloss beats every candidate that misses a word of it
        assert pairs
    for pair in pairs:
        assert pair["gold_chosen"] - pair["gold_rejected"] >= min_gap
        assert pair["split"] == split_of[pair["prompt"]]


def test_a_small_default_heldout_domain_is_replaced_and_said_so(built: Path) -> None:
    manifest = manifest_of(built, "csg")
    usable = manifest["stats"]["usable_prompts"]
    minimum = manifest["params"]["min_heldout_usable"]
    replaced = manifest["stats"]["heldout_replaced"]
    for domain in manifest["heldout_domains"]:
        assert usable[domain] >= minimum
    for change in replaced:
        assert change["usable"] < minimum and change["domain"] not in manifest["heldout_domains"]
        assert change["replaced_by"] in manifest["heldout_domains"]
        assert f"`{change['domain']}`" in (built / "README.md").read_text(encoding="utf-8")


def test_rebuild_with_same_seed_is_byte_identical(built: Path, tmp_path: Path, tiny_policy: Path) -> None:
    # a fresh cache: the policy really samples again
    again = build_quick(tmp_path / "data", tmp_path / "cache", tiny_policy)
    assert files_of(again) == files_of(built)


def test_heldout_option_is_honoured(tmp_path: Path, tiny_policy: Path) -> None:
    out = build_quick(tmp_path / "data", tmp_path / "cache", tiny_policy,
                      "--task", "csg", "--heldout", "art,love", "--seed", "3")
    manifest = manifest_of(out, "csg")
    assert manifest["heldout_domains"] == ["art", "love"] and manifest["seed"] == 3
    assert "art" not in manifest["source_domains"]  # art leads the default source order
    assert manifest["stats"]["heldout_replaced"] == []
    assert {r["domain"] for r in read_jsonl(out / "csg" / "heldout.jsonl")} == {"art", "love"}
    assert not (out / "ka").exists()


def test_unknown_heldout_domain_is_refused() -> None:
    config = V2Config(heldout=["no-such-domain"])
    with pytest.raises(BuildError, match="no-such-domain"):
        choose_v2_domains(V2_TASKS["csg"], {"art": 100, "love": 100}, config)


def test_datasheet_rows_come_from_the_manifests(built: Path) -> None:
    readme = (built / "README.md").read_text(encoding="utf-8")
    for task in TASK_NAMES:
        manifest = manifest_of(built, task)
        for domain, s in manifest["stats"]["domains"].items():
            row = next(line for line in readme.splitlines() if line.startswith(f"| `{domain}` |"))
            assert f"| {s['usable']} |" in row and f"| {s['candidates']} |" in row
    assert "licen" in readme.lower() and "quick build" in readme


@pytest.mark.skipif(not cpu_has_bf16_units(), reason="this CPU has no bf16 units")
def test_bf16_generations_are_cached_apart_from_fp32(tiny_policy: Path, tmp_path: Path) -> None:
    fp32 = PolicySampler(str(tiny_policy), artifacts_dir=tmp_path, cache_dir=tmp_path, seed=0)
    bf16 = PolicySampler(str(tiny_policy), artifacts_dir=tmp_path, cache_dir=tmp_path, seed=0,
                         precision="auto")
    assert bf16.precision.name == "bfloat16 autocast" and fp32.precision.name == "float32"
    assert bf16.key("a prompt", CSG.params, 2) != fp32.key("a prompt", CSG.params, 2)
