"""GET /limits — what one request may hold, so clients split larger batches themselves."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ManagerDep, SettingsDep
from service.schemas import Limits

router = APIRouter(tags=["health"])


@router.get("/limits", response_model=Limits)
async def limits(settings: SettingsDep, manager: ManagerDep) -> Limits:
    current = manager.current
    # the served model may allow fewer tokens than the setting (its position embeddings)
    max_input = current.rm.max_input_tokens if current is not None else settings.max_input_tokens
    return Limits(max_items=settings.max_items, max_input_tokens=max_input,
                  max_body_bytes=settings.max_body_bytes, max_queue=settings.max_queue)
