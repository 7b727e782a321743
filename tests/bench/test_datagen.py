"""The benchmark builder, end to end on a tiny policy: 2 domains x a few prompts per task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.datagen import gold
from bench.datagen.__main__ import main
from bench.datagen.build import BuildConfig, BuildError, choose_domains, plant_noise
from bench.datagen.generate import PolicySampler
from bench.datagen.tasks import CSG, KA, TASKS
from training.data import load_benchmark

PROMPTS = 4
K = 4
NOISE = (0.2, 0.4)


def build(out: Path, cache: Path, policy: Path, task: str, *extra: str) -> None:
    argv = [
        "build", "--task", task, "--out", str(out), "--cache-dir", str(cache),
        "--policy", str(policy), "--domains", "2", "--prompts-per-domain", str(PROMPTS),
        "--k", str(K), "--label-noise", *map(str, NOISE), "--threads", "0", "--quiet", *extra,
    ]
    assert main(argv) == 0


def build_both(out: Path, cache: Path, policy: Path, seed: int = 0) -> Path:
    build(out, cache, policy, "csg", "--seed", str(seed), "--heldout", "love")
    build(out, cache, policy, "ka", "--seed", str(seed))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Path) -> Path:
    root = tmp_path_factory.mktemp("bench")
    return build_both(root / "data", root / "cache", tiny_policy)


def splits_of(root: Path, task: str) -> dict:
    return json.loads((root / task / "splits.json").read_text())


def domain_dirs(root: Path, task: str) -> list[Path]:
    return sorted(p for p in (root / task).iterdir() if p.is_dir())


def test_layout_and_domains(built: Path) -> None:
    csg = splits_of(built, "csg")
    assert csg["heldout_domains"] == ["love"]
    assert len(csg["source_domains"]) == 1 and "love" not in csg["source_domains"]
    for task in ("csg", "ka"):
        splits = splits_of(built, task)
        assert not set(splits["source_domains"]) & set(splits["heldout_domains"])
        names = {p.name for p in domain_dirs(built, task)}
        assert names == set(splits["source_domains"]) | set(splits["heldout_domains"])
        for folder in domain_dirs(built, task):
            expected = {"pairs.train.jsonl", "pairs.test.jsonl", "samples.train.jsonl",
                        "samples.test.jsonl"} | {f"pairs.train.noise{p:g}.jsonl" for p in NOISE}
            assert {p.name for p in folder.iterdir()} == expected


def reference_of(samples_by_prompt: dict[str, dict], prompt: str) -> str:
    row = samples_by_prompt[prompt]
    return row["responses"][row["sources"].index("reference")]


def gold_of(task: str, text: str, reference: str) -> float:
    return gold.sentiment(text) if task == "csg" else gold.token_f1(text, reference)


@pytest.mark.parametrize("task", ["csg", "ka"])
def test_samples_carry_k_policy_responses_plus_reference_with_true_gold(built: Path, task: str) -> None:
    for folder in domain_dirs(built, task):
        for part in ("train", "test"):
            for row in read_jsonl(folder / f"samples.{part}.jsonl"):
                assert row["sources"] == ["policy"] * K + ["reference"]
                assert len(row["responses"]) == len(row["gold"]) == K + 1
                reference = row["responses"][-1]
                assert row["gold"] == [gold_of(task, r, reference) for r in row["responses"]]


@pytest.mark.parametrize("task", ["csg", "ka"])
def test_every_pair_label_agrees_with_its_gold(built: Path, task: str) -> None:
    near_tie = TASKS[task].near_tie
    n_pairs = 0
    for folder in domain_dirs(built, task):
        samples = {
            row["prompt"]: row
            for part in ("train", "test")
            for row in read_jsonl(folder / f"samples.{part}.jsonl")
        }
        for part in ("train", "test"):
            for pair in read_jsonl(folder / f"pairs.{part}.jsonl"):
                n_pairs += 1
                assert pair["flipped"] is False
                assert pair["gold_chosen"] - pair["gold_rejected"] >= near_tie
                reference = reference_of(samples, pair["prompt"])
                assert pair["gold_chosen"] == gold_of(task, pair["chosen"], reference)
                assert pair["gold_rejected"] == gold_of(task, pair["rejected"], reference)
                assert pair["domain"] == folder.name and pair["task"] == task
    assert n_pairs > 0
    if task == "ka":
        kinds = {p["kind"] for f in domain_dirs(built, task) for p in read_jsonl(f / "pairs.train.jsonl")}
        assert "reference>distractor" in kinds


@pytest.mark.parametrize("task", ["csg", "ka"])
def test_planted_noise_flips_exactly_the_recorded_pairs(built: Path, task: str) -> None:
    for folder in domain_dirs(built, task):
        clean = read_jsonl(folder / "pairs.train.jsonl")
        for p in NOISE:
            noisy = read_jsonl(folder / f"pairs.train.noise{p:g}.jsonl")
            assert [n["id"] for n in noisy] == [c["id"] for c in clean]
            flipped = [n for n in noisy if n["flipped"]]
            assert len(flipped) == round(p * len(clean))
            for before, after in zip(clean, noisy, strict=True):
                if after["flipped"]:
                    assert after["gold_chosen"] < after["gold_rejected"]
                    assert (after["chosen"], after["rejected"]) == (before["rejected"], before["chosen"])
                else:
                    assert after == before


@pytest.mark.parametrize("task", ["csg", "ka"])
def test_splits_are_disjoint_by_prompt_and_domain(built: Path, task: str) -> None:
    seen: dict[str, str] = {}
    for folder in domain_dirs(built, task):
        train = {r["prompt"] for r in read_jsonl(folder / "samples.train.jsonl")}
        test = {r["prompt"] for r in read_jsonl(folder / "samples.test.jsonl")}
        assert train and test and not train & test
        assert len(train) + len(test) == PROMPTS
        for prompt in train | test:
            assert prompt not in seen, f"{prompt!r} in {seen.get(prompt)} and {folder.name}"
            seen[prompt] = folder.name
        for part, prompts in (("train", train), ("test", test)):
            assert {r["prompt"] for r in read_jsonl(folder / f"pairs.{part}.jsonl")} <= prompts


def test_rebuild_with_same_seed_is_byte_identical(built: Path, tmp_path: Path, tiny_policy: Path) -> None:
    # a fresh cache: the policy really samples again
    again = build_both(tmp_path / "data", tmp_path / "cache", tiny_policy)
    assert files_of(again) == files_of(built)


def test_rebuild_from_cache_never_runs_the_policy(
    built: Path, tmp_path: Path, tiny_policy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the generation cache was not used")

    monkeypatch.setattr(PolicySampler, "_generate", refuse)
    again = build_both(tmp_path / "data", built.parent / "cache", tiny_policy)
    assert files_of(again) == files_of(built)


def test_another_seed_picks_other_prompts(built: Path, tmp_path: Path, tiny_policy: Path) -> None:
    out = tmp_path / "data"
    build(out, tmp_path / "cache", tiny_policy, "ka", "--seed", "7")
    prompts = lambda root: {r["prompt"] for f in domain_dirs(root, "ka")  # noqa: E731
                            for r in read_jsonl(f / "samples.train.jsonl")}
    assert prompts(out) != prompts(built)


def test_samples_do_not_depend_on_batch_company(tiny_policy: Path, tmp_path: Path) -> None:
    sampler = PolicySampler(str(tiny_policy), artifacts_dir=tmp_path, cache_dir=tmp_path / "a", seed=3)
    prompts = ["the quick brown fox", "a reward model scores a much longer response here", "bad"]
    together = sampler.sample(prompts, CSG.params, 3)
    alone = PolicySampler(str(tiny_policy), artifacts_dir=tmp_path, cache_dir=tmp_path / "b", seed=3)
    assert alone.sample(prompts[1:2], CSG.params, 3) == together[1:2]
    assert len({tuple(r) for r in together}) == 3


def test_datasheet_tables_come_from_the_build(built: Path) -> None:
    readme = (built / "README.md").read_text()
    for task in ("csg", "ka"):
        splits = splits_of(built, task)
        for domain, stats in splits["stats"].items():
            row = next(line for line in readme.splitlines() if line.startswith(f"| `{domain}` |"))
            assert f"{stats['prompts']['train']}/{stats['prompts']['test']}" in row
            assert f"{stats['pairs']['train']}/{stats['pairs']['test']}" in row
    assert "licen" in readme.lower() and "VADER" in readme


def test_loader_reads_the_built_benchmark(built: Path) -> None:
    bench = load_benchmark("csg", root=built)
    assert bench.heldout_domains == ["love"]
    stats = bench.splits["stats"]["love"]
    assert len(bench.pairs("love", "test")) == stats["pairs"]["test"]
    noisy = bench.pairs("love", noise=0.2)
    assert sum(p.flipped for p in noisy) == round(0.2 * stats["pairs"]["train"])
    samples = bench.samples("love", "train")
    assert len(samples) == stats["prompts"]["train"] and samples[0].domain == "love"
    assert len(samples[0].gold) == len(samples[0].responses)


def test_unknown_heldout_domain_is_refused() -> None:
    config = BuildConfig(heldout=["no-such-domain"], domains=2)
    with pytest.raises(BuildError, match="no-such-domain"):
        choose_domains(KA, ["noun.act", "noun.food"], config)


def test_domains_must_leave_a_source_domain() -> None:
    with pytest.raises(BuildError, match="no source domain"):
        choose_domains(CSG, ["art", "love"], BuildConfig(domains=1))


def test_default_split_has_at_least_sixteen_source_domains_and_four_heldout() -> None:
    for task in (CSG, KA):
        eligible = list(task.candidates())
        source, heldout = choose_domains(task, eligible, BuildConfig())
        assert len(source) >= 16 and len(heldout) >= 4
        assert set(heldout) == set(task.default_heldout)


def test_noise_is_seeded() -> None:
    import random

    pairs = [{"chosen": str(i), "rejected": "x", "gold_chosen": 1.0, "gold_rejected": 0.0,
              "flipped": False} for i in range(10)]
    first = plant_noise(pairs, 0.3, random.Random(1))
    assert first == plant_noise(pairs, 0.3, random.Random(1))
    assert sum(p["flipped"] for p in first) == 3
    assert all(not p["flipped"] for p in pairs)  # the clean list is not modified


def test_gold_functions() -> None:
    assert gold.token_f1("a pancake made with buckwheat flour", "a pancake made with buckwheat flour") == 1.0
    assert gold.token_f1("totally unrelated words", "a pancake made with buckwheat flour") == 0.0
    assert 0.0 < gold.token_f1("a pancake with syrup", "a pancake made with buckwheat flour") < 1.0
    assert gold.sentiment("what a wonderful, happy day") > 0.5 > gold.sentiment("a terrible, awful loss")
