"""generalrm.verl.compute_score called the ways veRL calls it, against a live server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

import generalrm.verl as verl_module
from generalrm.verl import compute_score, compute_score_async
from tests.service.conftest import live_server


@pytest.fixture(scope="module")
def server(tiny_decoder_rm):
    with live_server(model=str(tiny_decoder_rm), max_items=4, max_input_tokens=64,
                     max_batch_tokens=1024) as live:
        yield live


def _score(url: str, items: list[dict]) -> list[float]:
    return httpx.post(f"{url}/score", json={"items": items}).json()["rewards"]


def test_single_sample_form_with_the_prompt_from_extra_info(server):
    info = {"split": "train", "index": 0, "question": "how are you today?"}
    # the naive/dapo managers' keyword call
    reward = compute_score(data_source="openai/gsm8k", solution_str="good great nice",
                           ground_truth="42", extra_info=info, url=server.url)
    expected = _score(server.url, [{"prompt": "how are you today?", "response": "good great nice"}])
    assert isinstance(reward, float) and reward == pytest.approx(expected[0], abs=1e-4)
    # the prime manager's positional call, plus the reward loop's extra keywords
    again = compute_score("openai/gsm8k", "good great nice", "42", info, url=server.url,
                          reward_router_address=None, reward_model_tokenizer=None)
    assert again == pytest.approx(reward, abs=1e-4)


def test_prompt_messages_and_no_prompt(server):
    messages = [{"role": "user", "content": "hello, how are you?"}]
    with_chat = compute_score(None, "I am fine, thank you.", None, {"prompt": messages},
                              url=server.url)
    expected = _score(server.url, [{"messages": [*messages, {"role": "assistant",
                                                             "content": "I am fine, thank you."}]}])
    assert with_chat == pytest.approx(expected[0], abs=1e-4)
    alone = compute_score("src", "I am fine, thank you.", None, None, url=server.url)
    assert alone == pytest.approx(_score(server.url, [{"prompt": "", "response": "I am fine, thank you."}])[0],
                                  abs=1e-4)
    picked = compute_score("src", "good", None, {"problem": "how are you today?", "prompt": "no"},
                           url=server.url, prompt_key="problem")
    assert picked == pytest.approx(_score(server.url, [{"prompt": "how are you today?",
                                                        "response": "good"}])[0], abs=1e-4)


def test_batch_form_as_the_batch_manager_calls_it(server, monkeypatch):
    monkeypatch.setenv("GENERALRM_URL", server.url)  # the URL from the environment this time
    solutions = [f"answer {i} good" for i in range(6)]  # more than max_items=4: split
    extras = np.array([{"question": f"question {i}?", "rollout_reward_scores": {}} for i in range(6)],
                      dtype=object)
    scores = compute_score(data_sources=np.array(["src"] * 6, dtype=object), solution_strs=solutions,
                           ground_truths=[None] * 6, extra_infos=extras)
    expected = [_score(server.url, [{"prompt": f"question {i}?", "response": s}])[0]
                for i, s in enumerate(solutions)]
    assert isinstance(scores, list) and scores == pytest.approx(expected, abs=1e-4)
    assert scores[2] == pytest.approx(
        compute_score(data_source="src", solution_str=solutions[2], ground_truth=None,
                      extra_info=extras[2]), abs=1e-4)


def test_async_form(server):
    async def run():
        one = await compute_score_async("src", "good great", None, {"question": "hi?"}, url=server.url)
        many = await compute_score_async(data_sources=["a", "b"], solution_strs=["good", "bad"],
                                         ground_truths=[None, None], extra_infos=[None, None],
                                         url=server.url)
        return one, many

    one, many = asyncio.run(run())
    assert one == pytest.approx(_score(server.url, [{"prompt": "hi?", "response": "good great"}])[0], abs=1e-4)
    assert many == pytest.approx(_score(server.url, [{"prompt": "", "response": "good"},
                                                     {"prompt": "", "response": "bad"}]), abs=1e-4)


def test_the_readme_one_liner_prints_a_loadable_file():
    printed = subprocess.run([sys.executable, "-c", "import generalrm.verl as m; print(m.__file__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert Path(printed) == Path(verl_module.__file__) and Path(printed).is_file()
    # veRL loads custom_reward_function.path as a file, not as a package import
    import importlib.util

    spec = importlib.util.spec_from_file_location("custom_module", printed)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.compute_score) and callable(module.compute_score_async)
