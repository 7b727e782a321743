"""training.data: the JSONL / TRL loaders, their error messages, and the benchmark reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data import (
    DataError,
    load_benchmark,
    load_pairs,
    load_samples,
    pairs_filename,
    samples_filename,
)


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_native_pairs_keep_fields_and_extras(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [
        {"id": "a/1", "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "domain": "d",
         "task": "csg", "gold_chosen": 0.5, "gold_rejected": -0.2, "flipped": True, "kind": "x"},
        "",
        {"prompt": "Q", "chosen": "A", "rejected": "B"},
    ])
    first, second = load_pairs(path)
    assert (first.prompt, first.chosen, first.rejected, first.domain, first.id) == (
        "Hi", "Hello!", "Go away.", "d", "a/1")
    assert first.flipped and first.meta["gold_chosen"] == 0.5 and first.meta["task"] == "csg"
    assert first.meta["kind"] == "x"
    assert second.domain is None and second.id is None and not second.flipped


def test_trl_conversational_pairs_with_explicit_prompt(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [{
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }])
    (pair,) = load_pairs(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("What is 2+2?", "4", "5")
    question = [{"role": "user", "content": "What is 2+2?"}]
    assert pair.messages == (question, [{"role": "assistant", "content": "4"}],
                             [{"role": "assistant", "content": "5"}])
    # the RM scores the conversation, rendered by its own template, never a flattened text
    assert pair.chosen_item() == {"messages": [*question, {"role": "assistant", "content": "4"}]}
    assert pair.swapped().chosen_item() == {"messages": [*question, {"role": "assistant", "content": "5"}]}


def test_trl_pairs_with_implicit_prompt_split_at_the_shared_beginning(tmp_path: Path) -> None:
    user = {"role": "user", "content": "Name a colour."}
    path = write_lines(tmp_path / "p.jsonl", [{
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "Seven."}],
    }])
    (pair,) = load_pairs(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Name a colour.", "Blue.", "Seven.")
    assert pair.rejected_item() == {"messages": [user, {"role": "assistant", "content": "Seven."}]}


def test_a_margin_column_is_read_as_trl_does(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [
        {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": 1.5},
        {"prompt": "Q", "chosen": "A", "rejected": "B"},
    ])
    first, second = load_pairs(path)
    assert first.margin == 1.5 and "margin" not in first.meta and second.margin is None


def test_json_list_files_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "p", "chosen": "c", "rejected": "r"}]))
    assert load_pairs(path)[0].chosen == "c"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "p", "chosen": "c"', "invalid JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"prompt": "p", "chosen": "c"}', "missing field 'rejected'"),
        ('{"prompt": 3, "chosen": "c", "rejected": "r"}', "field 'prompt' must be a string"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "gold_chosen": "high"}', "'gold_chosen' must be a finite number"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "flipped": "yes"}', "'flipped' must be true or false"),
        ('{"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "x"}]}', r"'chosen\[0\]' must be an object"),
        ('{"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}', "share no beginning"),
    ],
)
def test_pair_errors_name_file_line_and_problem(tmp_path: Path, bad_line: str, message: str) -> None:
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = write_lines(tmp_path / "pairs.jsonl", [good, good, bad_line])
    with pytest.raises(DataError, match=message) as caught:
        load_pairs(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert caught.value.line == 3 and caught.value.path == str(path)


def test_missing_and_empty_files_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_pairs(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=f"{empty}: no preference pairs"):
        load_pairs(empty)


def test_samples_roundtrip_and_errors(tmp_path: Path) -> None:
    row = {"id": "s1", "prompt": "p", "responses": ["a", "b"], "gold": [0.1, 1], "domain": "d",
           "task": "ka", "sources": ["policy", "reference"]}
    (loaded,) = load_samples(write_lines(tmp_path / "s.jsonl", [row]))
    assert loaded.responses == ["a", "b"] and loaded.gold == [0.1, 1.0]
    assert loaded.meta == {"task": "ka", "sources": ["policy", "reference"]}

    path = write_lines(tmp_path / "bad.jsonl", [row, {**row, "gold": [0.1]}])
    with pytest.raises(DataError, match=rf"{path}:2: .*one number per response \(2\)"):
        load_samples(path)
    path = write_lines(tmp_path / "bad2.jsonl", [{**row, "responses": ["a", 3], "gold": None}])
    with pytest.raises(DataError, match=r":1: 'responses\[1\]' must be a string"):
        load_samples(path)


def test_file_names_are_shared_with_the_builder() -> None:
    assert pairs_filename("train", 0.2) == "pairs.train.noise0.2.jsonl"
    assert pairs_filename("test") == "pairs.test.jsonl"
    assert samples_filename("test") == "samples.test.jsonl"
    with pytest.raises(ValueError):
        pairs_filename("test", 0.2)
    with pytest.raises(ValueError):
        pairs_filename("valid")


@pytest.fixture
def tiny_benchmark(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "ka" / "noun.a").mkdir(parents=True)
    (root / "ka" / "noun.b").mkdir()
    (root / "ka" / "splits.json").write_text(json.dumps(
        {"seed": 0, "source_domains": ["noun.a"], "heldout_domains": ["noun.b"],
         "label_noise": [0.2]}))
    for domain in ("noun.a", "noun.b"):
        folder = root / "ka" / domain
        for part in ("train", "test"):
            write_lines(folder / f"pairs.{part}.jsonl", [
                {"id": f"{domain}/{part}", "prompt": f"What does {domain} mean?", "chosen": "gloss",
                 "rejected": "other", "domain": domain, "gold_chosen": 1.0, "gold_rejected": 0.2}])
            write_lines(folder / f"samples.{part}.jsonl", [
                {"id": f"{domain}/{part}", "prompt": "q", "responses": ["x", "gloss"],
                 "gold": [0.0, 1.0], "domain": domain, "task": "ka"}])
        write_lines(folder / "pairs.train.noise0.2.jsonl", [
            {"prompt": "q", "chosen": "other", "rejected": "gloss", "flipped": True}])
    return root


def test_load_benchmark(tiny_benchmark: Path) -> None:
    bench = load_benchmark("ka", root=tiny_benchmark)
    assert bench.source_domains == ["noun.a"] and bench.heldout_domains == ["noun.b"]
    assert bench.domains == ["noun.a", "noun.b"] and bench.label_noise == [0.2]
    assert bench.pairs("noun.b", "test")[0].id == "noun.b/test"
    assert bench.pairs("noun.a", noise=0.2)[0].flipped
    assert bench.samples("noun.a")[0].gold == [0.0, 1.0]
    with pytest.raises(DataError, match="unknown domain 'noun.c'"):
        bench.pairs("noun.c")
    with pytest.raises(DataError, match="noise0.4.jsonl: file not found"):
        bench.pairs("noun.a", noise=0.4)


def test_load_benchmark_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="make data"):
        load_benchmark("csg", root=tmp_path)
    (tmp_path / "csg").mkdir()
    (tmp_path / "csg" / "splits.json").write_text('{"source_domains": []}')
    with pytest.raises(DataError, match="heldout_domains"):
        load_benchmark("csg", root=tmp_path)


def test_empty_benchmark_part_is_an_empty_list(tiny_benchmark: Path) -> None:
    (tiny_benchmark / "ka" / "noun.a" / "pairs.test.jsonl").write_text("")
    assert load_benchmark("ka", root=tiny_benchmark).pairs("noun.a", "test") == []
