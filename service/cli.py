"""The ``generalrm`` command: serve, worker, up, jobs, models."""

from __future__ import annotations

import logging

import typer

# Requests in flight get this long after SIGTERM; docker-compose.yml's stop_grace_period for
# the API must be longer, or Docker's SIGKILL lands first.
GRACEFUL_SHUTDOWN_SECONDS = 30

app = typer.Typer(help="generalrm: reward-model serving and meta-learning for RLHF", no_args_is_help=True)


def _settings():
    from service.settings import ServiceSettings

    try:
        return ServiceSettings()
    except Exception as exc:  # pydantic's message names the bad GENERALRM_ variable
        raise typer.BadParameter(str(exc)) from exc


@app.command("serve")
def serve_command(
    host: str = typer.Option(None, help="Overrides GENERALRM_HOST"),
    port: int = typer.Option(None, help="Overrides GENERALRM_PORT"),
) -> None:
    """Serve the HTTP API (the same as ``python -m service``)."""
    serve(host=host, port=port)


def _quiet_libraries() -> None:
    import transformers

    # The per-load weight report is noise in a server log; errors still show.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def serve(host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    from service.app import create_app

    settings = _settings()
    _quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


@app.command("worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker_command(ctx: typer.Context) -> None:
    """Run a Celery worker (the same as ``python -m worker``; extra options pass through)."""
    from worker import main as worker_main

    worker_main(list(ctx.args))


@app.command("up")
def up_command(
    redis_port: int = typer.Option(None, help="Port of the redis-server started for the stack "
                                   "(default: GENERALRM_STACK_REDIS_PORT, 6390)"),
) -> None:
    """Redis (unless GENERALRM_REDIS_URL is set), a worker and the API; Ctrl-C stops all."""
    from service.stack import run_stack

    raise typer.Exit(run_stack(redis_port or _settings().stack_redis_port))


def _add_remote_commands() -> None:
    from service.jobs_cli import jobs_app
    from service.models_cli import models_app

    app.add_typer(jobs_app, name="jobs")
    app.add_typer(models_app, name="models")


_add_remote_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
