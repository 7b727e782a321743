"""generalrm.client: retries honouring Retry-After (against a small HTTP server of the test's
own that answers 429/503 first), batches split by the server's max_items (against the real
app), typed results and one-line errors."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from generalrm.client import ApiError, AsyncClient, Client, ServerUnreachable
from tests.conftest import free_port
from tests.service.conftest import live_server

SCORE = {"model": "rm@v1", "rewards": [0.5], "usage": {"tokens": 3}}


@contextmanager
def scripted_server(replies: list[tuple[int, dict[str, str], dict]]) -> Iterator[tuple]:
    """Answers POSTs with ``replies`` in turn (status, headers, body), then 200 ``SCORE``;
    yields the server (its ``url``) and the arrival times of the requests."""
    arrivals: list[float] = []
    pending = list(replies)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("content-length", 0)))
            arrivals.append(time.monotonic())
            status, headers, body = pending.pop(0) if pending else (200, {}, SCORE)
            payload = json.dumps(body).encode()
            self.send_response(status)
            for key, value in {"content-type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802 — an old server without /limits
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        yield server, arrivals
    finally:
        server.shutdown()
        server.server_close()


OVERLOADED = (429, {"Retry-After": "1"}, {"error": {"type": "overloaded", "message": "queue full"}})
ITEM = {"prompt": "how are you today?", "response": "good great nice"}


def test_429_is_retried_after_the_retry_after_delay():
    with scripted_server([OVERLOADED]) as (server, arrivals), Client(server.url) as client:
        result = client.score([ITEM])
    assert result.rewards == [0.5] and result.model == "rm@v1" and result.tokens == 3
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.9  # Retry-After: 1 was honoured, not ignored


def test_the_wait_is_capped_and_503_without_a_header_backs_off():
    not_ready = (503, {}, {"error": {"type": "not_ready", "message": "loading"}})
    slow = (429, {"Retry-After": "3600"}, OVERLOADED[2])
    with scripted_server([slow, not_ready]) as (server, arrivals):
        client = Client(server.url, max_retry_wait=0.2)
        assert client.score([ITEM]).rewards == [0.5]
        client.close()
    assert len(arrivals) == 3 and arrivals[-1] - arrivals[0] < 60


def test_retries_run_out_and_the_error_names_status_type_and_message():
    with scripted_server([OVERLOADED] * 3) as (server, arrivals):
        client = Client(server.url, retries=1, max_retry_wait=0.05)
        with pytest.raises(ApiError) as caught:
            client.score([ITEM])
        client.close()
    assert (caught.value.status, caught.value.type, caught.value.message) == (429, "overloaded", "queue full")
    assert len(arrivals) == 2


def test_async_client_retries_too():
    async def run() -> list[float]:
        async with AsyncClient(server.url, max_retry_wait=0.1) as client:
            return (await client.score([ITEM])).rewards

    with scripted_server([OVERLOADED]) as (server, arrivals):
        assert asyncio.run(run()) == [0.5]
    assert len(arrivals) == 2


def test_nothing_listening_is_server_unreachable_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url) as client, pytest.raises(ServerUnreachable, match=url):
        client.list_jobs()


@pytest.fixture(scope="module")
def server(tiny_encoder_rm):
    with live_server(model=str(tiny_encoder_rm), max_items=4) as live:
        yield live


def _items(n: int) -> list[dict]:
    return [{"prompt": f"prompt {i}", "response": "good " * (i % 5 + 1)} for i in range(n)]


def test_batches_larger_than_max_items_are_split_and_joined_in_order(server):
    items = _items(11)  # 3 requests of at most 4
    alone = [httpx.post(f"{server.url}/score", json={"items": [i]}).json()["rewards"][0] for i in items]
    with Client(server.url) as client:
        assert client.limits().max_items == 4
        result = client.score(items)
        assert result.rewards == pytest.approx(alone, abs=1e-4)
        assert result.model.endswith("@pretrained") and result.tokens > 0
        pairs = [{"prompt": "p", "a": "good great", "b": "bad awful"}] * 5  # 10 items: 3 requests
        prefs = client.preference(pairs)
        assert len(prefs.results) == 5 and all(r.p_a_over_b > 0 for r in prefs.results)
        queries = [f"prompt {i} good" for i in range(9)]
        rewards = client.get_reward(queries)
        direct = [httpx.post(f"{server.url}/get_reward", json={"query": [q]}).json()["rewards"][0]
                  for q in queries]
        assert rewards.rewards == pytest.approx(direct, abs=1e-4) and rewards.model == result.model
        assert client.score([]).rewards == [] and client.get_reward([]).rewards == []
        with pytest.raises(ApiError) as caught:
            client.score([{"prompt": "x"}])
        assert caught.value.status == 422


def test_async_client_splits_concurrently_with_the_same_result(server):
    items = _items(10)

    async def run():
        async with AsyncClient(server.url) as client:
            return await client.score(items), await client.preference(
                [{"prompt": "p", "a": "good", "b": "bad"}] * 3)

    scored, prefs = asyncio.run(run())
    with Client(server.url) as client:
        assert scored.rewards == pytest.approx(client.score(items).rewards, abs=1e-4)
    assert len(prefs.results) == 3
