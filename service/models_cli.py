"""``generalrm models list|promote|rollback``: the registry through the API."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from generalrm.client import AliasChange
from service.cli_client import URL, api

models_app = typer.Typer(help="List registered models; promote or roll back an alias.",
                         no_args_is_help=True)
console = Console()
ALIAS = typer.Option("production", "--alias", "-a", help="the alias to move")


def _versions(versions: list[str]) -> str:
    return versions[0] if len(versions) == 1 else f"{versions[0]}..{versions[-1]} ({len(versions)})"


@models_app.command("list")
def list_models(url: str = URL) -> None:
    """Registered models with their versions and aliases; the served one is marked *."""
    with api(url) as client:
        listing = client.list_models()
    served_name = (listing.served or "").partition("@")[0]
    table = Table("", "name", "kind", "versions", "aliases", box=None, header_style="bold",
                  pad_edge=False)
    for model in listing.models:
        aliases = " ".join(f"{a}={v}" for a, v in sorted(model.aliases.items()))
        table.add_row("*" if model.name == served_name else "", model.name, model.kind,
                      _versions([v.version for v in model.versions]), aliases)
    console.print(table)
    typer.echo(f"served: {listing.served or 'nothing yet'}"
               + (f" (swap failed: {listing.swap_error})" if listing.swap_error else ""))


def _report(change: AliasChange) -> None:
    swap = f", {change.swap}" if change.swap else ""
    typer.echo(f"{change.name}:{change.alias} -> {change.version} "
               f"(served: {change.served or 'nothing'}{swap})")


@models_app.command("promote")
def promote(name: str, version: str = typer.Argument(..., help="v2, or 2"), alias: str = ALIAS,
            url: str = URL) -> None:
    """Point NAME:ALIAS at VERSION; a server following that alias swaps it in."""
    with api(url) as client:
        change = client.promote(name, version, alias=alias)
    _report(change)


@models_app.command("rollback")
def rollback(name: str, alias: str = ALIAS,
             to: str = typer.Option(None, "--to", help="version to point at (default: the one "
                                    "just before the alias's current version)"),
             url: str = URL) -> None:
    """Point NAME:ALIAS back at the previous version (or at --to)."""
    with api(url) as client:
        change = client.rollback(name, alias=alias, to=to)
    _report(change)
