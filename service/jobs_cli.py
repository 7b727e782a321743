"""``generalrm jobs submit|list|watch|cancel``: the job routes from a terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from generalrm.client import Client, GeneralRMError, Job
from service.cli_client import URL, api
from training.config import ConfigError, load_yaml_file, merge, parse_overrides

jobs_app = typer.Typer(help="Submit, list, watch and cancel jobs through the API.", no_args_is_help=True)
console = Console()
SHORT_ID = 12  # what `list` shows; watch and cancel take any unique prefix


def _spec(kind: str | None, spec_file: Path | None, assignments: list[str]) -> tuple[str, dict]:
    """The kind and spec from ``--spec`` (``{kind?, spec}`` or a bare spec) and ``--set``."""
    try:
        loaded = load_yaml_file(spec_file) if spec_file is not None else {}
        overrides = parse_overrides(assignments)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    file_kind = loaded.get("kind") if "spec" in loaded else None
    if kind and file_kind and kind != file_kind:
        raise typer.BadParameter(f"KIND {kind!r} differs from the kind {file_kind!r} in {spec_file}")
    kind = kind or file_kind
    if not kind:
        raise typer.BadParameter("give the job kind (train_rm, strength, meta_train, metarm, "
                                 "adapt, evaluate) or a --spec file with a 'kind' key")
    base = loaded.get("spec", loaded)
    if not isinstance(base, dict):
        raise typer.BadParameter(f"{spec_file}: 'spec' must be a mapping")
    return kind, merge(base, overrides)


def resolve_job_id(client: Client, given: str) -> str:
    """A full job id from a unique prefix of one (as ``list`` shows them)."""
    if len(given) >= 32:
        return given
    matches = [job.id for job in client.list_jobs(limit=1000) if job.id.startswith(given)]
    if len(matches) != 1:
        raise GeneralRMError(f"{len(matches)} recent jobs start with {given!r}; give more of the id")
    return matches[0]


@jobs_app.command("submit")
def submit(
    kind: str = typer.Argument(None, help="train_rm | strength | meta_train | metarm | adapt | "
                               "evaluate (default: the 'kind' of the --spec file)"),
    spec_file: Path = typer.Option(None, "--spec", "-f", help="YAML/JSON file: {kind, spec} or "
                                   "the spec itself (e.g. examples/jobs/train_rm.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="spec key=value (YAML values); dotted keys nest"),
    watch_: bool = typer.Option(False, "--watch", "-w", help="then watch it to the end"),
    interval: float = typer.Option(1.0, help="seconds between polls with --watch"),
    url: str = URL,
) -> None:
    """Submit a job; prints its id."""
    kind, spec = _spec(kind, spec_file, set_)
    with api(url) as client:
        accepted = client.submit_job(kind, spec)
    for warning in accepted.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(accepted.job_id)
    if watch_:
        watch(accepted.job_id, url=url, interval=interval)


def _progress_text(job: Job) -> str:
    progress = job.progress or {}
    if "total" not in progress:
        return ""
    return f"{progress.get('step', 0)}/{progress['total']}"


def _outcome(job: Job) -> str:
    if job.error:
        return str(job.error.get("type", "error"))
    artifacts = job.artifacts or {}
    return str(artifacts.get("model") or artifacts.get("strength_file") or "")


@jobs_app.command("list")
def list_jobs(status: str = typer.Option(None, help="queued|running|succeeded|failed|cancelled"),
              limit: int = typer.Option(20), url: str = URL) -> None:
    """Recent jobs, newest first (ids shortened: watch and cancel take any unique prefix)."""
    with api(url) as client:
        jobs = client.list_jobs(status=status, limit=limit)
    table = Table("id", "kind", "status", "step", "created (UTC)", "outcome", box=None,
                  header_style="bold", pad_edge=False)
    for job in jobs:
        created = (job.created_at or "")[5:19].replace("T", " ")  # MM-DD HH:MM:SS
        table.add_row(job.id[:SHORT_ID], job.kind, job.status, _progress_text(job), created,
                      _outcome(job))
    console.print(table)


@jobs_app.command("watch")
def watch(job_id: str, url: str = URL,
          interval: float = typer.Option(1.0, help="seconds between polls")) -> None:
    """Live progress (step, loss, ETA) until the job ends; exit code 1 unless it succeeded."""
    with api(url) as client:
        job_id = resolve_job_id(client, job_id)
        with Progress(TextColumn("{task.description}"), BarColumn(bar_width=20),
                      MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TextColumn("{task.fields[metric]}"),
                      TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task(job_id[:SHORT_ID], total=None, status="", metric="")

            def show(job: Job) -> None:
                progress = job.progress or {}
                # the trainers report loss; an evaluation reports its running accuracy
                shown = next(((k, progress[k]) for k in ("loss", "accuracy")
                              if isinstance(progress.get(k), int | float)), None)
                metric = f"{shown[0]} {shown[1]:.4g}" if shown else ""
                bar.update(task, completed=progress.get("step", 0),
                           total=progress.get("total") or None, status=job.status, metric=metric)

            job = client.wait_for_job(job_id, interval=interval, on_update=show)
    summary: dict[str, Any] = {k: getattr(job, k) for k in ("status", "metrics", "artifacts", "error")}
    console.print_json(json.dumps(summary, default=str))
    if job.status != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("cancel")
def cancel(job_id: str, url: str = URL) -> None:
    """Cancel a job (cooperative: a running trainer checkpoints and stops)."""
    with api(url) as client:
        job = client.cancel_job(resolve_job_id(client, job_id))
    asked = " (cancel requested)" if job.model_extra and job.model_extra.get("cancel_requested") else ""
    typer.echo(f"{job.id}: {job.status}{asked}")
