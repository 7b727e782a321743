"""What a careless or hostile client cannot do: crash a route (500), stall the event loop for
everyone, slip a non-boolean in for a boolean, or read the API's schema without the key."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.service.conftest import live_server
from tests.service.test_api import assert_error, score_body


@pytest.fixture(scope="module")
def server(tiny_encoder_rm):
    with live_server(model=str(tiny_encoder_rm), max_items=8, max_input_tokens=32,
                     max_batch_tokens=256, data_dir="/nonexistent-data-dir") as live:
        yield live


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/score", {"items": [{"prompt": "\ud800", "response": "x"}]}),
        ("/score", {"items": [{"messages": [{"role": "user", "content": "a\udfffb"}]}]}),
        ("/preference", {"items": [{"prompt": "p", "a": "\ud800", "b": "x"}]}),
        ("/get_reward", {"query": ["\ud800 x"]}),
        ("/jobs", {"kind": "train_rm", "spec": {"train_file": "\ud800.jsonl"}}),
        ("/adapt", {"domain": "d", "prompts": ["\udc00"]}),
    ],
)
def test_a_lone_surrogate_is_422_not_500(server, path, body) -> None:
    content = json.dumps(body)  # ASCII JSON with a "\\ud800" escape, as a client may send
    response = httpx.post(f"{server.url}{path}", content=content,
                          headers={"content-type": "application/json"})
    error = assert_error(response, 422, "invalid_input")
    assert "surrogate" in error["message"]


def test_a_nul_byte_in_a_path_is_422(server) -> None:
    body = {"kind": "train_rm", "spec": {"train_file": "examples/prefs.train.jsonl\u0000x"}}
    error = assert_error(httpx.post(f"{server.url}/jobs", json=body), 422, "invalid_spec")
    assert "NUL" in error["message"]


@pytest.mark.parametrize(
    "content",
    [
        b'{"items": [{"prompt": "\xff\xfe", "response": "x"}]}',  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested deeper than the parser goes
        b'{"items": [], "model": ' + b"9" * 100_000 + b"}",  # an integer too long to convert
    ],
)
def test_bodies_that_are_not_json_are_422(server, content) -> None:
    response = httpx.post(f"{server.url}/score", content=content,
                          headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_input")


def test_booleans_are_strict(server) -> None:
    for value in ("no", "false", 0, 1):
        body = {**score_body(1), "truncate": value}
        error = assert_error(httpx.post(f"{server.url}/score", json=body), 422)
        assert "truncate" in error["message"]


def test_an_item_over_the_character_limit_is_refused_before_tokenizing(server) -> None:
    # 64 characters per token of MAX_INPUT_TOKENS=32: 2048 characters
    body = {"items": [{"prompt": "x" * 3000, "response": "y"}]}
    error = assert_error(httpx.post(f"{server.url}/score", json=body), 422)
    assert "GENERALRM_MAX_INPUT_CHARS=2048" in error["message"]
    pads = {"query": ["[PAD]" * 800_000 + "x"]}  # 4 MB of padding: 100 s of event loop before
    started = time.perf_counter()
    assert_error(httpx.post(f"{server.url}/get_reward", json=pads, timeout=60), 422)
    assert time.perf_counter() - started < 10


def test_the_largest_allowed_request_does_not_stall_health(tiny_encoder_rm) -> None:
    """Items at the character limit, with padding to strip, tokenized while /health is polled:
    the event loop stays free (it took 100 s before pads were stripped in linear time and
    large requests were tokenized off the loop)."""
    with live_server(model=str(tiny_encoder_rm), max_items=64, max_input_tokens=512,
                     max_batch_tokens=512 * 64, max_body_bytes=8 << 20) as live:
        query = "[PAD]" * 6500 + "good great"  # ~32 700 characters, under 64 × 512
        body = {"query": [query] * 64}
        worst, done = [0.0], threading.Event()

        def poll() -> None:
            with httpx.Client() as client:
                while not done.is_set():
                    started = time.perf_counter()
                    client.get(f"{live.url}/health")
                    worst[0] = max(worst[0], time.perf_counter() - started)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            response = httpx.post(f"{live.url}/get_reward", json=body, timeout=120)
        finally:
            done.set()
            poller.join()
        assert response.status_code == 200, response.text
        assert len(response.json()["rewards"]) == 64
        assert worst[0] < 1.0, f"/health waited {worst[0]:.2f}s"


def test_an_internal_error_is_a_500_that_echoes_nothing_and_keeps_the_connection(tiny_encoder_rm):
    with live_server(model=str(tiny_encoder_rm)) as live:
        served = live.app.state.models.current

        def broken(*_args, **_kwargs):  # a bug in the model code, not a client mistake
            raise RuntimeError("secret internal detail /srv/private/path")

        served.rm.forward = broken
        with httpx.Client() as client:
            response = client.post(f"{live.url}/score", json=score_body(1))
            error = assert_error(response, 500, "internal_error")
            assert "secret" not in error["message"] and "/srv" not in error["message"]
            assert response.headers.get("connection", "").lower() != "close"
            assert client.get(f"{live.url}/health").status_code == 200


def test_the_schema_and_docs_need_the_key_unless_made_public(tiny_encoder_rm) -> None:
    with live_server(model=str(tiny_encoder_rm), api_key="s3cret") as live:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert_error(httpx.get(f"{live.url}{path}"), 401)
            assert httpx.get(f"{live.url}{path}", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert "/score" in httpx.get(f"{live.url}/openapi.json",
                                     headers={"X-API-Key": "s3cret"}).json()["paths"]
    with live_server(model=str(tiny_encoder_rm), api_key="s3cret", public_docs=True) as live:
        assert httpx.get(f"{live.url}/openapi.json").status_code == 200
