"""``python -m bench.evidence --quick`` end to end on synthetic data v2 and the tiny encoder:
every registered row with intervals and a decision, the controls as targets, the figures."""

from __future__ import annotations

import json

import pytest

from bench.evidence.cli import main, options_from, parse
from bench.evidence.methods import METHODS
from tests.bench.evidence.fixture import write_task


def test_quick_run_writes_rows_targets_and_figures(tmp_path, tiny_encoder_rm, tiny_policy):
    for task in ("csg", "ka"):
        write_task(tmp_path / "data", task, seed={"csg": 0, "ka": 1}[task])
    output = tmp_path / "out" / "evidence.json"
    args = ["--quick", "--data-root", str(tmp_path / "data"), "--model", str(tiny_encoder_rm),
            "--policy", str(tiny_policy), "--cache-dir", str(tmp_path / "cache"), "--output", str(output), "--threads", "1",
            "--seeds", "2", "--reps", "100", "--oodpl"]
    assert main([*args, "--jobs", "2"]) == 0  # one spawned process per task
    report = json.loads(output.read_text())
    assert [t["task"] for t in report["tasks"]] == ["csg", "ka"]
    for task in report["tasks"]:
        rows = {r["method"]: r for r in task["rows"]}
        assert set(rows) == {name for name, method in METHODS.items() if method.default} | {
            "oodpl_meta", "oodpl_meta_only", "oodpl_meta@4", "oodpl_meta@8", "bt@4", "bt@8"}
        assert rows["bt"]["absolute"]["M1"]["low"] <= rows["bt"]["absolute"]["M1"]["high"]
        for name, row in rows.items():
            if name == "bt":
                continue
            assert row["decision"]["verdict"] in ("shown", "shown worse", "refuted at this scale", "inconclusive")
            assert set(row["contrast"]["M1"]) == {"pooled", "h0", "h1", "h2", "h3"}
        assert "M3" in rows["metarm"]["contrast"] and "var_dr" in rows["metarm"]["contrast"]
        assert task["features"]["items"] > 0 and task["settings"]["pooling"] in ("cls", "mean")
        assert set(task["settings"]["pooling_heldout"]) == {"cls", "mean"}
        assert set(task["not_run"]) == {"fine-tune track (bt, positive_control)",
                                        "OOD-PL on the fine-tune track (ft_oodpl_bt, ft_oodpl_meta, ft_oodpl_meta_only)",
                                        "dpo (implicit reward, OOD-PL's DPO baseline)"}
        selection = task["settings"]["metarm_meta_lr_selection"]  # η picked on the source side
        assert set(selection["chosen"]) == {"first_order", "second_order", "alternating"}
        assert selection["chosen"]["first_order"] in selection["grid"] and selection["pseudo_heldout_domains"]
        assert rows["metarm"]["info"][0]["meta_lr"] == selection["chosen"]["first_order"]
        assert task["settings"]["run"]["metarm_meta_lr_by_update"] == selection["chosen"]
        assert {"source_val_accuracy@round0", "source_val_accuracy@round3"} <= set(rows["metarm"]["scalars"])
        assert "var_dr@round1" in rows["metarm"]["absolute"]
        assert rows["oodpl_meta@4"]["baseline"] == "bt@4"
        picked = task["settings"]["oodpl_bt_weight_selection"]  # the BT weight, picked on source val
        assert picked["chosen"] in picked["grid"] and picked["inner_lr"] == 1e-3
        assert {i["bt_weight"] for name in ("oodpl_meta", "oodpl_meta@4") for i in rows[name]["info"]} \
            == {picked["chosen"]}
        assert len(task["strength_deciles"]) == 10
    ka = {r["method"]: r for r in report["tasks"][1]["rows"]}
    assert {"M2:policy-policy", "M2:gloss-gloss", "M2:gloss-policy"} <= set(ka["bt"]["absolute"])
    names = [t["name"] for t in report["targets"]]
    assert sum("control" in n and "oodpl" not in n for n in names) == 8  # 2 controls × 2 metrics × 2 tasks
    assert sum("vanilla rounds" in n for n in names) == 2 * 4  # metarm, metarm_second_order × 2 targets × 2 tasks
    assert sum("oodpl_meta closes" in n for n in names) == 2
    assert all({"name", "measured", "threshold", "met"} <= set(t) for t in report["targets"])
    for suffix in ("_intervals.png", "_strength.png"):
        assert (output.with_name("evidence" + suffix)).stat().st_size > 0
    assert "positive_control" in output.with_suffix(".md").read_text()
    # a second run reads the cached features; the fine-tune track trains with RMTrainer
    assert main([*args, "--task", "ka", "--methods", "bt", "--finetune", "--dpo", "--no-figures"]) == 0
    again = json.loads(output.read_text())
    assert again["tasks"][0]["features"].get("cached") is True
    rows = {r["method"]: r for r in again["tasks"][0]["rows"]}
    assert rows["ft_bt"]["seeds"] == 3 and rows["ft_positive_control"]["baseline"] == "ft_bt"
    assert "M1" in rows["ft_positive_control"]["contrast"]
    assert not again["tasks"][0]["not_run"]  # --oodpl, --finetune and --dpo all ran
    # the full RM meta-trained by MetaTrainer.train, against fine-tuned BT on the same seeds
    picked = again["tasks"][0]["settings"]["oodpl_bt_weight_selection"]["chosen"]
    baselines = {"ft_oodpl_bt": "ft_bt", "ft_oodpl_meta": "ft_oodpl_bt", "ft_oodpl_meta_only": "ft_oodpl_bt"}
    for name, weight in (("ft_oodpl_bt", picked), ("ft_oodpl_meta", picked), ("ft_oodpl_meta_only", 0.0)):
        assert rows[name]["seeds"] == 3 and rows[name]["baseline"] == baselines[name]
        assert "M1" in rows[name]["contrast"]
        assert {i["bt_weight"] for i in rows[name]["info"]} == {weight}
        assert all(i["outer_steps"] >= 1 and i["inner_lr"] == 1e-3 for i in rows[name]["info"])
    # DPO's implicit reward, 1 seed, against BT's seed 0
    assert rows["dpo"]["seeds"] == 1 and rows["dpo"]["baseline"] == "bt" and "M1" in rows["dpo"]["contrast"]
    assert rows["dpo"]["decision"]["verdict"] in ("shown", "shown worse", "refuted at this scale", "inconclusive")
    finetune_targets = [t for t in again["targets"] if "fine-tune track" in t["name"] and "oodpl" not in t["name"]]
    assert len(finetune_targets) == 2 and all("control" in t["name"] for t in finetune_targets)
    assert sum("ft_oodpl_meta closes" in t["name"] for t in again["targets"]) == 1
    for target in finetune_targets:
        assert target["met"] == (target["interval"]["low"] > 0)


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        main(["--methods", "bt,nope"])


def test_noise_kind_reaches_the_run_options():
    options = options_from(parse(["--noise", "0.2", "--noise-kind", "instance"]))
    assert (options.noise, options.noise_kind) == (0.2, "instance")
    assert options_from(parse([])).noise_kind == "uniform"
    with pytest.raises(SystemExit):
        parse(["--noise-kind", "gaussian"])
