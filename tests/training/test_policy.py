"""Policy: log-likelihoods are right and batch-independent, sampling is seeded, LoRA round-trips."""

from __future__ import annotations

import pytest
import torch

from training.policy import LoraSpec, Policy, keeps_logits_by_mask, kl_estimate

PROMPTS = ["how are you today?", "what does this word mean? it means"]
RESPONSES = ["good great", "a small animal that lives in the forest"]


def manual_logprob(policy: Policy, prompt: str, response: str) -> float:
    """Token by token, no padding: the definition of log π(y|x)."""
    prompt_ids, response_ids = policy.prompt_ids(prompt), policy.response_ids(response)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt_ids) + i - 1, tok]) for i, tok in enumerate(response_ids))


@pytest.mark.parametrize("chat_template", [True, False])
def test_sequence_logprobs_match_the_definition_and_ignore_padding(tiny_policy, chat_template):
    policy = Policy.from_pretrained(tiny_policy, device="cpu", chat_template=chat_template)
    together = policy.sequence_logprobs(PROMPTS, RESPONSES)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        alone = policy.sequence_logprobs([prompt], [response])
        assert alone.item() == pytest.approx(together[i].item(), abs=1e-4)
        assert together[i].item() == pytest.approx(manual_logprob(policy, prompt, response), abs=1e-3)
    assert torch.all(together < 0)
    eos = policy.tokenizer.eos_token_id
    assert (policy.response_ids("good")[-1] == eos) == chat_template


def test_logprobs_are_differentiable_and_accept_substituted_parameters(tiny_policy):
    policy = Policy.from_pretrained(tiny_policy, device="cpu", lora=LoraSpec(r=4, alpha=8))
    theta = policy.trainable_parameters()
    assert theta and all("lora_" in name for name in theta)
    total = policy.sequence_logprobs(PROMPTS, RESPONSES).sum()
    grads = torch.autograd.grad(total, list(theta.values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    moved = {n: p.detach() + 0.5 for n, p in theta.items()}
    substituted = policy.sequence_logprobs(PROMPTS, RESPONSES, params=moved)
    assert not torch.allclose(substituted, policy.sequence_logprobs(PROMPTS, RESPONSES).detach())
    with torch.no_grad():  # the substitution is for that call only
        for n, p in theta.items():
            p.copy_(moved[n])
    assert torch.allclose(policy.sequence_logprobs(PROMPTS, RESPONSES), substituted, atol=1e-5)


def test_sampling_is_seeded_and_shaped(tiny_policy):
    policy = Policy.from_pretrained(tiny_policy, device="cpu")
    first = policy.sample(PROMPTS, k=3, max_new_tokens=5, seed=7)
    assert len(first) == 2 and all(len(group) == 3 for group in first)
    assert policy.sample(PROMPTS, k=3, max_new_tokens=5, seed=7) == first
    assert policy.sample(PROMPTS, k=3, max_new_tokens=5, seed=8) != first
    greedy = policy.sample(PROMPTS, k=2, max_new_tokens=5, temperature=0)
    assert all(group[0] == group[1] for group in greedy)


def test_kl_of_a_fresh_lora_adapter_is_zero_and_adapter_round_trips(tiny_policy, tmp_path):
    policy = Policy.from_pretrained(tiny_policy, device="cpu", lora=LoraSpec(r=4, alpha=8))
    samples = [s[0] for s in policy.sample(PROMPTS, k=1, max_new_tokens=5, seed=1)]
    assert kl_estimate(policy, PROMPTS, samples) == pytest.approx(0.0, abs=1e-5)  # B = 0 at init
    with torch.no_grad():
        for p in policy.trainable_parameters().values():
            p.add_(0.3 * torch.randn_like(p))
    assert abs(kl_estimate(policy, PROMPTS, samples)) > 1e-4
    policy.save_pretrained(tmp_path / "adapter", metadata={"domain": "x"})
    reloaded = Policy.from_pretrained(tmp_path / "adapter", device="cpu")
    assert reloaded.is_lora
    assert torch.allclose(reloaded.logprobs_chunked(PROMPTS, RESPONSES),
                          policy.logprobs_chunked(PROMPTS, RESPONSES), atol=1e-5)
    policy.save_pretrained(tmp_path / "merged", merge=True)
    merged = Policy.from_pretrained(tmp_path / "merged", device="cpu")
    assert not merged.is_lora and policy.is_lora  # merging saved a copy, the live policy keeps its adapter
    assert torch.allclose(merged.logprobs_chunked(PROMPTS, RESPONSES),
                          policy.logprobs_chunked(PROMPTS, RESPONSES), atol=1e-4)


def test_response_only_logits_equal_full_logits_in_value_gradient_and_jvp(tiny_policy):
    """The LM head runs only where a response token is predicted (``logits_to_keep``); the
    fallback for models without it computes every position's logits. Both are the same
    function of θ: value, gradient and forward-mode derivative."""
    policy = Policy.from_pretrained(tiny_policy, device="cpu", lora=LoraSpec(r=4, alpha=8))
    assert keeps_logits_by_mask(policy.model)  # peft-wrapped Llama slices by mask
    with torch.no_grad():
        for p in policy.trainable_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
    theta = policy.trainable_parameters()
    tangent = {n: torch.randn_like(p) for n, p in theta.items()}
    batch = policy.encode(PROMPTS, RESPONSES)

    def measured():
        value = policy.batch_logprobs(batch)
        grads = torch.autograd.grad(value.sum(), list(theta.values()))
        params = {n: p.detach() for n, p in theta.items()}
        _, jvp = torch.func.jvp(lambda t: policy.batch_logprobs(batch, t), (params,), (tangent,))
        return value.detach(), grads, jvp

    sliced = measured()
    policy._keeps_logits_by_mask = False
    full = measured()
    assert torch.allclose(sliced[0], full[0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(sliced[1], full[1], strict=True))
    assert torch.allclose(sliced[2], full[2], atol=1e-4)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        assert full[0][i].item() == pytest.approx(manual_logprob(policy, prompt, response), abs=1e-3)


def test_models_without_mask_logits_to_keep_use_full_logits():
    class IntOnly(torch.nn.Module):
        def forward(self, input_ids, logits_to_keep: int = 0):  # the pre-5 transformers form
            raise NotImplementedError

    class NoArgument(torch.nn.Module):
        def forward(self, input_ids):
            raise NotImplementedError

    assert not keeps_logits_by_mask(IntOnly())
    assert not keeps_logits_by_mask(NoArgument())
