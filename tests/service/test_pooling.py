"""vLLM-style /classify and /pooling, SGLang-style /v1/embeddings, and /get_reward's
re-rendering, on the real app with the tiny decoder RM (it has a chat template)."""

from __future__ import annotations

import math

import httpx
import pytest

from tests.service.conftest import live_server
from tests.service.test_api import assert_error
from training.reward_model import Encoded, RewardModel

CHAT = [{"role": "user", "content": "how are you today?"},
        {"role": "assistant", "content": "good great nice"}]


@pytest.fixture(scope="module")
def decoder_server(tiny_decoder_rm):
    with live_server(model=str(tiny_decoder_rm), max_items=8, max_input_tokens=64,
                     max_batch_tokens=1024) as server:
        yield server


@pytest.fixture(scope="module")
def rm(tiny_decoder_rm) -> RewardModel:
    return RewardModel.from_pretrained(tiny_decoder_rm, max_input_tokens=64)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_classify_a_rendered_text_as_verl_sends_it(decoder_server, rm):
    # veRL's DisRM path: the conversation rendered with the RM's template, BOS removed,
    # "activation": false, reading data[-1]["probs"][-1] as the reward
    rendered = rm.tokenizer.apply_chat_template(CHAT, tokenize=False).removeprefix("<s>")
    body = {"model": None, "input": rendered, "activation": False}
    response = httpx.post(f"{decoder_server.url}/classify", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["object"] == "list" and payload["id"].startswith("classify-")
    assert payload["model"] == httpx.get(f"{decoder_server.url}/ready").json()["model"]
    (data,) = payload["data"]
    assert data["index"] == 0 and data["num_classes"] == 1 and len(data["probs"]) == 1
    assert data["label"] == rm.model.config.id2label[0]
    expected = rm.score_ids([rm.encode_text(rendered)])[0]
    assert data["probs"][-1] == pytest.approx(expected, abs=1e-4)
    usage = payload["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] == len(rm.encode_text(rendered))
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens_details"] is None


def test_classify_applies_sigmoid_by_default_as_vllm_does(decoder_server, rm):
    score = httpx.post(f"{decoder_server.url}/score", json={"items": [{"messages": CHAT}]}).json()
    raw = score["rewards"][0]
    url = f"{decoder_server.url}/classify"
    default = httpx.post(url, json={"messages": CHAT}).json()["data"][0]["probs"][0]
    assert default == pytest.approx(_sigmoid(raw), abs=1e-6)
    for flags, expected in [({"use_activation": False}, raw), ({"use_activation": True}, _sigmoid(raw)),
                            ({"softmax": False}, raw),
                            ({"use_activation": True, "activation": False}, _sigmoid(raw))]:
        probs = httpx.post(url, json={"messages": CHAT, **flags}).json()["data"][0]["probs"]
        assert probs == [pytest.approx(expected, abs=1e-6)], flags


def test_classify_a_list_keeps_order_and_ignores_unknown_vllm_fields(decoder_server, rm):
    texts = ["good great", "bad awful terrible", "hello, how are you?"]
    body = {"input": texts, "use_activation": False, "user": "u1", "priority": 0,
            "request_id": "r-1", "add_special_tokens": True}
    data = httpx.post(f"{decoder_server.url}/classify", json=body).json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    expected = [rm.score_ids([rm.encode_text(t)])[0] for t in texts]
    assert [d["probs"][0] for d in data] == pytest.approx(expected, abs=1e-4)


def test_pooling_and_embeddings_give_the_same_reward(decoder_server, rm):
    text = "good great nice"
    raw = rm.score_ids([rm.encode_text(text)])[0]
    pooled = httpx.post(f"{decoder_server.url}/pooling", json={"input": [text], "task": "classify"})
    assert pooled.status_code == 200, pooled.text
    payload = pooled.json()
    assert payload["id"].startswith("pool-") and payload["data"][0]["object"] == "pooling"
    assert payload["data"][0]["data"] == [pytest.approx(_sigmoid(raw), abs=1e-6)]
    raw_pool = httpx.post(f"{decoder_server.url}/pooling",
                          json={"input": text, "use_activation": False}).json()
    assert raw_pool["data"][0]["data"] == [pytest.approx(raw, abs=1e-4)]
    # SGLang's reward path (veRL reads data[-1]["embedding"][-1])
    embedded = httpx.post(f"{decoder_server.url}/v1/embeddings", json={"model": None, "input": text})
    assert embedded.status_code == 200, embedded.text
    item = embedded.json()["data"][-1]
    assert item["object"] == "embedding" and item["embedding"][-1] == pytest.approx(raw, abs=1e-4)


def test_truncate_prompt_tokens_as_vllm(decoder_server, rm):
    long_text = "the quick brown fox jumps over the lazy dog " * 20
    url = f"{decoder_server.url}/classify"
    error = assert_error(httpx.post(url, json={"input": long_text}), 422, "invalid_input")
    assert "truncate_prompt_tokens" in error["message"]
    kept = httpx.post(url, json={"input": long_text, "truncate_prompt_tokens": 10,
                                 "use_activation": False}).json()
    assert kept["usage"]["prompt_tokens"] == 10
    ids = Encoded(rm.encode_text(long_text).input_ids[-10:])
    assert kept["data"][0]["probs"][0] == pytest.approx(rm.score_ids([ids])[0], abs=1e-4)
    fitted = httpx.post(url, json={"input": long_text, "truncate_prompt_tokens": -1}).json()
    assert fitted["usage"]["prompt_tokens"] == 64


@pytest.mark.parametrize(("path", "body", "fragment"), [
    ("/classify", {"input": "x", "messages": CHAT}, "either"),
    ("/classify", {}, "either"),
    ("/classify", {"input": []}, "empty"),
    ("/classify", {"input": [1, 2, 3]}, "token-id input is not supported"),
    ("/classify", {"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/classify", {"input": ["x"] * 9}, "GENERALRM_MAX_ITEMS=8"),
    ("/pooling", {"input": "x", "task": "embed"}, "classify"),
    ("/pooling", {"input": "x", "encoding_format": "base64"}, "encoding_format"),
    ("/v1/embeddings", {"input": []}, "empty"),
])
def test_pooling_mistakes_are_422(decoder_server, path, body, fragment):
    error = assert_error(httpx.post(f"{decoder_server.url}{path}", json=body), 422)
    assert fragment in error["message"]


def test_a_model_that_is_not_served_is_404(decoder_server):
    response = httpx.post(f"{decoder_server.url}/classify", json={"model": "other", "input": "x"})
    assert_error(response, 404, "model_not_found")


def test_get_reward_rerenders_queries_with_the_rm_template(tiny_decoder_rm):
    prompt = "[INST] how are you today? [/INST] "  # a policy template the RM was not trained on
    body = {"query": [prompt + "good great nice</s>", "<s>" + prompt + "bad awful"],
            "prompts": [prompt, prompt], "labels": [None, None]}
    with live_server(model=str(tiny_decoder_rm), get_reward_rerender=True) as server:
        response = httpx.post(f"{server.url}/get_reward", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["X-Generalrm-Rendering"] == "rerendered"
        expected = httpx.post(f"{server.url}/score", json={"items": [
            {"prompt": prompt, "response": "good great nice"},
            {"prompt": prompt, "response": "bad awful"}]}).json()["rewards"]
        assert response.json()["rewards"] == pytest.approx(expected, abs=1e-4)
        # without prompts the query is scored as sent
        as_sent = httpx.post(f"{server.url}/get_reward", json={"query": body["query"][:1]})
        assert as_sent.headers["X-Generalrm-Rendering"] == "as-sent"
        assert as_sent.json()["rewards"][0] != pytest.approx(expected[0], abs=1e-4)
        wrong = httpx.post(f"{server.url}/get_reward", json={"query": ["abc"], "prompts": ["xyz"]})
        assert "query[0] does not contain prompts[0]" in assert_error(wrong, 422)["message"]
        short = httpx.post(f"{server.url}/get_reward", json={"query": ["abc", "d"], "prompts": ["a"]})
        assert_error(short, 422)
        empty = httpx.post(f"{server.url}/get_reward", json={"query": [], "prompts": []})
        assert empty.json() == {"rewards": [], "scores": [], "extra_logs": {}}


def test_get_reward_scores_queries_as_sent_by_default(decoder_server, rm):
    prompt = "[INST] hi [/INST] "
    response = httpx.post(f"{decoder_server.url}/get_reward",
                          json={"query": [prompt + "good"], "prompts": [prompt]})
    assert response.headers["X-Generalrm-Rendering"] == "as-sent"
    expected = rm.score_ids([rm.encode_text(prompt + "good")])[0]
    assert response.json()["rewards"][0] == pytest.approx(expected, abs=1e-4)


def test_limits_tell_clients_how_to_split(decoder_server):
    limits = httpx.get(f"{decoder_server.url}/limits").json()
    assert limits["max_items"] == 8 and limits["max_input_tokens"] == 64
    assert limits["max_body_bytes"] > 0 and limits["max_queue"] >= 1
