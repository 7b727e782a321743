"""GET /health (process up) and GET /ready (model loaded and warmed)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ManagerDep
from service.errors import NotReady, error_responses

router = APIRouter()
ready_router = APIRouter(responses=error_responses(503))  # behind the API key, unlike /health


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@ready_router.get("/ready")
async def ready(manager: ManagerDep) -> dict[str, str]:
    """200 once a model is loaded and warmed; ``fallback`` says when it is not the referenced
    version (which could not load)."""
    current = manager.current
    if current is None:
        raise NotReady(manager.load_error or f"loading model {manager.reference!r}")
    body = {"status": "ready", "model": current.label, "precision": current.rm.precision.name}
    if manager.fallback:
        body["fallback"] = manager.fallback
    return body
