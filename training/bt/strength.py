"""Preference strength from an RM ensemble (Secrets of RLHF II, DESIGN §7).

Train M reward models on the same pairs with different seeds and data orders; for each
pair ``d_m = r_m(x, y_c) − r_m(x, y_r)``, ``μ̂ = mean_m d_m``, ``σ̂ = std_m d_m``, written as
the strength file (``training.bt.strength_file``) next to the dataset, plus the paper's
diagnostics (Fig. 2/3): histogram of μ̂, the share with μ̂ < 0, and σ̂ against μ̂ in
equal-count bins, as a PNG and a table (JSON + Markdown). When the pairs carry planted-noise
labels (``meta["flipped"]``), the summary also says how many of them fall in the lowest-μ̂
slice of the same size.

Each ensemble member is an ordinary :class:`~training.bt.trainer.RMTrainer` run under
``output_dir/member-{m}``, so a cancelled or crashed estimation resumes member by member.
Over several processes every member trains over all of them, each rank scores its share of
the pairs with the member, and rank 0 writes every file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from training.atomic import write_json_atomic, write_text_atomic
from training.bt.config import StrengthConfig
from training.bt.results import StrengthResult
from training.bt.strength_file import strength_rows, write_strength
from training.bt.trainer import RMTrainer
from training.callbacks import NullCallback, TrainerCallback
from training.data import PreferencePair, load_pairs
from training.distributed import Processes
from training.evaluate import score_pairs
from training.reward_model import RewardModel


class _MemberProgress:
    """Reports member m's step s as step m·S + s of M·S to the outer callback."""

    def __init__(self, outer: TrainerCallback, member: int, members: int) -> None:
        self.outer, self.member, self.members = outer, member, members

    def on_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        self.outer.on_progress(self.member * total + step, self.members * total,
                               {**metrics, "member": self.member})

    def should_stop(self) -> bool:
        return self.outer.should_stop()


class StrengthTrainer:
    """Trains the ensemble, writes the strength JSONL and the summary."""

    def __init__(self, config: StrengthConfig, callback: TrainerCallback | None = None,
                 processes: Processes | None = None) -> None:
        self.config = config
        self.callback = callback or NullCallback()
        self.processes = processes or Processes.single()

    def train(self) -> StrengthResult:
        cfg = self.config
        out = Path(cfg.output_dir)
        main = self.processes.is_main
        if main:
            out.mkdir(parents=True, exist_ok=True)
        pairs = load_pairs(cfg.train_file)
        diffs, member_metrics = [], []
        for m in range(cfg.num_models):
            member_diffs, metrics = self._member(m, pairs)
            diffs.append(member_diffs)
            member_metrics.append(metrics)
        rows = strength_rows(pairs, diffs)
        planted = [bool(p.meta.get("flipped")) for p in pairs]
        summary = summarize_strength(rows, planted if any(planted) else None,
                                     sigma_bins=cfg.sigma_bins)
        summary["num_models"] = cfg.num_models
        summary["strength_file"] = str(cfg.resolved_output_file)
        summary["member_metrics"] = member_metrics
        paths = summary_paths(out)
        if main:
            write_strength(cfg.resolved_output_file, rows)
            write_summary(out, rows, summary, histogram_bins=cfg.histogram_bins)
        return StrengthResult(strength_file=cfg.resolved_output_file, summary=summary,
                              member_metrics=member_metrics, **paths)

    def _member(self, m: int, pairs: list[PreferencePair]) -> tuple[list[float], dict[str, Any]]:
        """Train member m (or resume it) and score every pair with it; cached on disk."""
        cfg = self.config
        procs = self.processes
        member_cfg = cfg.member_config(m)
        scores_file = Path(member_cfg.output_dir) / "diffs.json"
        cached = procs.from_main(json.loads(scores_file.read_text())
                                 if procs.is_main and scores_file.is_file() else None)
        if cached is not None and len(cached["diffs"]) == len(pairs):
            return cached["diffs"], cached["metrics"]
        result = RMTrainer(member_cfg, _MemberProgress(self.callback, m, cfg.num_models),
                           processes=procs).train()
        # a whole replica on every rank (the member was saved whole): no collective per batch
        rm = RewardModel.from_pretrained(result.model_dir, device=str(procs.device or cfg.device),
                                         max_input_tokens=cfg.max_length)
        chosen, rejected = score_pairs(rm, pairs, batch_size=cfg.score_batch_size,
                                       processes=procs)
        member_diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
        if procs.is_main:
            write_json_atomic(scores_file, {"diffs": member_diffs, "metrics": result.metrics})
            if not cfg.keep_models:
                shutil.rmtree(result.model_dir, ignore_errors=True)
                shutil.rmtree(Path(member_cfg.output_dir) / "checkpoints", ignore_errors=True)
        return member_diffs, result.metrics


# ---------------------------------------------------------------------- statistics
def planted_recall(mu: list[float], planted: list[bool]) -> float:
    """Share of planted flips among the k lowest-μ̂ pairs, k = number of planted flips."""
    k = sum(planted)
    if k == 0:
        return float("nan")
    lowest = sorted(range(len(mu)), key=lambda i: mu[i])[:k]
    return sum(planted[i] for i in lowest) / k


def summarize_strength(
    rows: list[dict[str, Any]], planted: list[bool] | None = None, *, sigma_bins: int = 10
) -> dict[str, Any]:
    """The table: share μ̂ < 0, μ̂ quantiles, and σ̂ (and planted share) per equal-count μ̂ bin."""
    mu = [r["mu"] for r in rows]
    sigma = [r["sigma"] for r in rows]
    n = len(rows)
    order = sorted(range(n), key=lambda i: mu[i])
    bins = []
    for b in range(min(sigma_bins, n)):
        members = order[b * n // min(sigma_bins, n) : (b + 1) * n // min(sigma_bins, n)]
        entry = {
            "bin": b, "count": len(members),
            "mu_low": mu[members[0]], "mu_high": mu[members[-1]],
            "mu_mean": sum(mu[i] for i in members) / len(members),
            "sigma_mean": sum(sigma[i] for i in members) / len(members),
        }
        if planted is not None:
            entry["planted_share"] = sum(planted[i] for i in members) / len(members)
        bins.append(entry)
    sorted_mu = [mu[i] for i in order]

    def quantile(q: float) -> float:
        return sorted_mu[min(n - 1, int(q * n))]

    summary: dict[str, Any] = {
        "n_pairs": n,
        "share_mu_negative": sum(m < 0 for m in mu) / n,
        "mu_mean": sum(mu) / n,
        "mu_quantiles": {str(q): quantile(q) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
        "sigma_mean": sum(sigma) / n,
        "sigma_by_mu_bin": bins,
    }
    if planted is not None:
        summary["planted_flips"] = sum(planted)
        summary["planted_recall_in_lowest_mu"] = planted_recall(mu, planted)
        summary["planted_share_mu_negative"] = (
            sum(p and m < 0 for p, m in zip(planted, mu, strict=True)) / max(1, sum(planted))
        )
    return summary


# ---------------------------------------------------------------------- output
def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Preference strength ({summary['n_pairs']} pairs, {summary.get('num_models', '?')} models)",
        "",
        f"- share with μ̂ < 0: **{summary['share_mu_negative']:.1%}**",
        f"- mean μ̂: {summary['mu_mean']:.3f}; mean σ̂: {summary['sigma_mean']:.3f}",
    ]
    if "planted_flips" in summary:
        lines.append(
            f"- planted flips: {summary['planted_flips']}; share of them in the lowest-μ̂ slice of "
            f"the same size: **{summary['planted_recall_in_lowest_mu']:.1%}**"
        )
    planted = "planted_flips" in summary
    header = "| bin | pairs | μ̂ range | mean μ̂ | mean σ̂ |" + (" planted |" if planted else "")
    lines += ["", header, "|" + "---|" * (header.count("|") - 1)]
    for b in summary["sigma_by_mu_bin"]:
        row = (f"| {b['bin']} | {b['count']} | {b['mu_low']:.2f} … {b['mu_high']:.2f} | "
               f"{b['mu_mean']:.3f} | {b['sigma_mean']:.3f} |")
        if planted:
            row += f" {b['planted_share']:.0%} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def summary_paths(out: Path) -> dict[str, Path]:
    """Where :func:`write_summary` writes under ``out``."""
    return {"summary_json": out / "strength_summary.json",
            "summary_markdown": out / "strength_summary.md",
            "summary_png": out / "strength_summary.png"}


def write_summary(
    out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], *, histogram_bins: int = 40
) -> dict[str, Path]:
    """strength_summary.{json,md,png} under ``out``."""
    # deferred: matplotlib costs a second to import and only this summary draws
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = summary_paths(out)
    write_json_atomic(paths["summary_json"], summary)
    write_text_atomic(paths["summary_markdown"], summary_markdown(summary))
    mu = [r["mu"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.hist(mu, bins=histogram_bins, color="tab:blue")
    left.axvline(0.0, color="black", linewidth=1)
    left.set(title=f"μ̂ (share < 0: {summary['share_mu_negative']:.1%})", xlabel="μ̂", ylabel="pairs")
    bins = summary["sigma_by_mu_bin"]
    right.plot([b["mu_mean"] for b in bins], [b["sigma_mean"] for b in bins], "o-")
    right.set(title="σ̂ against μ̂ (equal-count bins)", xlabel="mean μ̂ of bin", ylabel="mean σ̂")
    fig.tight_layout()
    fig.savefig(paths["summary_png"], dpi=100)
    plt.close(fig)
    return paths
