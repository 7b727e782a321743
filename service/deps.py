"""Dependencies the routes declare through ``Annotated`` aliases."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.engine import ScoringEngine, ServedModel
from service.errors import ModelNotServed, NotReady, Unauthorized
from service.metrics import Metrics
from service.model_manager import ModelManager
from service.settings import ServiceSettings
from training.registry import Registry
from worker.client import JobClient

_bearer = HTTPBearer(auto_error=False)
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_engine(request: Request) -> ScoringEngine:
    return request.app.state.engine


def get_manager(request: Request) -> ModelManager:
    return request.app.state.models


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_jobs(request: Request) -> JobClient:
    return request.app.state.jobs


def get_registry(request: Request) -> Registry:
    return Registry.from_artifacts(request.app.state.settings.artifacts_dir)


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
EngineDep = Annotated[ScoringEngine, Depends(get_engine)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
JobsDep = Annotated[JobClient, Depends(get_jobs)]
RegistryDep = Annotated[Registry, Depends(get_registry)]


def require_api_key(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_api_key_header)],
) -> None:
    """``Authorization: Bearer KEY`` (what OpenAI-style clients send) or ``X-API-Key``."""
    expected = settings.api_key
    if not expected:
        return
    given = bearer.credentials if bearer is not None else header_key
    if not given or not secrets.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized(
            "missing or wrong API key: send 'Authorization: Bearer <GENERALRM_API_KEY>' "
            "or 'X-API-Key: <GENERALRM_API_KEY>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def served_model(manager: ModelManager, requested: str | None) -> ServedModel:
    """The model a request is answered with; it names a model only to check it is served."""
    current = manager.current
    if current is None:
        raise NotReady(manager.load_error or "the reward model is still loading; retry shortly")
    if requested in (None, "", current.name, current.label, manager.reference):
        return current
    raise ModelNotServed(
        f"model {requested!r} is not served here; this server serves {current.label!r} "
        "(omit 'model' or promote the version you want)"
    )
