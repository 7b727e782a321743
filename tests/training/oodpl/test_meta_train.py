"""OOD-PL meta-training: hypergradient correctness and that meta-training helps."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests import tiny
from training.callbacks import TrainingCancelled
from training.config import ConfigError
from training.data import PreferencePair as Pair
from training.data import PromptSamples as Samples
from training.oodpl.config import MetaTrainConfig
from training.oodpl.meta_train import MetaTask, MetaTrainer, rm_rewards
from training.policy import LoraSpec, Policy
from training.reward_model import RewardModel

GOOD = ["good great excellent", "happy love nice", "wonderful good love", "great nice happy"]
BAD = ["bad awful terrible", "sad hate poor", "horrible bad hate", "awful poor sad"]
PROMPTS = ["how are you today?", "what does this word mean?", "hello, how are you?",
           "tell me about the fox", "the quick brown fox", "a reward model scores"]


def sentiment_tasks(seed: int = 0) -> list[MetaTask]:
    """Two 'domains' whose right reward is known: positive words beat negative ones."""
    rng = random.Random(seed)
    tasks = []
    for name, prompts in (("a", PROMPTS[:3]), ("b", PROMPTS[3:])):
        samples = [Samples(p, rng.sample(GOOD, 2) + rng.sample(BAD, 2)) for p in prompts]
        pairs = [Pair(s.prompt, s.responses[i], s.responses[2 + j]) for s in samples
                 for i in range(2) for j in range(2)]
        tasks.append(MetaTask(name, samples, pairs))
    return tasks


@pytest.fixture(scope="module")
def float64_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("meta-models")
    return tiny.build_policy(root / "policy", seed=1), tiny.build_encoder_rm(root / "rm", seed=2)


def make_trainer(models, *, lora: bool, dtype: str = "float64", **overrides) -> MetaTrainer:
    policy_dir, rm_dir = models
    values = {"policy": str(policy_dir), "reward_model": str(rm_dir), "dtype": dtype,
              "device": "cpu", "inner_batch_prompts": 2, "outer_batch_pairs": 4,
              "responses_per_prompt": 4, "beta": 0.5, "seed": 3}
    values.update(overrides)
    config = MetaTrainConfig.from_dict(values)
    policy = Policy.from_pretrained(policy_dir, device="cpu", dtype=dtype,
                                    lora=LoraSpec(r=4, alpha=8) if lora else None, seed=3)
    rm = RewardModel.from_pretrained(rm_dir, device="cpu", dtype=dtype, seed=3)
    trainer = MetaTrainer(config, tasks=sentiment_tasks(), reward_model=rm, policy=policy)
    trainer.setup()
    return trainer


def hypergradient(trainer: MetaTrainer, inner, pairs, mode: str, directional: str = "jvp", task=None):
    trainer.config.directional = directional
    trainer._load_theta(trainer.theta0)
    trainer.meta_gradient(inner, pairs, task, mode=mode)
    grad = torch.cat([p.grad.flatten() for p in trainer.phi if p.grad is not None]).clone()
    trainer._load_theta(trainer.theta0)
    return grad


@pytest.mark.parametrize(("lora", "margin"), [(False, "reference"), (True, "reference"), (True, "sum")])
def test_first_order_equals_autograd_through_one_inner_step(float64_models, lora, margin):
    trainer = make_trainer(float64_models, lora=lora, inner_steps=1, inner_lr=0.05, outer_margin=margin)
    inner, pairs = trainer.draw_batches(trainer.tasks[0])
    exact = hypergradient(trainer, inner, pairs, "exact")
    first = hypergradient(trainer, inner, pairs, "first_order", "jvp")
    assert exact.norm() > 0
    assert (first - exact).norm() / exact.norm() <= 1e-4
    finite_difference = hypergradient(trainer, inner, pairs, "first_order", "fd")
    assert (finite_difference - exact).norm() / exact.norm() <= 1e-3


def test_length_normalized_margins_are_per_token_means(float64_models):
    with pytest.warns(DeprecationWarning, match="outer_margin"):  # the old switch still works
        trainer = make_trainer(float64_models, lora=True, pl_length_normalized=True, inner_lr=0.05)
    assert trainer.config.outer_margin == "per_token"
    _, pairs = trainer.draw_batches(trainer.tasks[0])
    policy, n = trainer.policy, len(pairs.prompts)
    encoded = policy.encode(pairs.prompts * 2, pairs.chosen + pairs.rejected)
    with torch.no_grad():
        summed = policy.batch_logprobs(encoded)
        tokens = encoded.response_mask.sum(dim=1).to(summed.dtype)
        assert len(set(tokens.tolist())) > 1  # the check means something only if lengths differ
        expected = summed[:n] / tokens[:n] - summed[n:] / tokens[n:]
        torch.testing.assert_close(trainer.outer_margins(pairs), expected)
    # the first-order hypergradient stays exact at D = 1 under the normalized outer loss
    inner, pairs = trainer.draw_batches(trainer.tasks[1])
    exact = hypergradient(trainer, inner, pairs, "exact")
    first = hypergradient(trainer, inner, pairs, "first_order", "jvp")
    assert exact.norm() > 0 and (first - exact).norm() / exact.norm() <= 1e-4


def test_reference_margins_start_at_zero_and_keep_the_sum_gradient_direction(float64_models):
    trainer = make_trainer(float64_models, lora=False, inner_lr=0.05)
    assert trainer.config.outer_margin == "reference"
    _, pairs = trainer.draw_batches(trainer.tasks[0])
    with torch.no_grad():
        summed = trainer.pl_margins(pairs)
        assert summed.abs().max() > 1e-3  # the check means something only if A(θ_0) ≠ 0
        torch.testing.assert_close(trainer.outer_margins(pairs), torch.zeros_like(summed))
    # at θ_0 every pair sits at σ(0): g = −½·mean ∇A, whatever A(θ_0) was (no saturation)
    params = list(trainer.theta.values())
    loss, _ = trainer.outer_loss(pairs)
    g = torch.cat([x.flatten() for x in trainer._grads(loss, params)])
    mean_margin = trainer.pl_margins(pairs).mean()
    grad_a = torch.cat([x.flatten() for x in trainer._grads(mean_margin, params)])
    torch.testing.assert_close(g, -0.5 * grad_a)


@pytest.mark.parametrize("lora", [False, True])
def test_the_precomputed_hypergradient_is_exact_to_first_order_in_alpha(float64_models, lora):
    # G_i over the task's 12 pairs and an outer batch of the same 12 pairs: the shortcut differs
    # from the exact hypergradient only in taking g at θ_0 instead of θ_1, so the difference is
    # linear in α (measured on these models: relative error 3e-3 → 3e-2 full, 1e-4 → 1e-3 LoRA
    # from α = 1e-5 to 1e-4)
    errors = {}
    for alpha in (1e-5, 1e-4):
        trainer = make_trainer(float64_models, lora=lora, inner_lr=alpha, outer_batch_pairs=12,
                               precompute_pairs=12, hypergradient="precomputed")
        task = trainer.tasks[0]
        inner, pairs = trainer.draw_batches(task)
        exact = hypergradient(trainer, inner, pairs, "exact")
        shortcut = hypergradient(trainer, inner, pairs, "precomputed", task=task)
        errors[alpha] = float((shortcut - exact).norm() / exact.norm())
    assert errors[1e-5] <= 1e-2, errors
    assert 5 <= errors[1e-4] / errors[1e-5] <= 20, errors  # first order: error ∝ α, not 0


def test_a_precomputed_outer_step_runs_no_policy_forward(float64_models):
    trainer = make_trainer(float64_models, lora=True, inner_lr=0.05)
    assert trainer.hypergradient == "precomputed"  # auto, D = 1 without carry
    trainer.precompute()
    calls = []
    hook = trainer.policy.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        metrics = trainer.outer_step(0)
    finally:
        hook.remove()
    assert calls == [] and metrics["hypergrad_norm"] > 0
    assert make_trainer(float64_models, lora=True, inner_steps=2).hypergradient == "first_order"
    assert make_trainer(float64_models, lora=True, carry=True).hypergradient == "first_order"
    with pytest.raises(ConfigError, match="precomputed"):
        MetaTrainConfig.from_dict({"hypergradient": "precomputed", "carry": True})


def test_the_hypergradient_check_compares_with_exact_and_leaves_no_trace(float64_models):
    trainer = make_trainer(float64_models, lora=True, inner_lr=1e-3)
    theta = {n: p.detach().clone() for n, p in trainer.theta.items()}
    phi = [p.detach().clone() for p in trainer.phi]
    rng_state = trainer.rng.getstate()
    report = trainer.check_hypergradient(3)
    assert len(report["cosines"]) == 3 and report["cosine_min"] >= 0.9, report
    assert trainer.rng.getstate() == rng_state
    for name, value in theta.items():
        torch.testing.assert_close(trainer.theta[name].detach(), value, rtol=0, atol=0)
    for p, value in zip(trainer.phi, phi, strict=True):
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0)
        assert p.grad is None


# bf16 autocast against fp32 for the jvp hypergradient (tiny models, fp32 weights): measured
# cosine 0.996-0.9995 and relative error 0.03-0.085 over both tasks, LoRA or full; the
# contract the README states: cosine ≥ 0.95 and relative error ≤ 0.3
BF16_JVP_MIN_COSINE = 0.95
BF16_JVP_MAX_RELATIVE_ERROR = 0.3


@pytest.mark.parametrize("lora", [False, True])
def test_the_jvp_hypergradient_in_bf16_agrees_with_fp32(float64_models, lora, monkeypatch):
    from training import precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)  # bf16 on any CPU
    fp32 = make_trainer(float64_models, lora=lora, dtype="float32", bf16=False, inner_lr=0.05)
    mixed = make_trainer(float64_models, lora=lora, dtype="float32", bf16=True, inner_lr=0.05)
    assert mixed.policy.autocast_dtype is torch.bfloat16 and fp32.policy.autocast_dtype is None
    inner, pairs = fp32.draw_batches(fp32.tasks[0])
    reference = hypergradient(fp32, inner, pairs, "first_order", "jvp")
    approximate = hypergradient(mixed, inner, pairs, "first_order", "jvp")
    cosine = torch.nn.functional.cosine_similarity(approximate, reference, dim=0)
    error = (approximate - reference).norm() / reference.norm()
    assert cosine >= BF16_JVP_MIN_COSINE and error <= BF16_JVP_MAX_RELATIVE_ERROR, (cosine, error)
    # the finite difference runs without autocast even with bf16 on (a bf16 difference is noise),
    # in fp32 from the frozen layers' bf16-stored weights
    with mixed.policy.full_precision():
        assert mixed.policy.autocast_dtype is None
    assert mixed.policy.autocast_dtype is torch.bfloat16
    frozen = [m for m in mixed.policy.model.modules() if isinstance(m, torch.nn.Linear)
              and not m.weight.requires_grad]
    assert all(m.weight.dtype == torch.bfloat16 for m in frozen) and bool(frozen) == lora
    fd_reference = hypergradient(fp32, inner, pairs, "first_order", "fd")
    fd_mixed = hypergradient(mixed, inner, pairs, "first_order", "fd")
    cosine = torch.nn.functional.cosine_similarity(fd_mixed, fd_reference, dim=0)
    assert cosine >= BF16_JVP_MIN_COSINE, cosine


def test_first_order_close_to_exact_over_three_inner_steps(float64_models):
    trainer = make_trainer(float64_models, lora=False, inner_steps=3, inner_lr=1e-3)
    inner, pairs = trainer.draw_batches(trainer.tasks[1])
    exact = hypergradient(trainer, inner, pairs, "exact")
    first = hypergradient(trainer, inner, pairs, "first_order")
    cosine = torch.nn.functional.cosine_similarity(first, exact, dim=0)
    assert cosine >= 0.99
    # and the inner loop really moved θ, so the D = 3 case differs from the D = 1 one
    assert (first - exact).norm() > 0


def _make_rm_prefer_bad(trainer: MetaTrainer) -> None:
    """Start from the worst untrained RM: if it happens to prefer positive words, negate its head."""
    pairs = [p for t in trainer.tasks for p in t.pairs]
    with torch.no_grad():
        chosen = rm_rewards(trainer.rm, [p.prompt for p in pairs], [p.chosen for p in pairs])
        rejected = rm_rewards(trainer.rm, [p.prompt for p in pairs], [p.rejected for p in pairs])
        if (chosen - rejected).mean() > 0:
            trainer.rm.model.classifier.weight.neg_()
            trainer.rm.model.classifier.bias.neg_()


def test_meta_training_raises_outer_pl_accuracy(float64_models, tmp_path):
    trainer = make_trainer(
        float64_models, lora=False, dtype="float32", bf16=False, inner_steps=1, inner_lr=0.5,
        beta=0.1,
        outer_lr=5e-3, outer_steps=12, eval_pairs=12, checkpoint_every=0, inner_batch_prompts=3,
        task_sampling="round_robin",
        output_dir=str(tmp_path / "run"),
    )
    _make_rm_prefer_bad(trainer)
    before = trainer.evaluate()
    result = trainer.train()
    assert result.metrics["outer_pl_accuracy"] > before["outer_pl_accuracy"]
    assert result.metrics["initial_outer_pl_accuracy"] == pytest.approx(before["outer_pl_accuracy"])
    assert result.metrics["initial_outer_loss"] == pytest.approx(before["outer_loss"])
    reloaded = RewardModel.from_pretrained(result.rm_dir, device="cpu", dtype="float32")
    pair = trainer.tasks[0].pairs[0]
    assert reloaded.score([{"prompt": pair.prompt, "response": pair.chosen}])[0] == pytest.approx(
        trainer.rm.score([{"prompt": pair.prompt, "response": pair.chosen}])[0], abs=1e-4)
    assert (Path(result.rm_dir) / "generalrm.json").is_file()


@pytest.mark.parametrize("carry", [False, True])
def test_theta_is_reset_each_outer_step_unless_carried(float64_models, tmp_path, carry):
    trainer = make_trainer(float64_models, lora=True, dtype="float32", outer_steps=2, inner_lr=0.1,
                           carry=carry, checkpoint_every=0, eval_pairs=4,
                           output_dir=str(tmp_path / "run"))
    trainable = [p for p in trainer.policy.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    trainer.train()
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(trainable, before, strict=True))
    assert (moved > 1e-6) if carry else (moved == 0.0)


class StopAfter:
    def __init__(self, steps: int) -> None:
        self.steps, self.seen = steps, 0

    def on_progress(self, step, total, metrics):
        self.seen = step

    def should_stop(self):
        return self.seen >= self.steps


@pytest.mark.parametrize("carry", [False, True])
def test_cancel_checkpoints_and_resume_continues(float64_models, tmp_path, carry):
    overrides = dict(dtype="float32", outer_steps=4, inner_lr=0.1, outer_lr=1e-3, carry=carry,
                     checkpoint_every=0, output_dir=str(tmp_path / "run"), eval_pairs=4)
    straight = make_trainer(float64_models, lora=True, **{**overrides, "output_dir": str(tmp_path / "once")})
    uninterrupted = straight.train()
    trainer = make_trainer(float64_models, lora=True, **overrides)
    trainer.callback = StopAfter(2)
    with pytest.raises(TrainingCancelled) as cancelled:
        trainer.train()
    assert cancelled.value.step == 2
    resumed = make_trainer(float64_models, lora=True, **overrides)
    steps = []
    resumed.callback = type("Record", (), {"on_progress": lambda self, s, t, m: steps.append(s),
                                          "should_stop": lambda self: False})()
    result = resumed.train()
    assert steps == [3, 4]
    assert [h["step"] for h in result.history] == [0, 1, 2, 3, 4]
    # the resumed run is the uninterrupted one: same RM (and, with carry, the same θ went on),
    # same metrics, including the step-0 evaluation made before the cancel
    for name in ("initial_outer_pl_accuracy", "initial_outer_loss", "initial_rm_accuracy", "outer_pl_accuracy",
                 "outer_loss", "rm_accuracy"):
        assert result.metrics[name] == pytest.approx(uninterrupted.metrics[name], abs=1e-6), name
    for mine, theirs in zip(resumed.rm.model.parameters(), straight.rm.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_config_rejects_bad_keys_and_values():
    with pytest.raises(ConfigError, match="inner_stepz"):
        MetaTrainConfig.from_dict({"inner_stepz": 2})
    with pytest.raises(ValueError, match="hypergradient"):
        MetaTrainConfig.from_dict({"hypergradient": "second_order"})
    with pytest.raises(ValueError, match="beta"):
        MetaTrainConfig.from_dict({"beta": 0})
