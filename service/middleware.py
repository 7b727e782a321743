"""Pure ASGI middleware: the request-body limit (413), internal errors (500) and per-route
request metrics."""

from __future__ import annotations

import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import INTERNAL_ERROR_MESSAGE
from service.metrics import Metrics

log = logging.getLogger(__name__)


class _BodyTooLarge(BaseException):  # noqa: N818
    """BaseException, because FastAPI turns any Exception raised while it reads the body
    into a generic 400."""


async def _send_error(send: Send, status: int, error_type: str, message: str) -> None:
    body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 before the body is read when Content-Length says so, or as soon as a chunked body
    crosses the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"request body is larger than GENERALRM_MAX_BODY_BYTES={self.max_bytes} bytes; "
            "send fewer or shorter items per request"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_error(send, 413, "payload_too_large", message)
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return incoming

        async def tracking_send(outgoing: Message) -> None:
            nonlocal started
            if outgoing["type"] == "http.response.start":
                started = True
            await send(outgoing)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, 413, "payload_too_large", message)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            # Unmatched paths share one label so that scanners cannot blow up cardinality.
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)


class InternalErrorMiddleware:
    """An exception no handler maps (a bug) becomes a 500 with the one error shape, logged in
    full but never echoed to the client. Answering here, inside Starlette's outermost
    middleware, keeps the connection: there the exception would be re-raised to uvicorn,
    which drops a keep-alive connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await _send_error(send, 500, "internal_error", INTERNAL_ERROR_MESSAGE)
