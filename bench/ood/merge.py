"""One report from several runs of the OOD benchmark (one per task or seed, run apart)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.ood.report import build_report, print_report
from bench.ood.settings import Settings
from training.atomic import write_json_atomic


def merge(paths: list[Path], output: Path, figure: Path | None, *,
          partial_ok: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One report from several runs with the same settings (e.g. one per task, run on separate
    cores). Refuses runs whose settings differ in anything but tasks and seeds, or that repeat
    a (task, seed). An interrupted run holds only the seeds it finished (it is written after
    each one); ``partial_ok`` takes those, and the report lists the seeds per task."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    incomplete = [str(p) for p, run in zip(paths, runs, strict=True) if not run.get("complete")]
    if incomplete and not partial_ok:
        raise SystemExit(f"--merge: not complete (interrupted?): {', '.join(incomplete)}")

    def comparable(run: dict) -> dict:
        return {k: v for k, v in run["settings"].items() if k not in ("tasks", "seeds", "work_dir")}

    if any(comparable(run) != comparable(runs[0]) for run in runs[1:]):
        raise SystemExit("--merge: the runs' settings differ; merge only runs of one configuration")
    seen: set[tuple[str, int, str]] = set()
    for run in runs:
        keys = {(r["task"], r["seed"], r["method"]) for r in run["per_seed"]}
        if keys & seen:
            raise SystemExit(f"--merge: (task, seed, method) repeated: {sorted(keys & seen)[:3]}")
        seen |= keys
    settings = dict(runs[0]["settings"])
    settings["tasks"] = tuple(dict.fromkeys(t for run in runs for t in run["settings"]["tasks"]))
    settings["seeds"] = tuple(sorted({r["seed"] for run in runs for r in run["per_seed"]}))
    s = Settings(**settings)
    step_costs: dict[str, list[dict]] = {}
    method_costs: dict[str, dict] = {}
    for run in runs:
        for task, summary in run["step_cost"].items():
            step_costs.setdefault(task, []).extend(summary["runs"])
        for name, value in run["method_cost"].items():
            task, _, method = name.partition("/")
            if method not in run["methods"]:
                # e.g. the BT RM that a run of MetaRM rows alone trained to start its rounds from:
                # not the cost of the bt rows another run reported
                name = f"{task}/{method} (prerequisite of {', '.join(run['methods'])})"
            total = method_costs.setdefault(name, {"wall_time_s": 0.0, "peak_rss_mb": 0})
            total["wall_time_s"] = round(total["wall_time_s"] + value["wall_time_s"], 1)
            total["peak_rss_mb"] = max(total["peak_rss_mb"], value["peak_rss_mb"])
    report = build_report(s, [r for run in runs for r in run["per_seed"]],
                          [r for run in runs for r in run["metarm_rounds"]], step_costs,
                          method_costs, figure)
    seeds_per_task = {task: sorted({r["seed"] for r in report["per_seed"] if r["task"] == task})
                      for task in s.tasks}
    report.update({"quick": runs[0]["quick"], "complete": not incomplete,
                   "seeds_per_task": seeds_per_task,
                   "methods": list(dict.fromkeys(m for run in runs for m in run["methods"])),
                   "merged_runs": [{"file": str(p), "command": run.get("command"),
                                    "tasks": run["settings"]["tasks"], "complete": run["complete"],
                                    "wall_time_s": run["wall_time_s"]}
                                   for p, run in zip(paths, runs, strict=True)],
                   "wall_time_s": sum(run["wall_time_s"] for run in runs),
                   "torch_threads": runs[0].get("torch_threads"), **(extra or {})})
    write_json_atomic(output, report)
    print_report(report)
    print(f"seeds per task: {seeds_per_task}")
    print(f"wrote {output} (merged {len(runs)} runs)")
    return report


