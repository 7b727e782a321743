"""What the API-calling commands (``generalrm jobs``, ``generalrm models``) share: the
``--url`` option, a client, and errors told in one line (exit code 1), never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from generalrm.client import ApiError, Client, GeneralRMError, ServerUnreachable

URL = typer.Option(None, "--url", help="API base URL (default: $GENERALRM_URL, else "
                   "http://$GENERALRM_HOST:$GENERALRM_PORT); API key from $GENERALRM_API_KEY")


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr as one line; return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@contextlib.contextmanager
def api(url: str | None) -> Iterator[Client]:
    """A client for one command; every client-side failure ends the command with one line."""
    # A terminal user waits a little for a loading model or a Redis restart, not minutes.
    client = Client(url, retries=2, max_retry_wait=5.0, timeout=30.0)
    try:
        yield client
    except ServerUnreachable as exc:
        raise fail(f"{exc}; is the server running (`generalrm up`) and is --url / "
                   "$GENERALRM_URL right?") from None
    except ApiError as exc:
        raise fail(f"{exc.status} {exc.type}: {exc.message}") from None
    except GeneralRMError as exc:
        raise fail(str(exc)) from None
    finally:
        client.close()
