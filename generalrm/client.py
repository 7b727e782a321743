"""Python client of the generalrm API: ``Client`` (sync) and ``AsyncClient`` (asyncio), on httpx.

    from generalrm.client import Client

    rm = Client()                       # $GENERALRM_URL (or http://$GENERALRM_HOST:$GENERALRM_PORT)
    rm.score([{"prompt": "What is 2+2?", "response": "4"}]).rewards
    rm.preference([{"prompt": "Say hi.", "a": "Hello!", "b": "No."}]).results[0].p_a_over_b
    rm.submit_job("train_rm", {"train_file": "examples/prefs.train.jsonl"}).job_id
    rm.promote("rm", "v2")              # alias production -> v2; rm.rollback("rm") undoes it

Behaviour shared by both clients:

- **Retries.** 429 (the scoring queue is full) and 503 (the model is loading, or Redis is
  down for job routes) are retried up to ``retries`` times. The wait is the response's
  ``Retry-After`` (seconds or an HTTP date), capped at ``max_retry_wait``; without the header,
  0.5 s doubling up to the same cap. Other errors raise :class:`ApiError` at once.
- **Batches of any size.** The server refuses more than ``max_items`` items per request. The
  client reads that limit once from ``GET /limits`` and splits a larger batch into requests
  of at most that many items (a preference pair counts 2), joined in order. Every request
  after the first names the version that answered the first (``model: name@version``), so one
  call's rewards all come from one model version; if a promotion lands in between, the whole
  batch is scored again once.
- **Errors.** :class:`ApiError` carries the status, the error type and the server's message;
  :class:`ServerUnreachable` names the URL nothing answered at.

Both clients are safe to share between threads / tasks (httpx pools connections).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AliasChange", "ApiError", "AsyncClient", "Client", "GeneralRMError", "Job", "JobAccepted",
    "Limits", "ModelsListing", "PreferenceResults", "RewardResult", "ScoreResult",
    "ServerUnreachable", "default_url",
]

RETRY_STATUSES = frozenset({429, 503})
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
T = TypeVar("T")


# ---------------------------------------------------------------------- errors
class GeneralRMError(Exception):
    """Anything this client raises on purpose."""


class ApiError(GeneralRMError):
    """The server answered with an error: ``status``, ``type`` and ``message`` as it sent them."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(f"{status} {error_type}: {message}")
        self.status, self.type, self.message = status, error_type, message


class ServerUnreachable(GeneralRMError):
    """Nothing answered at ``url`` (not running, wrong address, or the connection broke)."""

    def __init__(self, url: str, cause: Exception) -> None:
        super().__init__(f"no generalrm API answered at {url} ({type(cause).__name__}: {cause})")
        self.url = url


# ---------------------------------------------------------------------- results
class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")  # newer servers may add fields


class ScoreResult(_Result):
    model: str | None = Field(description="name@version that computed the rewards")
    rewards: list[float]
    tokens: int = 0


class Preference(_Result):
    reward_a: float
    reward_b: float
    p_a_over_b: float


class PreferenceResults(_Result):
    model: str | None
    results: list[Preference]
    tokens: int = 0


class RewardResult(_Result):
    """``/get_reward``'s answer; ``model`` is None when the chunks of a split batch were
    answered by different versions (that route cannot pin one)."""

    rewards: list[float]
    scores: list[float]
    model: str | None = None


class Limits(_Result):
    max_items: int
    max_input_tokens: int
    max_body_bytes: int
    max_queue: int


class JobAccepted(_Result):
    job_id: str
    status_url: str
    status: str
    warnings: list[str] = []


class Job(_Result):
    id: str
    kind: str
    status: str
    progress: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    artifacts: dict[str, Any] = {}
    error: dict[str, Any] | None = None
    created_at: str | None = None
    updated_at: str | None = None
    finished_at: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


class ModelVersionInfo(_Result):
    version: str
    reference: str
    path: str
    metadata: dict[str, Any] = {}


class RegisteredModel(_Result):
    name: str
    kind: str
    versions: list[ModelVersionInfo]
    aliases: dict[str, str] = {}


class ModelsListing(_Result):
    served: str | None = None
    served_reference: str | None = None
    swap_error: str | None = None
    models: list[RegisteredModel] = []

    def get(self, name: str) -> RegisteredModel:
        for model in self.models:
            if model.name == name:
                return model
        known = ", ".join(m.name for m in self.models) or "none"
        raise GeneralRMError(f"no model {name!r} in the registry (models: {known})")


class AliasChange(_Result):
    name: str
    alias: str
    version: str
    served: str | None = None
    swap: str | None = Field(None, description="swapped: this server now serves it; null: "
                             "what it serves did not change (a failed load is a 409 ApiError)")


# ---------------------------------------------------------------------- plumbing
def default_url() -> str:
    """``$GENERALRM_URL``, else ``http://$GENERALRM_HOST:$GENERALRM_PORT`` (a wildcard bind
    address means this machine)."""
    url = os.environ.get("GENERALRM_URL")
    if url:
        return url.rstrip("/")
    host = os.environ.get("GENERALRM_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{os.environ.get('GENERALRM_PORT', '8000')}"


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Sleep:
    seconds: float


# A flow is the logic of one client method without I/O: it yields calls (or lists of calls
# that may run concurrently) and sleeps, and receives the responses; the sync and the async
# client each drive it with their own transport.
Flow = Generator["_Call | list[_Call] | _Sleep", Any, T]


def _advance(flow: Flow[Any], reply: Any, error: ApiError | None) -> tuple[bool, Any]:
    """Resume ``flow`` with the last step's reply (or its error): ``(True, result)`` when it
    returned, else ``(False, next step)``."""
    try:
        return False, (flow.throw(error) if error is not None else flow.send(reply))
    except StopIteration as stop:
        return True, stop.value


def _retry_delay(response: httpx.Response, attempt: int, cap: float) -> float:
    header = response.headers.get("Retry-After")
    delay: float | None = None
    if header:
        try:
            delay = float(header)
        except ValueError:
            try:
                delay = (parsedate_to_datetime(header) - datetime.now(UTC)).total_seconds()
            except (TypeError, ValueError):
                delay = None
    if delay is None:
        delay = 0.5 * 2 ** attempt
    return max(0.0, min(delay, cap))


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        error = response.json()["error"]
        raise ApiError(response.status_code, str(error["type"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        raise ApiError(response.status_code, "http_error", response.text[:500]) from None


def _chunks(items: list[Any], size: int | None) -> list[list[Any]]:
    if not size or len(items) <= size:
        return [items]
    return [items[i:i + size] for i in range(0, len(items), size)]


def _item(item: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise TypeError("an item is a mapping: {'prompt', 'response'} or {'messages'}")
    return dict(item)


def _version_number(version: str) -> int:
    return int(version[1:]) if version[1:].isdigit() else 0


class _Flows:
    """The methods' logic, shared by :class:`Client` and :class:`AsyncClient`."""

    url: str
    _limits: Limits | None
    _limits_known: bool

    # -------------------------------------------------------------- limits
    def _max_items(self) -> Flow[int | None]:
        if not self._limits_known:
            try:
                self._limits = Limits.model_validate((yield _Call("GET", "/limits")).json())
            except ApiError as exc:
                if exc.status != 404:  # an older server without /limits: never split
                    raise
            self._limits_known = True
        return self._limits.max_items if self._limits else None

    def _pinned(self, path: str, chunks: list[list[Any]],
                body: Callable[[list[Any], str | None], dict[str, Any]],
                model: str | None) -> Flow[list[dict[str, Any]]]:
        """The chunks' answers, every one from the version that answered the first."""
        for attempt in range(2):
            first = (yield _Call("POST", path, body(chunks[0], model))).json()
            if len(chunks) == 1:
                return [first]
            try:
                rest = yield [_Call("POST", path, body(chunk, first["model"]))
                              for chunk in chunks[1:]]
            except ApiError as exc:
                if exc.status == 404 and exc.type == "model_not_found" and attempt == 0:
                    continue  # a promotion landed between the chunks: all again, on one version
                raise
            return [first, *(response.json() for response in rest)]
        raise AssertionError("unreachable")

    # -------------------------------------------------------------- scoring
    def _score(self, items: Iterable[Mapping[str, Any]], model: str | None, normalize: bool,
               truncate: bool) -> Flow[ScoreResult]:
        items = [_item(i) for i in items]
        if not items:
            return ScoreResult(model=model, rewards=[], tokens=0)
        chunks = _chunks(items, (yield from self._max_items()))
        answers = yield from self._pinned(
            "/score", chunks, lambda chunk, pin: {"items": chunk, "model": pin,
                                                  "normalize": normalize, "truncate": truncate},
            model)
        return ScoreResult(model=answers[0]["model"],
                           rewards=[r for a in answers for r in a["rewards"]],
                           tokens=sum(a["usage"]["tokens"] for a in answers))

    def _preference(self, items: Iterable[Mapping[str, Any]], model: str | None,
                    truncate: bool) -> Flow[PreferenceResults]:
        items = [_item(i) for i in items]
        if not items:
            return PreferenceResults(model=model, results=[], tokens=0)
        limit = yield from self._max_items()
        chunks = _chunks(items, max(1, limit // 2) if limit else None)  # a pair is 2 items
        answers = yield from self._pinned(
            "/preference", chunks,
            lambda chunk, pin: {"items": chunk, "model": pin, "truncate": truncate}, model)
        return PreferenceResults(model=answers[0]["model"],
                                 results=[r for a in answers for r in a["results"]],
                                 tokens=sum(a["usage"]["tokens"] for a in answers))

    def _get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None,
                    labels: Sequence[Any] | None) -> Flow[RewardResult]:
        queries = list(queries)
        if not queries:
            return RewardResult(rewards=[], scores=[])
        size = (yield from self._max_items()) or len(queries)
        spans = [(a, min(a + size, len(queries))) for a in range(0, len(queries), size)]

        def body(a: int, b: int) -> dict[str, Any]:
            payload: dict[str, Any] = {"query": queries[a:b]}
            if prompts is not None:
                payload["prompts"] = list(prompts[a:b])
            if labels is not None:
                payload["labels"] = list(labels[a:b])
            return payload

        responses = yield [_Call("POST", "/get_reward", body(a, b)) for a, b in spans]
        answers = [r.json() for r in responses]
        models = {r.headers.get("X-Generalrm-Model") for r in responses}
        return RewardResult(rewards=[x for a in answers for x in a["rewards"]],
                            scores=[x for a in answers for x in a.get("scores", a["rewards"])],
                            model=models.pop() if len(models) == 1 else None)

    def _limits_flow(self) -> Flow[Limits]:
        self._limits_known = False
        yield from self._max_items()
        if self._limits is None:
            raise GeneralRMError(f"the server at {self.url} has no /limits route (older version)")
        return self._limits

    # -------------------------------------------------------------- jobs
    def _submit_job(self, kind: str, spec: Mapping[str, Any]) -> Flow[JobAccepted]:
        response = yield _Call("POST", "/jobs", {"kind": kind, "spec": dict(spec)})
        return JobAccepted.model_validate(response.json())

    def _get_job(self, job_id: str) -> Flow[Job]:
        return Job.model_validate((yield _Call("GET", f"/jobs/{job_id}")).json())

    def _list_jobs(self, status: str | None, limit: int) -> Flow[list[Job]]:
        params = {"limit": limit, **({"status": status} if status else {})}
        response = yield _Call("GET", "/jobs", params=params)
        return [Job.model_validate(r) for r in response.json()["jobs"]]

    def _cancel_job(self, job_id: str) -> Flow[Job]:
        return Job.model_validate((yield _Call("DELETE", f"/jobs/{job_id}")).json())

    def _wait_for_job(self, job_id: str, interval: float, timeout: float | None,
                      on_update: Callable[[Job], None] | None) -> Flow[Job]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = yield from self._get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout}s")
            yield _Sleep(interval)

    # -------------------------------------------------------------- models
    def _list_models(self) -> Flow[ModelsListing]:
        return ModelsListing.model_validate((yield _Call("GET", "/models")).json())

    def _set_alias(self, name: str, alias: str, version: str | int) -> Flow[AliasChange]:
        response = yield _Call("POST", f"/models/{name}/aliases/{alias}", {"version": version})
        return AliasChange.model_validate(response.json())

    def _rollback(self, name: str, alias: str, to: str | int | None) -> Flow[AliasChange]:
        if to is None:
            model = (yield from self._list_models()).get(name)
            current = model.aliases.get(alias)
            if current is None:
                raise GeneralRMError(f"{name} has no alias {alias!r} to roll back "
                                     f"(aliases: {model.aliases or 'none'})")
            earlier = [v.version for v in model.versions
                       if _version_number(v.version) < _version_number(current)]
            if not earlier:
                raise GeneralRMError(f"{name}:{alias} points at {current}, the oldest version; "
                                     "there is nothing before it to roll back to")
            to = max(earlier, key=_version_number)
        return (yield from self._set_alias(name, alias, to))


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("GENERALRM_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---------------------------------------------------------------------- sync
class Client(_Flows):
    """Blocking client. ``url`` defaults to :func:`default_url`, ``api_key`` to
    ``$GENERALRM_API_KEY``."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 5, max_retry_wait: float = 30.0) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.retries, self.max_retry_wait = retries, max_retry_wait
        self._limits, self._limits_known = None, False
        self._http = httpx.Client(base_url=self.url, headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(call.method, call.path, json=call.json,
                                              params=call.params)
            except httpx.TransportError as exc:
                raise ServerUnreachable(self.url, exc) from None
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                time.sleep(_retry_delay(response, attempt, self.max_retry_wait))
                continue
            return _checked(response)
        raise AssertionError("unreachable")

    def _run(self, flow: Flow[T]) -> T:
        outcome: tuple[Any, ApiError | None] = (None, None)
        while True:
            done, step = _advance(flow, *outcome)
            if done:
                return step
            try:
                if isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                    outcome = (None, None)
                elif isinstance(step, list):
                    outcome = ([self._send(call) for call in step], None)
                else:
                    outcome = (self._send(step), None)
            except ApiError as exc:  # handed to the flow, which may handle it
                outcome = (None, exc)

    def score(self, items: Iterable[Mapping[str, Any]], *, model: str | None = None,
              normalize: bool = False, truncate: bool = True) -> ScoreResult:
        """Rewards of ``{prompt, response}`` / ``{messages}`` items, in order."""
        return self._run(self._score(items, model, normalize, truncate))

    def preference(self, items: Iterable[Mapping[str, Any]], *, model: str | None = None,
                   truncate: bool = True) -> PreferenceResults:
        """P(a ≻ b) of ``{prompt, a, b}`` / ``{messages_a, messages_b}`` pairs."""
        return self._run(self._preference(items, model, truncate))

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None,
                   labels: Sequence[Any] | None = None) -> RewardResult:
        """OpenRLHF's protocol: rewards of full texts (prompt + response)."""
        return self._run(self._get_reward(queries, prompts, labels))

    def limits(self) -> Limits:
        return self._run(self._limits_flow())

    def submit_job(self, kind: str, spec: Mapping[str, Any]) -> JobAccepted:
        return self._run(self._submit_job(kind, spec))

    def get_job(self, job_id: str) -> Job:
        return self._run(self._get_job(job_id))

    def list_jobs(self, *, status: str | None = None, limit: int = 50) -> list[Job]:
        return self._run(self._list_jobs(status, limit))

    def cancel_job(self, job_id: str) -> Job:
        return self._run(self._cancel_job(job_id))

    def wait_for_job(self, job_id: str, *, interval: float = 1.0, timeout: float | None = None,
                     on_update: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job is succeeded, failed or cancelled; ``on_update`` sees each poll."""
        return self._run(self._wait_for_job(job_id, interval, timeout, on_update))

    def list_models(self) -> ModelsListing:
        return self._run(self._list_models())

    def set_alias(self, name: str, alias: str, version: str | int) -> AliasChange:
        return self._run(self._set_alias(name, alias, version))

    def promote(self, name: str, version: str | int, *, alias: str = "production") -> AliasChange:
        """Point ``name:alias`` at ``version``; a server following that alias swaps it in."""
        return self.set_alias(name, alias, version)

    def rollback(self, name: str, *, alias: str = "production",
                 to: str | int | None = None) -> AliasChange:
        """Point ``name:alias`` at ``to``, or at the version just before its current one."""
        return self._run(self._rollback(name, alias, to))


# ---------------------------------------------------------------------- async
class AsyncClient(_Flows):
    """The same methods as :class:`Client`, as coroutines; the chunks of a split batch are
    sent concurrently."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 5, max_retry_wait: float = 30.0) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.retries, self.max_retry_wait = retries, max_retry_wait
        self._limits, self._limits_known = None, False
        self._http = httpx.AsyncClient(base_url=self.url, headers=_headers(api_key),
                                       timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.request(call.method, call.path, json=call.json,
                                                    params=call.params)
            except httpx.TransportError as exc:
                raise ServerUnreachable(self.url, exc) from None
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                await asyncio.sleep(_retry_delay(response, attempt, self.max_retry_wait))
                continue
            return _checked(response)
        raise AssertionError("unreachable")

    async def _run(self, flow: Flow[T]) -> T:
        outcome: tuple[Any, ApiError | None] = (None, None)
        while True:
            done, step = _advance(flow, *outcome)
            if done:
                return step
            try:
                if isinstance(step, _Sleep):
                    await asyncio.sleep(step.seconds)
                    outcome = (None, None)
                elif isinstance(step, list):
                    outcome = (list(await asyncio.gather(*map(self._send, step))), None)
                else:
                    outcome = (await self._send(step), None)
            except ApiError as exc:
                outcome = (None, exc)

    async def score(self, items: Iterable[Mapping[str, Any]], *, model: str | None = None,
                    normalize: bool = False, truncate: bool = True) -> ScoreResult:
        return await self._run(self._score(items, model, normalize, truncate))

    async def preference(self, items: Iterable[Mapping[str, Any]], *, model: str | None = None,
                         truncate: bool = True) -> PreferenceResults:
        return await self._run(self._preference(items, model, truncate))

    async def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None,
                         labels: Sequence[Any] | None = None) -> RewardResult:
        return await self._run(self._get_reward(queries, prompts, labels))

    async def limits(self) -> Limits:
        return await self._run(self._limits_flow())

    async def submit_job(self, kind: str, spec: Mapping[str, Any]) -> JobAccepted:
        return await self._run(self._submit_job(kind, spec))

    async def get_job(self, job_id: str) -> Job:
        return await self._run(self._get_job(job_id))

    async def list_jobs(self, *, status: str | None = None, limit: int = 50) -> list[Job]:
        return await self._run(self._list_jobs(status, limit))

    async def cancel_job(self, job_id: str) -> Job:
        return await self._run(self._cancel_job(job_id))

    async def wait_for_job(self, job_id: str, *, interval: float = 1.0,
                           timeout: float | None = None,
                           on_update: Callable[[Job], None] | None = None) -> Job:
        return await self._run(self._wait_for_job(job_id, interval, timeout, on_update))

    async def list_models(self) -> ModelsListing:
        return await self._run(self._list_models())

    async def set_alias(self, name: str, alias: str, version: str | int) -> AliasChange:
        return await self._run(self._set_alias(name, alias, version))

    async def promote(self, name: str, version: str | int, *,
                      alias: str = "production") -> AliasChange:
        return await self.set_alias(name, alias, version)

    async def rollback(self, name: str, *, alias: str = "production",
                       to: str | int | None = None) -> AliasChange:
        return await self._run(self._rollback(name, alias, to))
