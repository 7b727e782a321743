"""RewardModel: batch-invariant scores for encoders and decoders, templates, truncation."""

from __future__ import annotations

import pytest

from training.models import resolve_pretrained
from training.reward_model import InputError, InputTooLongError, RewardModel

ITEMS = [
    {"prompt": "hello", "response": "good"},
    {"prompt": "what does this word mean? " * 6, "response": "it means a small animal"},
    {"prompt": "the quick brown fox", "response": "jumps over the lazy dog " * 3},
    {"messages": [{"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]},
    {"prompt": "", "response": "bad awful terrible"},
]


def assert_batch_invariant(rm: RewardModel, items=ITEMS) -> None:
    together = rm.score(items, batch_size=len(items))
    alone = [rm.score([item])[0] for item in items]
    reversed_batch = rm.score(items[::-1], batch_size=len(items))[::-1]
    assert together == pytest.approx(alone, abs=1e-4)
    assert reversed_batch == pytest.approx(alone, abs=1e-4)
    # the items differ, so equal scores would mean the model ignores its input
    assert len({round(s, 5) for s in alone}) == len(alone)


def test_tiny_encoder_scores_do_not_depend_on_the_batch(tiny_encoder_rm):
    assert_batch_invariant(RewardModel.from_pretrained(tiny_encoder_rm))


def test_tiny_decoder_scores_do_not_depend_on_the_batch(tiny_decoder_rm):
    rm = RewardModel.from_pretrained(tiny_decoder_rm)
    assert rm.is_decoder
    assert rm.tokenizer.pad_token == rm.tokenizer.eos_token  # the model shipped without one
    assert_batch_invariant(rm)


def test_decoder_without_chat_template_scores_do_not_depend_on_the_batch(tmp_path):
    from tests import tiny

    rm = RewardModel.from_pretrained(tiny.build_decoder_rm(tmp_path, chat_template=False))
    assert_batch_invariant(rm)


@pytest.mark.slow
def test_real_minilm_scores_do_not_depend_on_the_batch():
    rm = RewardModel.from_pretrained(resolve_pretrained("minilm"))
    assert_batch_invariant(rm)


def test_decoder_pools_the_last_real_token_even_when_it_is_the_pad_token(tiny_decoder_rm):
    """With pad == EOS and a template ending in EOS, HF's own pooling picks a wrong token."""
    rm = RewardModel.from_pretrained(tiny_decoder_rm)
    ids = rm.encode(ITEMS[0])
    assert ids[-1] == rm.tokenizer.pad_token_id
    import torch

    with torch.inference_mode():
        logits = rm.model(input_ids=torch.tensor([ids])).logits  # HF pooling
    ours = rm.score_ids([ids])[0]
    per_position = []
    hook = rm.model.score.register_forward_hook(lambda m, i, o: per_position.append(o))
    with torch.inference_mode():
        rm.model(input_ids=torch.tensor([ids]))
    hook.remove()
    assert ours == pytest.approx(per_position[0][0, -1, 0].item(), abs=1e-6)
    assert ours != pytest.approx(logits[0, 0].item(), abs=1e-6)


def test_chat_template_bos_is_not_duplicated(tiny_decoder_rm):
    rm = RewardModel.from_pretrained(tiny_decoder_rm)
    ids = rm.encode(ITEMS[3])
    bos = rm.tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    assert ids.count(bos) == 1


def test_encoder_uses_prompt_response_pair(tiny_encoder_rm):
    rm = RewardModel.from_pretrained(tiny_encoder_rm)
    ids = rm.encode({"prompt": "hello", "response": "good"})
    tok = rm.tokenizer
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2


@pytest.mark.parametrize("fixture", ["tiny_encoder_rm", "tiny_decoder_rm"])
def test_left_truncation_keeps_the_response(request, fixture):
    rm = RewardModel.from_pretrained(request.getfixturevalue(fixture), max_input_tokens=24)
    item = {"prompt": "the quick brown fox jumps over the lazy dog " * 8, "response": "good great"}
    full = RewardModel.from_pretrained(request.getfixturevalue(fixture), max_input_tokens=128)
    full_ids = full.encode(item)
    ids = rm.encode(item)
    assert len(full_ids) > 24 and len(ids) == 24
    assert ids[0] == full_ids[0]  # BOS / CLS kept
    assert ids[1:] == full_ids[-23:]  # the end, response included, survives
    response_ids = rm.tokenizer("good great", add_special_tokens=False)["input_ids"]
    assert any(ids[i : i + len(response_ids)] == response_ids for i in range(len(ids)))
    with pytest.raises(InputTooLongError, match="max_input_tokens=24"):
        rm.encode(item, truncate=False)


def test_malformed_items_are_input_errors(tiny_encoder_rm):
    rm = RewardModel.from_pretrained(tiny_encoder_rm)
    for bad in ({"prompt": "x"}, {"messages": []}, {"messages": [{"role": "user"}]}, {"prompt": 1, "response": "x"}):
        with pytest.raises(InputError):
            rm.encode(bad)


def test_training_forward_is_differentiable_and_returns_features(tiny_encoder_rm):
    rm = RewardModel.from_pretrained(tiny_encoder_rm)
    input_ids, mask = rm.pad([rm.encode(item) for item in ITEMS[:3]])
    rewards, features = rm.forward(input_ids, mask, return_features=True)
    assert rewards.shape == (3,) and features.shape == (3, rm.model.config.hidden_size)
    rewards.sum().backward()
    assert rm.model.classifier.weight.grad is not None


@pytest.mark.parametrize("fixture", ["tiny_encoder_rm", "tiny_decoder_rm"])
def test_batched_encoding_gives_the_same_ids_as_one_by_one(request, fixture):
    rm = RewardModel.from_pretrained(request.getfixturevalue(fixture), max_input_tokens=24)
    assert rm.encode_many(ITEMS) == [rm.encode(item) for item in ITEMS]
    with pytest.raises(InputTooLongError):
        rm.encode_many(ITEMS, truncate=False)
