"""What a run writes: ``evidence.json`` (rows, intervals, decisions, targets, costs, settings),
the Markdown table the README leads with, and the figures (per-domain intervals; strength's
μ̂-decile agreement)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.evidence.stats import Interval
from training.atomic import write_json_atomic

SHOWN_METRICS = ("M1", "M2")


def jsonable(value: Any) -> Any:
    if isinstance(value, Interval):
        return value.as_dict()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def write_results(path: Path, report: dict[str, Any]) -> None:
    write_json_atomic(path, jsonable(report))


def _interval(iv: Interval | dict[str, float] | None, digits: int = 3) -> str:
    if iv is None:
        return "—"
    d = iv.as_dict() if isinstance(iv, Interval) else iv
    return f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _domains_positive(contrast: dict[str, Any]) -> str:
    m1, m2 = contrast.get("M1", {}), contrast.get("M2", {})
    domains = [d for d in m1 if d != "pooled"]
    same = sum(1 for d in domains if _est(m1[d]) > 0 and _est(m2[d]) > 0)
    return f"{same}/{len(domains)}"


def _est(iv: Interval | dict[str, float]) -> float:
    return iv.estimate if isinstance(iv, Interval) else iv["estimate"]


def markdown_table(report: dict[str, Any]) -> str:
    """One table for all tasks: absolute BT numbers, then every row's paired contrast."""
    lines = [
        "| task | row | vs | ΔM1 π*-gold @1 nat [95% CI] | ΔM2 pair acc. [95% CI] | ΔM3 shifted acc. | domains +/+ | decision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in report["tasks"]:
        for row in task["rows"]:
            if not row["contrast"]:
                a = row["absolute"]
                lines.append(f"| {task['task']} | **{row['method']}** (absolute) | — | {_interval(a.get('M1'))} | "
                             f"{_interval(a.get('M2'))} | — | — | baseline |")
                continue
            c = row["contrast"]
            m3 = _interval(c.get("M3")["pooled"] if c.get("M3") else None)
            decision = row.get("decision", {}).get("verdict", "—")
            lines.append(f"| {task['task']} | {row['method']} | {row['baseline']} | "
                         f"{_interval(c['M1']['pooled'])} | {_interval(c['M2']['pooled'])} | {m3} | "
                         f"{_domains_positive(c)} | {decision} |")
        for name, reason in task.get("not_run", {}).items():
            lines.append(f"| {task['task']} | {name} | bt | — | — | — | — | {reason.split(':')[0]} |")
    return "\n".join(lines) + "\n"


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | threshold | met |", "|---|---:|---:|---|"]
    for t in targets:
        lines.append(f"| {t['name']} | {t['measured']:+.4f} | {t['threshold']:g} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- figures
def plot_intervals(report: dict[str, Any], path: Path) -> None:
    """Per task and metric: each row's paired difference per held-out domain and pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(len(tasks), len(SHOWN_METRICS), figsize=(12, 1.2 + 0.55 * max(
        len(t["rows"]) for t in tasks) * len(tasks)), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for r, task in enumerate(tasks):
        rows = [row for row in task["rows"] if row["contrast"]]
        for c, metric in enumerate(SHOWN_METRICS):
            ax = axes[r][c]
            for y, row in enumerate(rows):
                intervals = row["contrast"][metric]
                domains = [d for d in intervals if d != "pooled"]
                for k, domain in enumerate(domains):
                    iv = intervals[domain]
                    offset = (k - len(domains) / 2) * 0.12
                    ax.errorbar(_est(iv), y + offset, xerr=[[_est(iv) - _lo(iv)], [_hi(iv) - _est(iv)]],
                                fmt="o", ms=3, color=colors[k % len(colors)], alpha=0.7,
                                label=domain if y == 0 else None)
                iv = intervals["pooled"]
                ax.errorbar(_est(iv), y + 0.35, xerr=[[_est(iv) - _lo(iv)], [_hi(iv) - _est(iv)]],
                            fmt="s", ms=5, color="black", label="pooled" if y == 0 else None)
            ax.axvline(0, color="grey", lw=0.8)
            ax.set_yticks(range(len(rows)), [f"{row['method']} − {row['baseline']}" for row in rows], fontsize=7)
            ax.set_title(f"{task['task']}: Δ{metric}", fontsize=9)
            if r == 0 and c == len(SHOWN_METRICS) - 1:
                ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lo(iv: Interval | dict[str, float]) -> float:
    return iv.low if isinstance(iv, Interval) else iv["low"]


def _hi(iv: Interval | dict[str, float]) -> float:
    return iv.high if isinstance(iv, Interval) else iv["high"]


def plot_strength(report: dict[str, Any], path: Path) -> None:
    """Per task: by μ̂ decile of the training pairs, the share of labels agreeing with gold and
    the mean gold gap of the label (does low strength find wrong or weak labels?)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in report["tasks"] if t.get("strength_deciles")]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        deciles = task["strength_deciles"]
        x = [d["decile"] + 1 for d in deciles]
        ax.bar(x, [d["label_agrees_with_gold"] for d in deciles], color="tab:blue", alpha=0.6,
               label="label agrees with gold")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("μ̂ decile (1 = lowest strength)")
        ax.set_ylabel("share")
        twin = ax.twinx()
        twin.plot(x, [d["gold_gap_mean"] for d in deciles], "o-", color="tab:red", label="mean gold gap")
        twin.set_ylabel("gold(chosen) − gold(rejected)")
        ax.set_title(f"{task['task']}: strength (M={task['settings']['run']['strength_members']}), "
                     f"noise {task['data']['planted_noise']:g}", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
