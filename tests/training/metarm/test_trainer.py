"""MetaRM: the exact update, the toy distribution shift, config, cancel and resume."""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.callbacks import TrainingCancelled
from training.metarm.config import MetaRMConfig
from training.metarm.trainer import MetaRMTrainer
from training.reward_model import RewardModel

POSITIVE = ["good", "great", "excellent", "wonderful", "happy", "love", "nice"]
NEGATIVE = ["bad", "awful", "terrible", "horrible", "sad", "hate", "poor"]
FILLER = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
SYMBOLS = [
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "+",
    "-",
    "*",
    "/",
    "=",
    "(",
    ")",
    "[",
    "]",
]


def _words(rng: random.Random, vocabulary: list[str], n: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def source_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Learnable preferences: the chosen response carries the positive words."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"what do you think of the {rng.choice(FILLER)}?",
            "chosen": f"{_words(rng, POSITIVE, 4)} {_words(rng, FILLER, 2)}",
            "rejected": f"{_words(rng, NEGATIVE, 4)} {_words(rng, FILLER, 2)}",
        }
        for _ in range(n)
    ]


def shifted_samples(n: int, k: int = 4, seed: int = 1) -> list[dict]:
    """A different surface distribution: arithmetic-looking prompts and responses."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"compute {_words(rng, SYMBOLS, 3)}",
            "responses": [_words(rng, SYMBOLS, 6) for _ in range(k)],
        }
        for _ in range(n)
    ]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _rewards(rm: RewardModel, items: list[dict[str, str]]) -> torch.Tensor:
    return rm.forward(rm.pad(rm.encode_many(items)))


def _hand_objective(rm: RewardModel, samples: list[dict], scale=1.0) -> torch.Tensor:
    total = 0.0
    for row in samples:
        rewards = _rewards(rm, [{"prompt": row["prompt"], "response": s} for s in row["responses"]])
        rewards = rewards / scale
        k = len(rewards)
        pairs = itertools.combinations(range(k), 2)
        total = total + 2.0 / k**2 * sum(
            torch.sigmoid((rewards[i] - rewards[j]).abs()) for i, j in pairs
        )
    return total / len(samples)


def _hand_scale(rm: RewardModel, pairs: list[dict[str, str]]) -> torch.Tensor:
    items = [{"prompt": p["prompt"], "response": p[side]} for side in ("chosen", "rejected")
             for p in pairs]
    return _rewards(rm, items).std(unbiased=False)


def _hand_bt_loss(rm: RewardModel, pairs: list[dict[str, str]]) -> torch.Tensor:
    chosen = _rewards(rm, [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs])
    rejected = _rewards(rm, [{"prompt": p["prompt"], "response": p["rejected"]} for p in pairs])
    return -F.logsigmoid(chosen - rejected).mean()


def _hand_step(
    rm_dir: Path, pairs: list, samples: list, *, meta_lr: float, lr: float, update: str,
    standardize: bool = True,
) -> dict[str, torch.Tensor]:
    """φ' = φ + η∇J(φ) with J on rewards / their std on the pairs; then, by hand:
    first_order φ − lr·∇L(φ'); alternating φ' − lr·∇L(φ'); second_order φ − lr·d L(φ'(φ))/dφ."""
    rm = RewardModel.from_pretrained(rm_dir, device="cpu", dtype="float64",
                                     attn_implementation="eager")
    rm.model.eval()  # the trainer runs without dropout by default
    names = [name for name, _ in rm.model.named_parameters()]
    params = list(rm.model.parameters())
    scale = _hand_scale(rm, pairs) if standardize else 1.0
    ascent = torch.autograd.grad(_hand_objective(rm, samples, scale), params, allow_unused=True,
                                 create_graph=update == "second_order")
    ascent = [torch.zeros_like(p) if g is None else g for g, p in zip(ascent, params, strict=True)]
    if update == "second_order":
        shifted = {n: p + meta_lr * g for n, p, g in zip(names, params, ascent, strict=True)}
        loss = -F.logsigmoid(
            rm.forward(rm.pad(rm.encode_many([{"prompt": p["prompt"], "response": p["chosen"]}
                                              for p in pairs])), params=shifted)
            - rm.forward(rm.pad(rm.encode_many([{"prompt": p["prompt"], "response": p["rejected"]}
                                                for p in pairs])), params=shifted)).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return {n: p.detach() - lr * (g if g is not None else torch.zeros_like(p))
                for n, p, g in zip(names, params, grads, strict=True)}
    shifted = RewardModel(copy.deepcopy(rm.model), rm.tokenizer)
    with torch.no_grad():
        for p, g in zip(shifted.model.parameters(), ascent, strict=True):
            p.add_(meta_lr * g)
    shifted_params = list(shifted.model.parameters())
    bt_grad = torch.autograd.grad(_hand_bt_loss(shifted, pairs), shifted_params, allow_unused=True)
    base = rm.model if update == "first_order" else shifted.model
    expected = {}
    for name, p, g in zip(names, base.parameters(), bt_grad, strict=True):
        expected[name] = p.detach() - lr * (g if g is not None else torch.zeros_like(p))
    return expected


def _config(tmp_path: Path, model: Path, **overrides) -> MetaRMConfig:
    values = dict(
        model=str(model),
        output_dir=str(tmp_path / "run"),
        device="cpu",
        seed=0,
        resume=False,
    )
    values.update(overrides)
    return MetaRMConfig(**values)


@pytest.mark.parametrize("model", ["tiny_encoder_rm", "tiny_mean_pooled_rm"])
@pytest.mark.parametrize("update", ["first_order", "second_order", "alternating"])
def test_one_step_equals_the_step_computed_by_hand(request, tmp_path, update, model):
    """Also through a mean-pooled RM (its parameters substituted by name, second order too)."""
    tiny_encoder_rm = request.getfixturevalue(model)
    pairs = source_pairs(3)
    samples = shifted_samples(2, k=4)
    samples.append({"prompt": "compute 1 + 1", "responses": ["2", "3", "= 2"]})  # its own k = 3
    meta_lr, lr = 5.0, 0.5
    config = _config(
        tmp_path,
        tiny_encoder_rm,
        dtype="float64",
        optimizer="sgd",
        learning_rate=lr,
        meta_lr=meta_lr,
        max_grad_norm=None,
        batch_size=len(pairs),
        meta_batch_size=len(samples),
        responses_per_prompt=4,
        max_steps=1,
        update=update,
        meta_max_grad_norm=None,
    )
    result = MetaRMTrainer(config, pairs=pairs, samples=samples).train()

    expected = _hand_step(tiny_encoder_rm, pairs, samples, meta_lr=meta_lr, lr=lr, update=update)
    trained = _params(
        RewardModel.from_pretrained(result.model_dir, device="cpu", dtype="float64").model
    )
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-9, atol=1e-11, msg=name)

    # The ascent matters: the plain BT step from φ lands elsewhere.
    vanilla = _hand_step(tiny_encoder_rm, pairs, samples, meta_lr=0.0, lr=lr, update="first_order")
    moved = max(float((vanilla[n] - expected[n]).abs().max()) for n in expected)
    assert moved > 1e-6


def test_vanilla_is_meta_lr_zero_and_needs_no_samples(tiny_encoder_rm, tmp_path):
    pairs = source_pairs(4)
    config = _config(
        tmp_path,
        tiny_encoder_rm,
        dtype="float64",
        optimizer="sgd",
        learning_rate=0.5,
        meta_lr=0.0,
        max_grad_norm=None,
        batch_size=4,
        max_steps=1,
    )
    result = MetaRMTrainer(config, pairs=pairs).train()
    expected = _hand_step(
        tiny_encoder_rm, pairs, shifted_samples(1), meta_lr=0.0, lr=0.5, update="first_order"
    )
    trained = _params(
        RewardModel.from_pretrained(result.model_dir, device="cpu", dtype="float64").model
    )
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-9, atol=1e-11, msg=name)
    assert "source_accuracy_after" in result.metrics
    assert "shifted_diff_var_after" not in result.metrics  # nothing shifted to measure


def _toy_run(tmp_path: Path, model: Path, name: str, **overrides) -> dict:
    config = _config(
        tmp_path / name,
        model,
        learning_rate=1e-3,
        batch_size=8,
        meta_batch_size=4,
        max_steps=30,
        epochs=100,
        max_grad_norm=None,
        **overrides,
    )
    return (
        MetaRMTrainer(config, pairs=source_pairs(32), samples=shifted_samples(16)).train().metrics
    )


ACCURACY_TOLERANCE = 0.1


def test_toy_shift_what_each_update_rule_does_to_the_standardized_spread(tiny_encoder_rm, tmp_path):
    """Same seed, data order and steps; η = 0 is vanilla Bradley–Terry. Measured on rewards
    standardized by their std on the source pairs (a larger scale alone is not discrimination).

    ``alternating`` (ascent kept) raises the standardized spread of shifted responses far above
    vanilla's at equal source accuracy. The paper's rule at first order (``first_order``) lowers
    it: to first order in η its step is vanilla's plus −lr·η·H_BT·∇J. Which one helps on held-out
    domains is the evidence benchmark's question (README, MetaRM), not this toy's.
    """
    vanilla = _toy_run(tmp_path, tiny_encoder_rm, "vanilla", meta_lr=0.0)
    alternating = _toy_run(tmp_path, tiny_encoder_rm, "alternating", meta_lr=0.1, update="alternating")
    paper = _toy_run(tmp_path, tiny_encoder_rm, "paper", meta_lr=0.1, update="first_order")

    assert vanilla["source_accuracy_after"] >= 0.9  # the source preferences were learned
    for run in (alternating, paper):
        assert abs(run["source_accuracy_after"] - vanilla["source_accuracy_after"]) <= ACCURACY_TOLERANCE
        assert run["shifted_diff_var_before"] == pytest.approx(vanilla["shifted_diff_var_before"])
    assert alternating["shifted_diff_var_after"] > 2 * vanilla["shifted_diff_var_after"]
    assert alternating["shifted_objective_after"] > vanilla["shifted_objective_after"]
    assert paper["shifted_diff_var_after"] < vanilla["shifted_diff_var_after"]


class StopAfter:
    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.seen: list[tuple[int, int]] = []

    def on_progress(self, step: int, total: int, metrics: dict) -> None:
        self.seen.append((step, total))

    def should_stop(self) -> bool:
        return len(self.seen) >= self.steps


def test_cancel_checkpoints_and_resume_matches_an_uninterrupted_run(tiny_encoder_rm, tmp_path):
    pairs, samples = source_pairs(8), shifted_samples(6, k=5)  # k=5 > 4: random subsets
    common = dict(
        learning_rate=1e-3, meta_lr=0.5, batch_size=2, meta_batch_size=2, max_steps=4, checkpoint_every=3
    )
    straight = MetaRMTrainer(
        _config(tmp_path / "straight", tiny_encoder_rm, **common), pairs=pairs, samples=samples
    ).train()

    interrupted = _config(tmp_path / "interrupted", tiny_encoder_rm, resume=True, **common)
    callback = StopAfter(2)
    with pytest.raises(TrainingCancelled) as cancelled:
        MetaRMTrainer(interrupted, callback, pairs=pairs, samples=samples).train()
    assert cancelled.value.step == 2
    assert Path(cancelled.value.checkpoint).is_dir()
    assert callback.seen == [(1, 4), (2, 4)]

    resumed_callback = StopAfter(10)
    resumed = MetaRMTrainer(interrupted, resumed_callback, pairs=pairs, samples=samples).train()
    assert [step for step, _ in resumed_callback.seen] == [3, 4]
    assert resumed.metrics["source_accuracy_before"] == straight.metrics["source_accuracy_before"]

    a = _params(RewardModel.from_pretrained(straight.model_dir, device="cpu").model)
    b = _params(RewardModel.from_pretrained(resumed.model_dir, device="cpu").model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_result_metrics_and_files(tiny_encoder_rm, tmp_path):
    config = _config(tmp_path, tiny_encoder_rm, max_steps=2, batch_size=4, meta_lr=0.1)
    samples = shifted_samples(3)
    result = MetaRMTrainer(config, pairs=source_pairs(6), samples=samples).train()
    assert result.model_dir == Path(config.output_dir) / "model"
    assert (Path(config.output_dir) / "metrics.json").is_file()
    assert result.steps == 2 and len(result.history) == 2
    for key in ("source_accuracy", "shifted_diff_mean", "shifted_diff_var", "shifted_objective"):
        assert f"{key}_before" in result.metrics and f"{key}_after" in result.metrics
    # the "after" diagnostics are those of the saved RM, recomputed here by hand: over every
    # ordered pair i != j of responses to one prompt, E|d| and E[d²], raw and on rewards
    # divided by their std over the source pairs' responses
    saved = RewardModel.from_pretrained(result.model_dir, device="cpu")
    diffs = []
    for row in samples:
        rewards = saved.score([{"prompt": row["prompt"], "response": r} for r in row["responses"]])
        diffs += [a - b for i, a in enumerate(rewards) for j, b in enumerate(rewards) if i != j]
    scale = result.metrics["reward_std"]
    assert result.metrics["shifted_diff_mean_raw_after"] == pytest.approx(
        sum(abs(d) for d in diffs) / len(diffs), rel=1e-3)
    assert result.metrics["shifted_diff_var_raw_after"] == pytest.approx(
        sum(d * d for d in diffs) / len(diffs), rel=1e-3)
    assert result.metrics["shifted_diff_var_after"] == pytest.approx(
        sum(d * d for d in diffs) / len(diffs) / scale**2, rel=1e-3)
    assert 0.375 <= result.metrics["shifted_objective_after"] <= 0.75  # J's range for k = 4
    assert {"bt_loss", "meta_objective"} <= result.history[0].keys()


def test_config_from_dict_names_bad_keys_and_values():
    assert MetaRMConfig.from_dict({"meta_lr": 0.01}).meta_lr == 0.01
    with pytest.raises(ValueError, match="meta_step"):
        MetaRMConfig.from_dict({"meta_step": 1})
    with pytest.raises(ValueError, match="responses_per_prompt"):
        MetaRMConfig.from_dict({"responses_per_prompt": 1})
    with pytest.raises(ValueError, match="update"):
        MetaRMConfig.from_dict({"update": "both"})
    with pytest.warns(DeprecationWarning, match="apply_at"):  # the old key and its values
        assert MetaRMConfig.from_dict({"apply_at": "phi_prime"}).update == "alternating"
    with pytest.raises(ValueError, match="learning_rate"):
        MetaRMConfig.from_dict({"learning_rate": "fast"})


def test_renamed_keys_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'lr' is deprecated, use 'learning_rate'"):
        config = MetaRMConfig.from_dict({"lr": 0.25, "pairs_path": "p.jsonl"})
    assert config.learning_rate == 0.25 and config.pairs_file == "p.jsonl"
    with pytest.raises(ValueError, match="give only learning_rate"):
        MetaRMConfig.from_dict({"lr": 0.25, "learning_rate": 0.5})


def test_meta_lr_without_shifted_samples_is_refused(tiny_encoder_rm, tmp_path):
    config = _config(tmp_path, tiny_encoder_rm, meta_lr=0.1, max_steps=1)
    with pytest.raises(ValueError, match="samples"):
        MetaRMTrainer(
            config, pairs=source_pairs(2), samples=[{"prompt": "x", "responses": ["y"]}]
        ).train()
