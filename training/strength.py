"""Preference strength from an RM ensemble (Secrets of RLHF II, DESIGN §7).

Train M reward models on the same pairs with different seeds and data orders; for each
pair ``d_m = r_m(x, y_c) − r_m(x, y_r)``, ``μ̂ = mean_m d_m``, ``σ̂ = std_m d_m``. The result
is a JSONL next to the dataset (``train.jsonl`` → ``train.strength.jsonl``), one row per
training pair in file order::

    {"index": 0, "id": "p0", "diffs": [d_1, ..., d_M], "mu": μ̂, "sigma": σ̂}

plus the paper's diagnostics (Fig. 2/3): histogram of μ̂, the share with μ̂ < 0, and σ̂
against μ̂ in equal-count bins, as a PNG and a table (JSON + Markdown). When the pairs
carry planted-noise labels (``meta["flipped"]``), the summary also says how many of them
fall in the lowest-μ̂ slice of the same size.

Each ensemble member is an ordinary :class:`~training.rm_trainer.RMTrainer` run under
``output_dir/member-{m}``, so a cancelled or crashed estimation resumes member by member.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from training.callbacks import NullCallback, TrainerCallback
from training.checkpoint import write_json_atomic
from training.evaluate import score_pairs
from training.reward_model import RewardModel
from training.rm_trainer import (
    ConfigError,
    RMTrainConfig,
    RMTrainer,
    as_pair,
    check_types,
    config_from_dict,
    read_pairs,
)

STRENGTH_SUFFIX = ".strength.jsonl"


def default_strength_path(train_file: str | Path) -> Path:
    """``data/train.jsonl`` → ``data/train.strength.jsonl`` (next to the dataset)."""
    path = Path(train_file)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + STRENGTH_SUFFIX)


def read_strength(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no strength file at {path}: run `python -m training strength` on the training "
            "pairs first, or set strength_file"
        )
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def strength_for_pairs(path: str | Path, pairs: list[Any]) -> list[float]:
    """μ̂ for each pair, in order: matched by ``id`` when every pair has one, else by line."""
    rows = read_strength(path)
    ids = [getattr(p, "id", None) for p in pairs]
    if all(i is not None for i in ids) and all(r.get("id") is not None for r in rows):
        by_id = {str(r["id"]): float(r["mu"]) for r in rows}
        missing = [i for i in ids if str(i) not in by_id]
        if missing:
            raise ValueError(f"{path}: no strength for pair id(s) {missing[:5]} (stale file?)")
        return [by_id[str(i)] for i in ids]
    if len(rows) != len(pairs):
        raise ValueError(f"{path}: {len(rows)} strength rows for {len(pairs)} pairs (stale file?)")
    return [float(r["mu"]) for r in sorted(rows, key=lambda r: r["index"])]


@dataclass
class StrengthConfig:
    """An ensemble strength estimation; the training knobs are those of ``RMTrainConfig``."""

    train_file: str = ""  # JSONL of pairs to measure (the ensemble trains on these too)
    output_file: str | None = None  # strength JSONL; None = <train_file stem>.strength.jsonl
    output_dir: str = "runs/strength"  # ensemble runs + summary (PNG, JSON, Markdown)
    num_models: int = 5  # M
    seed: int = 0  # member m trains with seed + m and data order seed + m
    model: str = "minilm"
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    learning_rate: float = 5e-5
    finetune: Literal["full", "lora"] = "full"
    max_length: int = 512
    device: str = "auto"
    trainer_options: dict[str, Any] = field(default_factory=dict)  # any other RMTrainConfig key
    score_batch_size: int = 32
    histogram_bins: int = 40
    sigma_bins: int = 10  # equal-count μ̂ bins for the σ̂-vs-μ̂ table
    keep_models: bool = False  # keep each member's final model (else only its scores stay)

    def __post_init__(self) -> None:
        check_types(self)
        if not self.train_file:
            raise ConfigError("train_file: required (a JSONL of preference pairs)")
        for name in ("num_models", "score_batch_size", "histogram_bins", "sigma_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_models < 2:
            raise ConfigError("num_models: σ̂ needs at least 2 models")
        # Fail now, not after M runs, on a bad trainer option.
        self.member_config(0)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StrengthConfig:
        return config_from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def resolved_output_file(self) -> Path:
        return Path(self.output_file) if self.output_file else default_strength_path(self.train_file)

    def member_config(self, member: int) -> RMTrainConfig:
        reserved = {"train_file", "output_dir", "seed", "data_seed", "eval_file", "margin", "flip"}
        clash = sorted(reserved & set(self.trainer_options))
        if clash:
            raise ConfigError(f"trainer_options: {clash} are set by the strength job itself")
        values = {
            "train_file": self.train_file, "model": self.model, "epochs": self.epochs,
            "max_steps": self.max_steps, "batch_size": self.batch_size,
            "learning_rate": self.learning_rate, "finetune": self.finetune,
            "max_length": self.max_length, "device": self.device,
            **self.trainer_options,
            "output_dir": str(Path(self.output_dir) / f"member-{member}"),
            "seed": self.seed + member, "data_seed": self.seed + member,
        }
        try:
            return RMTrainConfig.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"trainer_options: {exc}") from exc


@dataclass
class StrengthResult:
    strength_file: Path  # the per-pair JSONL
    summary: dict[str, Any]  # the table (also in summary_json)
    summary_json: Path
    summary_markdown: Path
    summary_png: Path
    member_metrics: list[dict[str, Any]]


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

    def __init__(self, config: StrengthConfig, callback: TrainerCallback | None = None) -> None:
        self.config = config
        self.callback = callback or NullCallback()

    def train(self) -> StrengthResult:
        cfg = self.config
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        pairs = [as_pair(p) for p in read_pairs(cfg.train_file)]
        diffs, member_metrics = [], []
        for m in range(cfg.num_models):
            member_diffs, metrics = self._member(m, pairs)
            diffs.append(member_diffs)
            member_metrics.append(metrics)
        rows = strength_rows(pairs, diffs)
        write_jsonl_atomic(cfg.resolved_output_file, rows)
        planted = [bool(p.meta.get("flipped")) for p in pairs]
        summary = summarize_strength(rows, planted if any(planted) else None,
                                     sigma_bins=cfg.sigma_bins)
        summary["num_models"] = cfg.num_models
        summary["strength_file"] = str(cfg.resolved_output_file)
        summary["member_metrics"] = member_metrics
        paths = write_summary(out, rows, summary, histogram_bins=cfg.histogram_bins)
        return StrengthResult(strength_file=cfg.resolved_output_file, summary=summary,
                              member_metrics=member_metrics, **paths)

    def _member(self, m: int, pairs: list[Any]) -> tuple[list[float], dict[str, Any]]:
        """Train member m (or resume it) and score every pair with it; cached on disk."""
        cfg = self.config
        member_cfg = cfg.member_config(m)
        scores_file = Path(member_cfg.output_dir) / "diffs.json"
        if scores_file.is_file():
            cached = json.loads(scores_file.read_text())
            if len(cached["diffs"]) == len(pairs):
                return cached["diffs"], cached["metrics"]
        result = RMTrainer(member_cfg, _MemberProgress(self.callback, m, cfg.num_models)).train()
        rm = RewardModel.from_pretrained(result.model_dir, device=cfg.device,
                                         max_input_tokens=cfg.max_length)
        chosen, rejected = score_pairs(rm, pairs, batch_size=cfg.score_batch_size)
        member_diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
        write_json_atomic(scores_file, {"diffs": member_diffs, "metrics": result.metrics})
        if not cfg.keep_models:
            shutil.rmtree(result.model_dir, ignore_errors=True)
            shutil.rmtree(Path(member_cfg.output_dir) / "checkpoints", ignore_errors=True)
        return member_diffs, result.metrics


# ---------------------------------------------------------------------- statistics
def strength_rows(pairs: list[Any], diffs: list[list[float]]) -> list[dict[str, Any]]:
    """One row per pair from per-member differences ``diffs[m][i]`` (σ̂: population std)."""
    rows = []
    for i, pair in enumerate(pairs):
        d = [member[i] for member in diffs]
        mu = sum(d) / len(d)
        sigma = math.sqrt(sum((x - mu) ** 2 for x in d) / len(d))
        rows.append({"index": i, "id": getattr(pair, "id", None), "diffs": d, "mu": mu, "sigma": sigma})
    return rows


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
def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


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


def write_summary(
    out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], *, histogram_bins: int = 40
) -> dict[str, Path]:
    """strength_summary.{json,md,png} under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {"summary_json": out / "strength_summary.json",
             "summary_markdown": out / "strength_summary.md",
             "summary_png": out / "strength_summary.png"}
    write_json_atomic(paths["summary_json"], summary)
    paths["summary_markdown"].write_text(summary_markdown(summary))
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
