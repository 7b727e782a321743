"""The real HTTP app on a real uvicorn server with real (tiny and MiniLM) models."""

from __future__ import annotations

import json
import math
import re
import threading

import httpx
import pytest

from tests import tiny
from tests.service.conftest import live_server
from training.reward_model import RewardModel


def score_body(n: int, word: str = "good") -> dict:
    return {"items": [{"prompt": f"prompt {i}", "response": f"{word} " * (i % 5 + 1)} for i in range(n)]}


def assert_error(response: httpx.Response, status: int, error_type: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    if error_type:
        assert error["type"] == error_type
    return error


@pytest.fixture(scope="module")
def encoder_server(tiny_encoder_rm):
    with live_server(model=str(tiny_encoder_rm), max_items=8, max_input_tokens=32, max_batch_tokens=256) as server:
        yield server


def test_score_matches_the_model_scoring_each_item_alone(encoder_server, tiny_encoder_rm):
    body = score_body(6)
    body["items"].append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    response = httpx.post(f"{encoder_server.url}/score", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    rm = RewardModel.from_pretrained(tiny_encoder_rm, max_input_tokens=32)
    alone = [rm.score([item])[0] for item in body["items"]]
    assert payload["rewards"] == pytest.approx(alone, abs=1e-4)
    assert payload["model"].endswith("@pretrained") and payload["usage"]["tokens"] > 0


def test_a_mean_pooled_rm_is_served_with_its_mean(tiny_mean_pooled_rm):
    """/score of a mean-pooled RM generalrm saved: the Hugging Face recipe's number (AutoModel,
    attention-mask mean, the saved 2_Dense head), which the CLS head would not give."""
    items = [{"prompt": f"prompt {i}", "response": "good great " * (i + 1)} for i in range(4)]
    with live_server(model=str(tiny_mean_pooled_rm), dtype="float32", max_input_tokens=128) as server:
        response = httpx.post(f"{server.url}/score", json={"items": items})
        assert response.status_code == 200, response.text
        rewards = response.json()["rewards"]
    expected = [tiny.mean_pooled_recipe(tiny_mean_pooled_rm, i["prompt"], i["response"])
                for i in items]
    assert rewards == pytest.approx(expected, abs=1e-4)
    assert len({round(r, 4) for r in rewards}) == len(rewards)


def test_preference_is_bradley_terry_of_the_two_scores(encoder_server):
    pair = {"prompt": "say something", "a": "good great", "b": "bad awful"}
    result = httpx.post(f"{encoder_server.url}/preference", json={"items": [pair]}).json()["results"][0]
    scores = httpx.post(
        f"{encoder_server.url}/score",
        json={"items": [{"prompt": pair["prompt"], "response": pair["a"]}, {"prompt": pair["prompt"], "response": pair["b"]}]},
    ).json()["rewards"]
    assert [result["reward_a"], result["reward_b"]] == pytest.approx(scores, abs=1e-4)
    assert result["p_a_over_b"] == pytest.approx(1 / (1 + math.exp(scores[1] - scores[0])), abs=1e-6)


def test_get_reward_accepts_openrlhf_body(encoder_server):
    body = {"query": ["hello good", "bad awful"], "prompts": ["hello", "bad"], "labels": ["", ""]}
    response = httpx.post(f"{encoder_server.url}/get_reward", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert len(payload["rewards"]) == 2 and payload["scores"] == payload["rewards"]
    assert payload["extra_logs"] == {}
    assert payload["rewards"][0] != payload["rewards"][1]
    empty = httpx.post(f"{encoder_server.url}/get_reward", json={"query": []}).json()
    assert empty == {"rewards": [], "scores": [], "extra_logs": {}}


def test_models_names_the_served_version(encoder_server):
    payload = httpx.get(f"{encoder_server.url}/models").json()
    scored = httpx.post(f"{encoder_server.url}/score", json=score_body(1)).json()
    assert payload["served"] == scored["model"] == "tiny-encoder-rm0@pretrained"
    assert payload["models"] == []  # nothing trained and registered yet


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"items": []}, "items"),
        (score_body(9), "GENERALRM_MAX_ITEMS=8"),
        ({"items": [{"prompt": "x", "response": 5}]}, "items.0"),
        ({"items": [{"prompt": "x"}]}, "items.0"),
        ({"items": "nope"}, "items"),
        ({"items": [{"prompt": "the quick brown fox " * 40, "response": "x"}], "truncate": False}, "max_input_tokens=32"),
        ({"items": [{"prompt": "x", "response": "y"}], "normalize": True}, "reward statistics"),
    ],
)
def test_client_mistakes_are_422_with_a_message(encoder_server, body, fragment):
    error = assert_error(httpx.post(f"{encoder_server.url}/score", json=body), 422)
    assert fragment in error["message"]


def test_over_long_input_is_truncated_by_default(encoder_server):
    body = {"items": [{"prompt": "the quick brown fox " * 40, "response": "x"}]}
    response = httpx.post(f"{encoder_server.url}/score", json=body)
    assert response.status_code == 200 and response.json()["usage"]["tokens"] == 32


def test_malformed_json_is_a_4xx_with_the_error_shape(encoder_server):
    url = f"{encoder_server.url}/score"
    error = assert_error(httpx.post(url, content=b"{bad json", headers={"content-type": "application/json"}), 422)
    assert "JSON" in error["message"]
    assert_error(httpx.post(url, content=b'{"items": []}', headers={"content-type": "text/plain"}), 415)
    assert_error(httpx.get(f"{encoder_server.url}/nowhere"), 404)
    assert_error(httpx.get(url), 405)


def test_unknown_model_is_404(encoder_server):
    body = {**score_body(1), "model": "someone-else@v9"}
    assert_error(httpx.post(f"{encoder_server.url}/score", json=body), 404, "model_not_found")


def test_body_over_the_limit_is_413(tiny_encoder_rm):
    with live_server(model=str(tiny_encoder_rm), max_body_bytes=2048) as server:
        big = json.dumps({"items": [{"prompt": "x" * 4000, "response": "y"}]}).encode()
        assert_error(httpx.post(f"{server.url}/score", content=big, headers={"content-type": "application/json"}), 413)

        def chunks():  # no Content-Length: the limit must hold while streaming too
            for _ in range(8):
                yield b" " * 1024

        response = httpx.post(f"{server.url}/score", content=chunks(), headers={"content-type": "application/json"})
        assert_error(response, 413, "payload_too_large")
        assert httpx.post(f"{server.url}/score", json=score_body(2)).status_code == 200


def test_api_key_guards_every_route_but_health(tiny_encoder_rm):
    with live_server(model=str(tiny_encoder_rm), api_key="s3cret") as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        for method, path in [("GET", "/ready"), ("GET", "/models"), ("GET", "/metrics"), ("POST", "/score"), ("POST", "/preference"), ("POST", "/get_reward")]:
            error = assert_error(httpx.request(method, f"{server.url}{path}", json={}), 401, "unauthorized")
            assert "GENERALRM_API_KEY" in error["message"]
        wrong = httpx.post(f"{server.url}/score", json=score_body(1), headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401)
        for headers in ({"Authorization": "Bearer s3cret"}, {"X-API-Key": "s3cret"}):
            assert httpx.post(f"{server.url}/score", json=score_body(1), headers=headers).status_code == 200


def test_not_ready_is_503_with_the_reason(tmp_path):
    missing = tmp_path / "no-such-model"
    with live_server(wait=False, model=str(missing)) as server:
        error = assert_error(httpx.get(f"{server.url}/ready"), 503)
        for _ in range(200):  # until the failed load is reported
            error = httpx.get(f"{server.url}/ready").json()["error"]
            if "could not load" in error["message"]:
                break
            threading.Event().wait(0.05)
        assert str(missing) in error["message"]
        assert_error(httpx.post(f"{server.url}/score", json=score_body(1)), 503, "not_ready")
        assert httpx.get(f"{server.url}/health").status_code == 200


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_concurrent_clients_are_batched_and_get_their_own_scores(tiny_decoder_rm):
    with live_server(model=str(tiny_decoder_rm), max_batch_size=64) as server:
        rm = RewardModel.from_pretrained(tiny_decoder_rm)
        bodies = [
            {"items": [{"messages": [{"role": "user", "content": f"client {c} item {i}"}, {"role": "assistant", "content": "good " * (c % 4 + i)}]} for i in range(3)]}
            for c in range(16)
        ]
        expected = [[rm.score([item])[0] for item in body["items"]] for body in bodies]
        results: dict[int, list[float]] = {}
        for _round in range(5):
            barrier = threading.Barrier(len(bodies))

            def call(c: int, barrier: threading.Barrier = barrier) -> None:
                with httpx.Client() as client:
                    barrier.wait()
                    results[c] = client.post(f"{server.url}/score", json=bodies[c]).json()["rewards"]

            threads = [threading.Thread(target=call, args=(c,)) for c in range(len(bodies))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for c in range(len(bodies)):
                assert results[c] == pytest.approx(expected[c], abs=1e-4)
            text = httpx.get(f"{server.url}/metrics").text
            multi = _metric(text, "generalrm_batch_size_count") - _metric(text, 'generalrm_batch_size_bucket{le="1.0"}')
            if multi > 0 and _metric(text, "generalrm_batch_size_sum") > _metric(text, "generalrm_batch_size_count"):
                break
        else:
            pytest.fail("16 concurrent clients were never scored in one batch")


@pytest.mark.slow
def test_full_queue_is_429_with_retry_after_at_once():
    with live_server(model="minilm", max_queue=1, max_batch_size=8) as server:
        body = {"items": [{"prompt": "the quick brown fox " * 25, "response": f"answer {i}"} for i in range(64)]}
        statuses: list[httpx.Response] = []
        lock = threading.Lock()

        def call() -> None:
            with httpx.Client(timeout=120) as client:
                response = client.post(f"{server.url}/score", json=body)
            with lock:
                statuses.append(response)

        for _burst in range(5):
            threads = [threading.Thread(target=call) for _ in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if any(r.status_code == 429 for r in statuses):
                break
        refused = [r for r in statuses if r.status_code == 429]
        assert refused, "a queue of 1 under 12 concurrent 64-item requests never refused"
        assert int(refused[0].headers["Retry-After"]) >= 1
        assert_error(refused[0], 429, "overloaded")
        assert all(r.status_code in (200, 429) for r in statuses)
        assert any(r.status_code == 200 for r in statuses)
