"""The OOD benchmark's report: table rows over seeds, targets, step costs, printing."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.metarm_rows import metarm_targets, plot_variance, variance_curves
from bench.ood.settings import METHODS, Settings
from training.precision import pick_device, training_precision_name


def aggregate(per_seed: list[dict]) -> list[dict]:
    keys = sorted({(r["task"], r["domain"], r["method"]) for r in per_seed},
                  key=lambda k: (k[0], k[1], METHODS.index(k[2])))
    out = []
    for task, domain, method in keys:
        mine = [r for r in per_seed if (r["task"], r["domain"], r["method"]) == (task, domain, method)]
        row = {"task": task, "domain": domain, "method": method, "seeds": len(mine)}
        for metric in ("gold", "pl_accuracy"):
            values = [r[metric] for r in mine]
            row[f"{metric}_mean"] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def targets(rows: list[dict], s: Settings) -> list[dict]:
    found = []
    for task in s.tasks:
        domains = sorted({r["domain"] for r in rows if r["task"] == task})
        present = {r["method"] for r in rows if r["task"] == task}
        if not domains or not {"meta", "bt", "dpo"} <= present:
            continue  # a --methods run without the OOD-PL comparison
        threshold = 3 if len(domains) >= 4 else math.ceil(0.75 * len(domains))
        for metric in ("gold", "pl_accuracy"):
            def value(domain, method, metric=metric, task=task):
                return next(r[f"{metric}_mean"] for r in rows
                            if (r["task"], r["domain"], r["method"]) == (task, domain, method))
            wins = sum(value(d, "meta") > max(value(d, "bt"), value(d, "dpo")) for d in domains)
            found.append({"name": f"{task}: meta beats bt and dpo on {metric} (held-out domains won "
                                  f"of {len(domains)})",
                          "measured": wins, "threshold": threshold, "met": wins >= threshold})
    return found


def print_table(rows: list[dict]) -> None:
    print(f"\n{'task':5} {'domain':16} {'method':16} {'gold':>16} {'PL accuracy':>16}")
    for r in rows:
        print(f"{r['task']:5} {r['domain']:16} {r['method']:16} "
              f"{r['gold_mean']:8.3f} ± {r['gold_std']:5.3f} "
              f"{r['pl_accuracy_mean']:8.3f} ± {r['pl_accuracy_std']:5.3f}")


def step_summary(step_costs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per task: the meta step's cost against a BT step of the same batch (mean over seeds)."""
    summary = {}
    for task, items in step_costs.items():
        # runs without meta-training (MetaRM rows alone, say) have no meta step to compare
        timed = [c for c in items if "meta_step_s" in c and "bt_step_s" in c]
        summary[task] = {"runs": items}
        if timed:
            meta = statistics.fmean(c["meta_step_s"] for c in timed)
            bt = statistics.fmean(c["bt_step_s"] for c in timed)
            summary[task].update({"meta_step_s": meta, "bt_step_s": bt, "ratio": meta / bt})
    return summary


def build_report(s: Settings, per_seed: list[dict], round_records: list[dict],
                 step_costs: dict[str, list[dict]], method_costs: dict[str, dict],
                 figure: Path | None) -> dict[str, Any]:
    """Table rows, targets and MetaRM curves from per-seed results (one run or merged runs)."""
    rows = aggregate(per_seed)
    report = {"settings": asdict(s), "precision": training_precision_name(pick_device()), "rows": rows, "per_seed": per_seed,
              "metarm_rounds": round_records, "step_cost": step_summary(step_costs),
              "method_cost": method_costs,
              "targets": targets(rows, s) + metarm_targets(per_seed, round_records, s.tasks)}
    if round_records:
        report["metarm_variance_curves"] = variance_curves(round_records)
        if figure is not None:
            plot_variance(round_records, figure)
    return report


def print_report(report: dict[str, Any]) -> None:
    print_table(report["rows"])
    for task, summary in report["step_cost"].items():
        if "ratio" in summary:
            print(f"{task}: meta step {summary['meta_step_s']:.2f}s vs BT step "
                  f"{summary['bt_step_s']:.3f}s → {summary['ratio']:.1f}×")
    for task, curves in report.get("metarm_variance_curves", {}).items():
        for method, points in curves.items():
            print(f"{task} {method:16} diff variance by round: " + " ".join(f"{v:.4g}" for v in points))
    for name, value in report["method_cost"].items():
        print(f"{name:24} {value['wall_time_s']:8.1f}s  peak RSS {value['peak_rss_mb']} MB")
    for t in report["targets"]:
        print(f"[{'met' if t['met'] else 'NOT met'}] {t['name']}: {t['measured']} (threshold {t['threshold']})")


