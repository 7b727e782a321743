"""``generalrm jobs submit|list|watch|cancel``: the job routes from a terminal."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from training.config import ConfigError, load_yaml_file, merge, parse_overrides

jobs_app = typer.Typer(help="Submit, list, watch and cancel jobs through the API.", no_args_is_help=True)
console = Console()
FINAL = {"succeeded", "failed", "cancelled"}


def _client(url: str | None) -> httpx.Client:
    base = url or os.environ.get("GENERALRM_URL")
    if not base:
        host = os.environ.get("GENERALRM_HOST", "127.0.0.1")
        base = f"http://{host}:{os.environ.get('GENERALRM_PORT', '8000')}"
    key = os.environ.get("GENERALRM_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=30)


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = f"{response.status_code} {error['type']}: {error['message']}"
        except (ValueError, KeyError):
            message = f"{response.status_code}: {response.text}"
        console.print(f"[red]{message}[/]")
        raise typer.Exit(1)
    return response.json()


URL = typer.Option(None, "--url", help="API base URL (default: $GENERALRM_URL or http://$GENERALRM_HOST:$GENERALRM_PORT)")


@jobs_app.command("submit")
def submit(
    kind: str = typer.Argument(..., help="train_rm | strength | meta_train | metarm | adapt"),
    spec_file: Path = typer.Option(None, "--spec", "-f", help="JSON or YAML file with the spec"),
    set_: list[str] = typer.Option([], "--set", help="spec key=value (JSON values allowed); dotted keys nest"),
    watch_: bool = typer.Option(False, "--watch", "-w", help="then watch it to the end"),
    url: str = URL,
) -> None:
    """Submit a job; prints its id."""
    try:
        loaded = load_yaml_file(spec_file) if spec_file is not None else {}
        # a spec file may hold {kind, spec} or the spec itself
        spec = merge(loaded.get("spec", loaded), parse_overrides(set_))
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    with _client(url) as client:
        payload = _check(client.post("/jobs", json={"kind": kind, "spec": spec}))
    console.print(payload["job_id"])
    if watch_:
        watch(payload["job_id"], url=url)


@jobs_app.command("list")
def list_jobs(status: str = typer.Option(None), limit: int = typer.Option(20), url: str = URL) -> None:
    """Recent jobs, newest first."""
    params = {"limit": limit, **({"status": status} if status else {})}
    with _client(url) as client:
        records = _check(client.get("/jobs", params=params))["jobs"]
    table = Table("id", "kind", "status", "progress", "created", "artifacts")
    for r in records:
        progress = r.get("progress") or {}
        step = f"{progress.get('step', 0)}/{progress.get('total', '?')}" if progress else ""
        table.add_row(r["id"], r["kind"], r["status"], step, str(r.get("created_at", "")), json.dumps(r.get("artifacts") or {})[:60])
    console.print(table)


@jobs_app.command("watch")
def watch(job_id: str, url: str = URL, interval: float = typer.Option(1.0)) -> None:
    """Live progress bar until the job ends; exit code 1 unless it succeeded."""
    with _client(url) as client, Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
    ) as bar:
        task = bar.add_task(job_id, total=None, status="")
        while True:
            record = _check(client.get(f"/jobs/{job_id}"))
            progress = record.get("progress") or {}
            bar.update(task, completed=progress.get("step", 0), total=progress.get("total") or None,
                       status=record["status"])
            if record["status"] in FINAL:
                break
            time.sleep(interval)
    console.print_json(json.dumps({k: record.get(k) for k in ("status", "metrics", "artifacts", "error")}))
    if record["status"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("cancel")
def cancel(job_id: str, url: str = URL) -> None:
    """Cancel a job (cooperative: a running trainer checkpoints and stops)."""
    with _client(url) as client:
        record = _check(client.delete(f"/jobs/{job_id}"))
    console.print(f"{job_id}: {record['status']}{' (cancel requested)' if record.get('cancel_requested') else ''}")
