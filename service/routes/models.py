"""Models: GET /models (registry + the served RM), POST /models/{name}/aliases/{alias}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.deps import ManagerDep, RegistryDep
from service.errors import MODEL_ERRORS, error_responses
from service.schemas import AliasRequest
from training.registry import normalize_version

router = APIRouter(responses=error_responses(*MODEL_ERRORS))

def _served(manager) -> dict[str, Any] | None:
    current = manager.current
    if current is None:
        return None
    return {"model": current.label, "reference": manager.reference, "metadata": current.metadata}


@router.get("/models")
async def list_models(manager: ManagerDep, registry: RegistryDep) -> dict[str, Any]:
    registered = await run_in_threadpool(registry.list_models)
    served = _served(manager)
    return {
        "served": served["model"] if served else None,
        "served_reference": manager.reference,
        "swap_error": manager.swap_error,
        "fallback": manager.fallback,
        "models": registered,
    }


@router.post("/models/{name}/aliases/{alias}")
async def set_alias(
    name: str, alias: str, body: AliasRequest, manager: ManagerDep
) -> dict[str, Any]:
    """Promote or roll back: point ``alias`` at ``version``. When the served reference follows
    this alias, the new version is verified, loaded and warmed off the event loop first; the
    alias moves and the new version is swapped in only once it has loaded (409 otherwise, with
    the alias and the served model unchanged). Requests in flight finish on the old one."""
    version = normalize_version(body.version)
    outcome = await run_in_threadpool(manager.promote, name, alias, version)
    served = _served(manager)
    return {
        "name": name,
        "alias": alias,
        "version": version,
        "served": served["model"] if served else None,
        "swap": outcome,
    }
