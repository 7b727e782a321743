"""The one place that maps error types to HTTP status codes (as TEI does).

Every error body is ``{"error": {"type": str, "message": str}}``. Anything a client can get
wrong is a 4xx that says what to fix; a 500 means a bug of ours.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.schemas import ErrorBody
from training.registry import ModelNotFoundError, RegistryError
from training.reward_model import InputError, InputTooLongError
from worker.client import JobStoreUnavailable, SpecError

INTERNAL_ERROR_MESSAGE = ("internal error: a bug of ours, not something the request did; the "
                          "server log has the details")

log = logging.getLogger(__name__)


class ApiError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class Unauthorized(ApiError):
    status_code = 401
    error_type = "unauthorized"


class ModelNotServed(ApiError):
    status_code = 404
    error_type = "model_not_found"


class NotFound(ApiError):
    status_code = 404
    error_type = "not_found"


class Conflict(ApiError):
    status_code = 409
    error_type = "conflict"


class PromotionFailed(ApiError):
    """A promoted version could not be loaded; nothing was moved."""

    status_code = 409
    error_type = "promotion_failed"


class InvalidInput(ApiError):
    status_code = 422
    error_type = "invalid_input"


class Overloaded(ApiError):
    status_code = 429
    error_type = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after)))})


class NotReady(ApiError):
    status_code = 503
    error_type = "not_ready"


class BackendUnavailable(ApiError):
    status_code = 503
    error_type = "backend_unavailable"


# What each status means, for the OpenAPI document (routes declare theirs through
# ``error_responses``; the bodies are always ``ErrorBody``).
_DOCUMENTED: dict[int, str] = {
    401: "GENERALRM_API_KEY is set and the request has no or a wrong key",
    404: "unknown job, or a model that is not served here",
    409: "a promotion whose version cannot be loaded (the alias did not move)",
    413: "body larger than GENERALRM_MAX_BODY_BYTES",
    415: "body not sent as application/json",
    422: "invalid input; the message names the field and what to fix",
    429: "the scoring queue is full; retry after the Retry-After header's seconds",
    503: "the model is still loading (or failed to load), or Redis is unreachable for jobs",
}
SCORING_ERRORS = (404, 413, 415, 422, 429, 503)
JOB_ERRORS = (404, 413, 415, 422, 503)
MODEL_ERRORS = (404, 409, 413, 415, 422, 503)


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """The ``responses=`` of a router or route: each status with the real error body."""
    responses: dict[int | str, dict] = {}
    for status in statuses:
        entry: dict = {"model": ErrorBody, "description": _DOCUMENTED[status]}
        if status == 429:
            entry["headers"] = {"Retry-After": {"description": "seconds to wait",
                                                "schema": {"type": "integer"}}}
        responses[status] = entry
    return responses


def error_response(status: int, error_type: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": error_type, "message": message}}, status_code=status, headers=headers
    )


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('msg')}"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


_STATUS_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


# Errors raised below the service (training/, worker/) that a client caused or must wait out.
# Starlette picks the most specific handler along the raised class's MRO (InputTooLongError
# before InputError).
FOREIGN_ERRORS: dict[type[Exception], tuple[int, str, dict[str, str] | None]] = {
    SpecError: (422, "invalid_spec", None),
    JobStoreUnavailable: (503, "job_store_unavailable", {"Retry-After": "5"}),
    ModelNotFoundError: (404, "model_not_found", None),
    RegistryError: (422, "invalid_model_request", None),
    InputTooLongError: (422, "input_too_long", None),
    InputError: (422, "invalid_input", None),
}


def _foreign_handler(status: int, error_type: str, headers: dict[str, str] | None):
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(status, error_type, str(exc), headers)

    return handle


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.error_type, exc.message, exc.headers)

    for error_class, (status, error_type, headers) in FOREIGN_ERRORS.items():
        app.add_exception_handler(error_class, _foreign_handler(status, error_type, headers))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in content_type:
            return error_response(
                415,
                "unsupported_media_type",
                f"the body must be JSON sent with 'Content-Type: application/json' "
                f"(got {content_type or 'no content type'!r})",
            )
        return error_response(422, "invalid_input", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's 400 is a body it could not parse as JSON (not UTF-8, nested too deeply,
            # an integer too long to convert): malformed JSON, 422 like any other
            return error_response(
                422, "invalid_input", "request body is not valid JSON (it must be UTF-8, nested "
                "at most a few hundred levels, with numbers of sane size)")
        kind = _STATUS_TYPES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    # Anything else is a bug: service.middleware.InternalErrorMiddleware answers 500 with
    # INTERNAL_ERROR_MESSAGE (never the exception's text) and keeps the connection.
