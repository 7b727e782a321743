"""Mean-pooled reward models built from a bare encoder: which pooling a load picks, the saved
layout, and that a saved RM scores what Hugging Face's own recipe computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from tests import tiny
from tests.training.test_reward_model import ITEMS, assert_batch_invariant
from training.pooled_encoder import mean_pool, read_layout
from training.reward_model import ModelLoadError, RewardModel

PAIRS = [item for item in ITEMS if "prompt" in item]


def test_auto_pools_an_encoder_trained_with_mean_pooling_by_the_mean(tiny_sentence_encoder):
    rm = RewardModel.from_pretrained(tiny_sentence_encoder, device="cpu", dtype="float32")
    assert rm.pooling == "mean" and not rm.is_decoder
    names = [name for name, _ in rm.model.named_parameters()]
    # no pooler: under DDP a parameter without a gradient stops training
    assert not [n for n in names if "pooler" in n] and "classifier.weight" in names
    assert rm.reward_index == 0 and rm.model.config.num_labels == 1


def test_the_choice_follows_the_encoders_own_pooling_unless_forced(tmp_path: Path,
                                                                   tiny_sentence_encoder):
    cls_trained = tiny.build_sentence_encoder(tmp_path / "cls", pooling="cls")
    plain = tiny.build_sentence_encoder(tmp_path / "plain", pooling=None)
    assert read_layout(str(cls_trained)).pooling == "cls"
    assert read_layout(str(plain)).pooling is None
    assert RewardModel.from_pretrained(cls_trained).pooling == "cls"
    assert RewardModel.from_pretrained(plain).pooling == "cls"
    assert RewardModel.from_pretrained(plain, pooling="mean").pooling == "mean"
    forced = RewardModel.from_pretrained(tiny_sentence_encoder, pooling="cls")
    assert forced.pooling == "cls" and hasattr(forced.model, "bert")  # HF's head over the pooler


def test_a_new_mean_head_is_seeded_and_refused_where_a_trained_head_is_required(
        tiny_sentence_encoder):
    a = RewardModel.from_pretrained(tiny_sentence_encoder, seed=4, dtype="float32")
    b = RewardModel.from_pretrained(tiny_sentence_encoder, seed=4, dtype="float32")
    assert a.score(PAIRS) == pytest.approx(b.score(PAIRS), abs=1e-6)
    with pytest.raises(ModelLoadError, match="no trained reward head"):
        RewardModel.from_pretrained(tiny_sentence_encoder, allow_new_head=False)


def test_the_saved_layout_is_sentence_transformers(tiny_mean_pooled_rm):
    modules = json.loads((tiny_mean_pooled_rm / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense"]
    pooling = json.loads((tiny_mean_pooled_rm / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    head = json.loads((tiny_mean_pooled_rm / "2_Dense" / "config.json").read_text())
    assert head["out_features"] == 1 and head["in_features"] == 32
    layout = read_layout(str(tiny_mean_pooled_rm))
    assert layout.pooling == "mean" and layout.reward_head
    # the encoder alone, complete but for the pooler, which it was built (and trained) without
    _, info = AutoModel.from_pretrained(tiny_mean_pooled_rm, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}
    _, info = AutoModel.from_pretrained(tiny_mean_pooled_rm, output_loading_info=True,
                                        add_pooling_layer=False)
    assert not info["missing_keys"]


def test_a_saved_mean_pooled_rm_scores_what_the_hugging_face_recipe_computes(
        tiny_mean_pooled_rm):
    rm = RewardModel.from_pretrained(tiny_mean_pooled_rm, allow_new_head=False, device="cpu",
                                     dtype="float32")
    assert rm.pooling == "mean"
    scores = rm.score(PAIRS)
    expected = [tiny.mean_pooled_recipe(tiny_mean_pooled_rm, i["prompt"], i["response"])
                for i in PAIRS]
    assert scores == pytest.approx(expected, abs=1e-5)
    # the head reads the mean, not the first token: the first token's score differs
    encoder = AutoModel.from_pretrained(tiny_mean_pooled_rm).eval()
    inputs = rm.pad([rm.encode(PAIRS[0])])
    with torch.inference_mode():
        first = rm.model.classifier(encoder(**inputs).last_hidden_state[:, 0])
    assert float(first) != pytest.approx(scores[0], abs=1e-3)


def test_a_mean_pooled_rm_saved_and_reloaded_scores_identically(tmp_path: Path,
                                                                 tiny_sentence_encoder):
    rm = RewardModel.from_pretrained(tiny_sentence_encoder, seed=2, dtype="float32")
    with torch.no_grad():  # a head that is not its initialisation
        rm.model.classifier.weight.mul_(-3.0)
        rm.model.classifier.bias.fill_(-0.7)
    rm.save_pretrained(tmp_path / "saved")
    reloaded = RewardModel.from_pretrained(tmp_path / "saved", allow_new_head=False, seed=99,
                                           dtype="float32")
    assert reloaded.score(PAIRS) == pytest.approx(rm.score(PAIRS), abs=1e-6)
    expected = [tiny.mean_pooled_recipe(tmp_path / "saved", i["prompt"], i["response"])
                for i in PAIRS]
    assert reloaded.score(PAIRS) == pytest.approx(expected, abs=1e-5)


def test_a_trained_head_keeps_its_pooling(tiny_mean_pooled_rm, tiny_encoder_rm):
    with pytest.raises(ModelLoadError, match="trained with mean pooling"):
        RewardModel.from_pretrained(tiny_mean_pooled_rm, pooling="cls")
    with pytest.raises(ModelLoadError, match="keeps"):
        RewardModel.from_pretrained(tiny_encoder_rm, pooling="mean")


def test_a_causal_lm_is_not_mean_pooled(tiny_policy):
    with pytest.raises(ModelLoadError, match="causal LM"):
        RewardModel.from_pretrained(tiny_policy, pooling="mean")


@pytest.mark.parametrize("pooling", ["auto", "cls"])
def test_a_classifier_scores_exactly_as_before(tiny_encoder_rm, pooling):
    """An imported (or older generalrm) sequence classifier keeps its own head, whatever the
    pooling knob says short of forcing mean."""
    rm = RewardModel.from_pretrained(tiny_encoder_rm, pooling=pooling, dtype="float32")
    assert rm.pooling == "cls"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_encoder_rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_rm)
    with torch.inference_mode():
        expected = [float(model(**tokenizer(i["prompt"], i["response"], return_tensors="pt"))
                          .logits[0, 0]) for i in PAIRS]
    assert rm.score(PAIRS) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mean_pooled_scores_do_not_depend_on_the_batch(tiny_mean_pooled_rm, dtype):
    assert_batch_invariant(RewardModel.from_pretrained(tiny_mean_pooled_rm, dtype=dtype))


def test_the_features_are_the_mean_the_head_reads(tiny_mean_pooled_rm):
    rm = RewardModel.from_pretrained(tiny_mean_pooled_rm, dtype="float32")
    inputs = rm.pad(rm.encode_many(ITEMS))
    rewards, features = rm.forward(inputs, return_features=True)
    head = rm.model.classifier
    assert rewards.tolist() == pytest.approx((features @ head.weight.T + head.bias)[:, 0].tolist(),
                                             abs=1e-5)
    rewards.sum().backward()
    assert head.weight.grad is not None
    assert all(p.grad is not None for p in rm.model.parameters()), "every parameter trains"


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]
