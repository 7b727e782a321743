"""RewardModel: batch-invariant scores for encoders and decoders, templates, truncation."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests import tiny
from training.models import resolve_pretrained
from training.reward_model import (
    InputError,
    InputTooLongError,
    ModelLoadError,
    RewardModel,
    strip_repeats,
)

ITEMS = [
    {"prompt": "hello", "response": "good"},
    {"prompt": "what does this word mean? " * 6, "response": "it means a small animal"},
    {"prompt": "the quick brown fox", "response": "jumps over the lazy dog " * 3},
    {"messages": [{"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]},
    {"prompt": "", "response": "bad awful terrible"},
]


# The batch-invariance contract per precision (README, "How scoring works"): fp32 to 1e-4
# absolute; bf16 autocast (CPU, canonical shapes) to 1 % of the spread of the scores.
FP32_TOLERANCE = 1e-4
BF16_SHARE_OF_SPREAD = 0.01


def assert_batch_invariant(rm: RewardModel, items=ITEMS) -> None:
    together = rm.score(items, batch_size=len(items))
    alone = [rm.score([item])[0] for item in items]
    reversed_batch = rm.score(items[::-1], batch_size=len(items))[::-1]
    spread = float(torch.tensor(alone).std())
    tolerance = FP32_TOLERANCE if rm.autocast_dtype is None else BF16_SHARE_OF_SPREAD * spread
    assert together == pytest.approx(alone, abs=tolerance)
    assert reversed_batch == pytest.approx(alone, abs=tolerance)
    # the items differ, so equal scores would mean the model ignores its input
    assert len({round(s, 5) for s in alone}) == len(alone)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_encoder_scores_do_not_depend_on_the_batch(tiny_encoder_rm, dtype):
    assert_batch_invariant(RewardModel.from_pretrained(tiny_encoder_rm, dtype=dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_decoder_scores_do_not_depend_on_the_batch(tiny_decoder_rm, dtype):
    rm = RewardModel.from_pretrained(tiny_decoder_rm, dtype=dtype)
    assert rm.is_decoder
    assert rm.tokenizer.pad_token == rm.tokenizer.eos_token  # the model shipped without one
    assert_batch_invariant(rm)


def test_decoder_without_chat_template_scores_do_not_depend_on_the_batch(tmp_path):
    rm = RewardModel.from_pretrained(tiny.build_decoder_rm(tmp_path, chat_template=False))
    assert_batch_invariant(rm)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_minilm_scores_do_not_depend_on_the_batch(dtype):
    rm = RewardModel.from_pretrained(resolve_pretrained("minilm"), dtype=dtype)
    assert_batch_invariant(rm)


def test_bf16_scores_are_computed_in_their_canonical_shape(tiny_encoder_rm):
    rm = RewardModel.from_pretrained(tiny_encoder_rm, dtype="bfloat16", device="cpu")
    assert rm.fixed_shapes and rm.precision.name == "bfloat16 autocast"
    assert not RewardModel.from_pretrained(tiny_encoder_rm, dtype="float32").fixed_shapes
    seen = []
    hook = rm.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape),
                                              with_kwargs=True)
    rm.score([ITEMS[0]])
    hook.remove()
    rows, length = seen[0]
    assert length % 32 == 0 and length > len(rm.encode(ITEMS[0])) and rows * length >= 512


def test_decoder_pools_the_last_real_token_even_when_it_is_the_pad_token(tiny_decoder_rm):
    """With pad == EOS and a template ending in EOS, HF's own pooling picks a wrong token."""
    rm = RewardModel.from_pretrained(tiny_decoder_rm, dtype="float32")
    encoded = rm.encode(ITEMS[0])
    ids = encoded.input_ids
    assert ids[-1] == rm.tokenizer.pad_token_id

    with torch.inference_mode():
        logits = rm.model(input_ids=torch.tensor([ids])).logits  # HF pooling
    ours = rm.score_ids([encoded])[0]
    per_position = []
    hook = rm.model.score.register_forward_hook(lambda m, i, o: per_position.append(o))
    with torch.inference_mode():
        rm.model(input_ids=torch.tensor([ids]))
    hook.remove()
    assert ours == pytest.approx(per_position[0][0, -1, 0].item(), abs=1e-6)
    assert ours != pytest.approx(logits[0, 0].item(), abs=1e-6)


def test_chat_template_bos_is_not_duplicated(tiny_decoder_rm):
    rm = RewardModel.from_pretrained(tiny_decoder_rm)
    ids = rm.encode(ITEMS[3]).input_ids
    bos = rm.tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    assert ids.count(bos) == 1


def test_encoder_uses_prompt_response_pair(tiny_encoder_rm):
    rm = RewardModel.from_pretrained(tiny_encoder_rm)
    encoded = rm.encode({"prompt": "hello", "response": "good"})
    ids, types = encoded.input_ids, encoded.token_type_ids
    tok = rm.tokenizer
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2
    first_sep = ids.index(tok.sep_token_id)
    assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)


@pytest.mark.parametrize("fixture", ["tiny_encoder_rm", "tiny_decoder_rm"])
def test_left_truncation_keeps_the_response(request, fixture):
    rm = RewardModel.from_pretrained(request.getfixturevalue(fixture), max_input_tokens=24)
    item = {"prompt": "the quick brown fox jumps over the lazy dog " * 8, "response": "good great"}
    full = RewardModel.from_pretrained(request.getfixturevalue(fixture), max_input_tokens=128)
    full_ids = full.encode(item).input_ids
    ids = rm.encode(item).input_ids
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
    rewards, features = rm.forward(rm.pad(rm.encode_many(ITEMS[:3])), return_features=True)
    assert rewards.shape == (3,) and features.shape == (3, rm.model.config.hidden_size)
    rewards.sum().backward()
    assert rm.model.classifier.weight.grad is not None


@pytest.mark.parametrize("fixture", ["tiny_encoder_rm", "tiny_decoder_rm"])
def test_batched_encoding_gives_the_same_ids_as_one_by_one(request, fixture):
    rm = RewardModel.from_pretrained(request.getfixturevalue(fixture), max_input_tokens=24)
    assert rm.encode_many(ITEMS) == [rm.encode(item) for item in ITEMS]
    with pytest.raises(InputTooLongError):
        rm.encode_many(ITEMS, truncate=False)


def test_an_encoder_scores_what_hugging_faces_own_forward_computes(tiny_encoder_rm):
    """token_type_ids included: the response is BERT's second segment, as the tokenizer says."""
    rm = RewardModel.from_pretrained(tiny_encoder_rm, device="cpu", dtype="float32")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_encoder_rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_rm)
    for item in ITEMS[:3]:
        with torch.inference_mode():
            expected = model(**tokenizer(item["prompt"], item["response"], return_tensors="pt")).logits
        assert rm.score([item])[0] == pytest.approx(float(expected[0, 0]), abs=1e-5)
    # and the segments matter: without token types the same ids score differently
    encoded = rm.encode(ITEMS[1])
    with torch.inference_mode():
        no_types = model(input_ids=torch.tensor([encoded.input_ids])).logits[0, 0]
    assert float(no_types) != pytest.approx(rm.score([ITEMS[1]])[0], abs=1e-5)


def test_a_decoder_scores_what_hugging_faces_own_forward_computes(tmp_path):
    directory = tiny.build_decoder_rm(tmp_path, chat_template=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.pad_token = "<unk>"  # a pad that is not EOS, so HF's own pooling finds the end
    tokenizer.save_pretrained(directory)
    rm = RewardModel.from_pretrained(directory, device="cpu", dtype="float32")
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    item = ITEMS[3]
    text = tokenizer.apply_chat_template(item["messages"], tokenize=False)
    with torch.inference_mode():
        expected = model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits
    assert rm.score([item])[0] == pytest.approx(float(expected[0, 0]), abs=1e-5)


def test_pad_stripping_is_linear_time():
    assert strip_repeats("[PAD][PAD]hi[PAD]", "[PAD]") == "hi"
    assert strip_repeats("[PAD][PAD]", "[PAD]") == ""
    assert strip_repeats("x[PAD]y", "[PAD]") == "x[PAD]y"
    started = time.perf_counter()
    strip_repeats("[PAD]" * 800_000 + "x", "[PAD]")  # 4 MB: 100 s with a loop of slices
    assert time.perf_counter() - started < 5  # a generous bound: linear takes ~0.1 s


def test_a_causal_lm_is_refused_as_a_served_reward_model(tiny_policy):
    with pytest.raises(ModelLoadError, match="no trained reward head"):
        RewardModel.from_pretrained(tiny_policy, allow_new_head=False)
    RewardModel.from_pretrained(tiny_policy)  # a trainer's backbone: a new head is wanted


def test_a_multi_label_classifier_needs_its_reward_label(tmp_path):
    directory = tiny.build_encoder_rm(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2,
                                                               ignore_mismatched_sizes=True)
    model.config.id2label, model.config.label2id = {0: "bad", 1: "good"}, {"bad": 0, "good": 1}
    model.save_pretrained(directory)
    with pytest.raises(ModelLoadError, match="2 labels"):
        RewardModel.from_pretrained(directory, allow_new_head=False)
    by_name = RewardModel.from_pretrained(directory, allow_new_head=False, reward_label="good",
                                          dtype="float32")
    by_index = RewardModel.from_pretrained(directory, allow_new_head=False, reward_label=1)
    assert by_name.reward_index == by_index.reward_index == 1
    with torch.inference_mode():
        logits = by_name.model(**by_name.pad([by_name.encode(ITEMS[0])])).logits
    assert by_name.score([ITEMS[0]])[0] == pytest.approx(float(logits[0, 1]), abs=1e-6)
    with pytest.raises(ModelLoadError, match="no label"):
        RewardModel.from_pretrained(directory, reward_label="great")


def test_a_directory_without_a_tokenizer_says_so(tmp_path, tiny_encoder_rm):
    bare = tmp_path / "weights-only"
    AutoModelForSequenceClassification.from_pretrained(tiny_encoder_rm).save_pretrained(bare)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        RewardModel.from_pretrained(bare)


def test_a_model_with_its_own_code_needs_trust(tmp_path, tiny_encoder_rm):
    import json
    import shutil

    directory = tmp_path / "remote-code"
    shutil.copytree(tiny_encoder_rm, directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    config["model_type"] = "custom-rm"  # an architecture only its own code knows
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        RewardModel.from_pretrained(directory)
