"""Models: GET /models (registry + the served RM), POST /models/{name}/aliases/{alias}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.deps import ManagerDep, RegistryDep
from service.errors import MODEL_ERRORS, error_responses
from service.schemas import AliasRequest

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
        "models": registered,
    }


@router.post("/models/{name}/aliases/{alias}")
async def set_alias(
    name: str, alias: str, body: AliasRequest, manager: ManagerDep, registry: RegistryDep
) -> dict[str, Any]:
    """Promote or roll back: point ``alias`` at ``version``. When the served reference
    follows this alias, the new version is loaded off the event loop, warmed and swapped in
    before this call returns; requests in flight finish on the old one."""
    version = await run_in_threadpool(registry.set_alias, name, alias, body.version)
    outcome = None
    if manager.current is None or manager.follows_registry():
        outcome = await run_in_threadpool(manager.check_for_promotion)
    served = _served(manager)
    return {
        "name": name,
        "alias": alias,
        "version": version.version,
        "served": served["model"] if served else None,
        "swap": outcome,
        "swap_error": (manager.swap_error or manager.load_error) if outcome == "failed" else None,
    }
