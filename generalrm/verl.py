"""veRL's custom reward function, answered by a generalrm server.

In the veRL trainer config (the file path is this module's; print it with
``python -c "import generalrm.verl as m; print(m.__file__)"``)::

    custom_reward_function.path=/…/site-packages/generalrm/verl.py
    custom_reward_function.name=compute_score          # veRL's default name
    +custom_reward_function.reward_kwargs.url=http://rm-host:8000   # or $GENERALRM_URL

``compute_score`` takes both of veRL's call forms and tells them apart by their keywords:

- one sample (reward managers ``naive``, ``dapo``, ``rate_limited``, ``remote``; ``prime``
  calls it positionally): ``compute_score(data_source, solution_str, ground_truth,
  extra_info=None, **kwargs)`` → ``float``;
- a batch (manager ``batch``): ``compute_score(data_sources=, solution_strs=,
  ground_truths=, extra_infos=, **kwargs)`` → ``list[float]``, in one request (split by the
  client when larger than the server's ``max_items``).

veRL passes no prompt. It is taken from ``extra_info``: the key named by ``prompt_key``
(a reward kwarg), else ``"prompt"``, else ``"question"`` (what veRL's example preprocessing
stores). A string is the user turn; a list of ``{"role", "content"}`` messages is the
conversation, to which the response is appended as the assistant turn; the server renders
either with the RM's own chat template, as ``/score`` does. Without a prompt the response is
scored alone (prompt ``""``). ``data_source`` and ``ground_truth`` are not used: the reward
is the RM's raw score. Other keywords veRL adds (``reward_router_address``, ...) are ignored.

Reward kwargs (``custom_reward_function.reward_kwargs``, or ``reward_model.reward_kwargs``
with the batch manager): ``url``, ``api_key`` (default ``$GENERALRM_API_KEY``), ``model``
(checks which model answers), ``prompt_key``, ``timeout`` (seconds, default 300).

``compute_score_async`` is the same as a coroutine, for veRL's reward loop (it awaits async
reward functions directly): ``custom_reward_function.name=compute_score_async``.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from generalrm.client import AsyncClient, Client, default_url

PROMPT_KEYS = ("prompt", "question")

_clients: dict[tuple[str, str | None, float], Client] = {}
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict] = (
    weakref.WeakKeyDictionary())
_lock = threading.Lock()


def _prompt_of(extra_info: Any, prompt_key: str | None) -> Any:
    if not isinstance(extra_info, Mapping):
        return None
    for key in ((prompt_key,) if prompt_key else ()) + PROMPT_KEYS:
        if extra_info.get(key) is not None:
            return extra_info[key]
    return None


def build_item(solution_str: str, extra_info: Any = None,
               prompt_key: str | None = None) -> dict[str, Any]:
    """The ``/score`` item of one veRL sample (see the module docstring for the prompt)."""
    prompt = _prompt_of(extra_info, prompt_key)
    if isinstance(prompt, Sequence) and not isinstance(prompt, str):
        messages = [dict(m) for m in prompt]
        return {"messages": [*messages, {"role": "assistant", "content": solution_str}]}
    return {"prompt": "" if prompt is None else str(prompt), "response": solution_str}


def _items(kwargs: dict[str, Any], data_source: Any, solution_str: Any,
           extra_info: Any) -> tuple[list[dict[str, Any]], bool]:
    """The items to score and whether this was a batch call."""
    prompt_key = kwargs.get("prompt_key")
    if kwargs.get("solution_strs") is not None:
        solutions = list(kwargs["solution_strs"])
        extras = kwargs.get("extra_infos")
        extras = [None] * len(solutions) if extras is None else list(extras)
        return [build_item(s, e, prompt_key) for s, e in zip(solutions, extras, strict=True)], True
    if solution_str is None:
        raise TypeError("compute_score needs solution_str (one sample) or solution_strs (a batch)")
    return [build_item(solution_str, extra_info, prompt_key)], False


def _settings(kwargs: dict[str, Any]) -> tuple[str, str | None, float]:
    return (str(kwargs.get("url") or default_url()).rstrip("/"), kwargs.get("api_key"),
            float(kwargs.get("timeout", 300.0)))


def _client(kwargs: dict[str, Any]) -> Client:
    key = _settings(kwargs)
    with _lock:  # veRL may call from many threads at once
        if key not in _clients:
            url, api_key, timeout = key
            _clients[key] = Client(url, api_key=api_key, timeout=timeout)
        return _clients[key]


def _async_client(kwargs: dict[str, Any]) -> AsyncClient:
    # an httpx.AsyncClient belongs to the event loop it was made on
    per_loop = _async_clients.setdefault(asyncio.get_running_loop(), {})
    key = _settings(kwargs)
    if key not in per_loop:
        url, api_key, timeout = key
        per_loop[key] = AsyncClient(url, api_key=api_key, timeout=timeout)
    return per_loop[key]


def compute_score(data_source: Any = None, solution_str: str | None = None,
                  ground_truth: Any = None, extra_info: Any = None,
                  **kwargs: Any) -> float | list[float]:
    """veRL's reward: the RM's raw score of each response (a float, or a list for a batch)."""
    items, batch = _items(kwargs, data_source, solution_str, extra_info)
    rewards = _client(kwargs).score(items, model=kwargs.get("model")).rewards
    return rewards if batch else rewards[0]


async def compute_score_async(data_source: Any = None, solution_str: str | None = None,
                              ground_truth: Any = None, extra_info: Any = None,
                              **kwargs: Any) -> float | list[float]:
    """:func:`compute_score` as a coroutine (veRL awaits async reward functions)."""
    items, batch = _items(kwargs, data_source, solution_str, extra_info)
    rewards = (await _async_client(kwargs).score(items, model=kwargs.get("model"))).rewards
    return rewards if batch else rewards[0]
