"""Merging benchmark runs made on separate cores into one report (bench.noise / bench.ood --merge)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from bench import noise
from bench.ood import cli as ood
from bench.ood.merge import merge
from bench.ood.settings import Settings

NOISE_CONFIG = {"seeds": 3, "num_models": 3, "epochs": 2.0, "max_train_pairs": 192, "quick": False}


def noise_run(path, *, tasks, noise_levels, rows, **config):
    payload = {"config": {**NOISE_CONFIG, "tasks": tasks, "noise": noise_levels, "threads": 1,
                          "output": str(path), "work_dir": "w", **config},
               "rows": rows, "strength": [], "targets": [], "total_wall_seconds": 10.0}
    path.write_text(json.dumps(payload))
    return path


def noise_row(task, level, method, accuracy):
    return {"task": task, "noise": level, "method": method, "seeds": 3, "accuracy_mean": accuracy,
            "accuracy_std": 0.0, "ece_mean": 0.1, "wall_seconds_mean": 1.0, "runs": []}


def test_noise_merge_recomputes_targets_over_the_union(tmp_path):
    clean = noise_run(tmp_path / "a.json", tasks="ka", noise_levels="0",
                      rows=[noise_row("ka", 0.0, "vanilla", 0.80)])
    noisy = noise_run(tmp_path / "b.json", tasks="ka", noise_levels="0.4",
                      rows=[noise_row("ka", 0.4, "vanilla", 0.60), noise_row("ka", 0.4, "flip", 0.78)])
    report = noise.main(["--merge", str(clean), str(noisy), "--output", str(tmp_path / "m.json")])
    assert [(r["noise"], r["method"]) for r in report["rows"]] == [
        (0.0, "vanilla"), (0.4, "vanilla"), (0.4, "flip")]
    keep, gain = report["targets"]
    assert keep["measured"] == pytest.approx(0.28 / 0.30) and keep["met"]
    assert gain["measured"] == pytest.approx(0.18) and gain["met"]
    assert json.loads((tmp_path / "m.json").read_text())["targets"] == report["targets"]


def test_noise_merge_refuses_other_configurations_and_repeated_rows(tmp_path):
    a = noise_run(tmp_path / "a.json", tasks="ka", noise_levels="0",
                  rows=[noise_row("ka", 0.0, "vanilla", 0.8)])
    other = noise_run(tmp_path / "b.json", tasks="ka", noise_levels="0.4",
                      rows=[noise_row("ka", 0.4, "vanilla", 0.6)], epochs=1.0)
    with pytest.raises(SystemExit, match="epochs"):
        noise.main(["--merge", str(a), str(other), "--output", str(tmp_path / "m.json")])
    again = noise_run(tmp_path / "c.json", tasks="ka", noise_levels="0",
                      rows=[noise_row("ka", 0.0, "vanilla", 0.7)])
    with pytest.raises(SystemExit, match="more than one run"):
        noise.main(["--merge", str(a), str(again), "--output", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


def ood_run(path, task, gold_by_method, *, complete=True, seeds=(0, 1, 2), step_runs=None,
            method_cost=None, **settings):
    s = Settings(tasks=(task,), **settings)
    per_seed = [{"task": task, "domain": f"d{d}", "method": method, "seed": seed,
                 "gold": gold + 0.01 * seed, "pl_accuracy": 0.5}
                for d in range(4) for method, gold in gold_by_method.items() for seed in seeds]
    payload = {"settings": asdict(s), "quick": False, "methods": list(gold_by_method),
               "complete": complete, "rows": [], "per_seed": per_seed, "metarm_rounds": [],
               "step_cost": {task: {"runs": step_runs or [{"meta_step_s": 6.0, "bt_step_s": 0.3}] * 3}},
               "method_cost": method_cost or {f"{task}/meta": {"wall_time_s": 1.0, "peak_rss_mb": 1}},
               "targets": [], "wall_time_s": 100.0, "command": f"python -m bench.ood --tasks {task}"}
    path.write_text(json.dumps(payload))
    return path


def test_ood_merge_joins_tasks_and_recomputes_targets(tmp_path):
    csg = ood_run(tmp_path / "csg.json", "csg", {"bt": 0.2, "dpo": 0.1, "meta": 0.3})
    ka = ood_run(tmp_path / "ka.json", "ka", {"bt": 0.2, "dpo": 0.1, "meta": 0.15})
    out = tmp_path / "ood.json"
    assert ood.main(["--merge", str(csg), str(ka), "--output", str(out), "--figure", ""]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["tasks"] == ["csg", "ka"] and report["settings"]["seeds"] == [0, 1, 2]
    assert len(report["rows"]) == 2 * 4 * 3 and all(r["seeds"] == 3 for r in report["rows"])
    gold = {t["name"].split(":")[0]: t for t in report["targets"] if "on gold" in t["name"]}
    assert gold["csg"]["measured"] == 4 and gold["csg"]["met"]
    assert gold["ka"]["measured"] == 0 and not gold["ka"]["met"]
    assert report["step_cost"]["csg"]["ratio"] == pytest.approx(20.0)
    assert report["wall_time_s"] == 200.0 and len(report["merged_runs"]) == 2


def test_ood_merge_refuses_incomplete_or_different_runs(tmp_path):
    csg = ood_run(tmp_path / "csg.json", "csg", {"bt": 0.2})
    partial = ood_run(tmp_path / "ka.json", "ka", {"bt": 0.2}, complete=False)
    with pytest.raises(SystemExit, match="not complete"):
        ood.main(["--merge", str(csg), str(partial), "--output", str(tmp_path / "o.json")])
    other = ood_run(tmp_path / "ka2.json", "ka", {"bt": 0.2}, outer_steps=3)
    with pytest.raises(SystemExit, match="settings differ"):
        ood.main(["--merge", str(csg), str(other), "--output", str(tmp_path / "o.json")])
    twice = ood_run(tmp_path / "csg2.json", "csg", {"bt": 0.2})
    with pytest.raises(SystemExit, match="repeated"):
        ood.main(["--merge", str(csg), str(twice), "--output", str(tmp_path / "o.json")])


def test_ood_merge_of_an_interrupted_run_and_its_missing_seed(tmp_path):
    interrupted = ood_run(tmp_path / "ka01.json", "ka", {"bt": 0.2, "dpo": 0.1, "meta": 0.3},
                          complete=False, seeds=(0, 1))
    missing = ood_run(tmp_path / "ka2.json", "ka", {"bt": 0.2, "dpo": 0.1, "meta": 0.3}, seeds=(2,))
    out = tmp_path / "ood.json"
    ood.main(["--merge", str(interrupted), "--partial-ok", "--output", str(out), "--figure", ""])
    alone = json.loads(out.read_text())
    assert not alone["complete"] and alone["seeds_per_task"] == {"ka": [0, 1]}
    ood.main(["--merge", str(interrupted), str(missing), "--partial-ok", "--output", str(out),
              "--figure", ""])
    joined = json.loads(out.read_text())
    assert joined["seeds_per_task"] == {"ka": [0, 1, 2]}
    assert all(r["seeds"] == 3 for r in joined["rows"])


def test_ood_merge_adds_costs_and_keeps_a_rows_only_runs_prerequisites_apart(tmp_path):
    def cost(**seconds):
        return {f"ka/{m}": {"wall_time_s": s, "peak_rss_mb": int(10 * s)} for m, s in seconds.items()}

    first = ood_run(tmp_path / "a.json", "ka", {"bt": 0.2, "meta": 0.3}, seeds=(0, 1),
                    method_cost=cost(bt=100.0, meta=200.0))
    second = ood_run(tmp_path / "b.json", "ka", {"bt": 0.2, "meta": 0.3}, seeds=(2,),
                     method_cost=cost(bt=50.0, meta=90.0))
    # MetaRM rows run alone: they train the BT RM they start from, and time no meta step
    rounds = ood_run(tmp_path / "c.json", "ka", {"metarm+adapt": 0.25}, seeds=(0, 1, 2),
                     step_runs=[{"bt_trainer_step_s": 0.2}] * 3,
                     method_cost=cost(bt=5.0, **{"metarm+adapt": 300.0}))
    out = tmp_path / "ood.json"
    report = merge([first, second, rounds], out, None)
    assert report["method_cost"]["ka/bt"] == {"wall_time_s": 150.0, "peak_rss_mb": 1000}
    assert report["method_cost"]["ka/meta"] == {"wall_time_s": 290.0, "peak_rss_mb": 2000}
    assert report["method_cost"]["ka/metarm+adapt"]["wall_time_s"] == 300.0
    assert report["method_cost"]["ka/bt (prerequisite of metarm+adapt)"]["wall_time_s"] == 5.0
    assert report["step_cost"]["ka"]["ratio"] == pytest.approx(20.0)
    assert len(report["step_cost"]["ka"]["runs"]) == 9


@pytest.mark.parametrize(("argv", "seeds"), [([], (0, 1, 2)), (["--first-seed", "2", "--seeds", "1"], (2,)),
                                             (["--first-seed", "1"], (1, 2, 3)), (["--quick"], (0,))])
def test_first_seed_selects_the_seeds_to_run(argv, seeds):
    parser = ood.build_parser()
    assert ood.settings_from_args(parser.parse_args(argv), parser).seeds == seeds


@pytest.mark.parametrize("argv", [[], ["--quick", "--methods", "bt,meta"],
                                  ["--outer-steps", "5", "--heldout-domains", "2", "--set", "beta=0.2",
                                   "--set", "pl_length_normalized=false", "--threads", "2"]])
def test_a_jobs_unit_runs_the_same_configuration_on_one_task_and_seed(argv, tmp_path):
    parser = ood.build_parser()
    args = parser.parse_args([*argv, "--jobs", "2"])
    whole = ood.settings_from_args(args, parser)
    unit = ood.unit_argv(args, "ka", 1, tmp_path / "ka-1.json", tmp_path / "ka-1")
    assert unit[1:3] == ["-m", "bench.ood"]
    unit_args = parser.parse_args(unit[3:])
    alone = ood.settings_from_args(unit_args, parser)
    assert alone == replace(whole, tasks=("ka",), seeds=(1,), work_dir=str(tmp_path / "ka-1"))
    assert (unit_args.methods, unit_args.threads, unit_args.jobs) == (args.methods, args.threads, 1)
    assert unit_args.output == str(tmp_path / "ka-1.json") and unit_args.figure == ""
