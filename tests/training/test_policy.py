"""Policy: log-likelihoods are right and batch-independent, sampling is seeded, LoRA round-trips."""

from __future__ import annotations

import pytest
import torch

from training.policy import LoraSpec, Policy, Sample, keeps_logits_by_mask, kl_estimate

PROMPTS = ["how are you today?", "what does this word mean? it means"]
RESPONSES = ["good great", "a small animal that lives in the forest"]


def manual_logprob(policy: Policy, prompt: str, response: str | list[int]) -> float:
    """Token by token, no padding: the definition of log π(y|x) (``response`` as text, or as
    the exact response ids)."""
    prompt_ids = policy.prompt_ids(prompt)
    response_ids = policy.response_ids(response) if isinstance(response, str) else list(response)
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


# ---------------------------------------------------------------------- samples keep their ids
@pytest.mark.parametrize("chat_template", [True, False])
def test_a_samples_log_prob_is_the_sum_of_its_sampled_tokens_log_probs(tiny_policy, chat_template):
    """generate() run again with the same seed yields the same tokens; the log-softmax of
    the logits it sampled them from, summed up to and including EOS, is log π of the sample."""
    policy = Policy.from_pretrained(tiny_policy, device="cpu", chat_template=chat_template)
    prompt, k, new = PROMPTS[0], 6, 12
    (samples,) = policy.sample_responses([prompt], k, max_new_tokens=new, seed=3)
    prompt_ids = torch.tensor([policy.prompt_ids(prompt)])
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        out = policy.model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=True,
            temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=k, max_new_tokens=new,
            pad_token_id=policy.tokenizer.pad_token_id, eos_token_id=policy.tokenizer.eos_token_id,
            return_dict_in_generate=True, output_logits=True)
    step_logp = torch.log_softmax(torch.stack(out.logits, dim=1).double(), dim=-1)
    measured = policy.logprobs_chunked([prompt] * k, samples)
    for i, sample in enumerate(samples):
        n = len(sample.token_ids)
        assert list(sample.token_ids) == out.sequences[i, prompt_ids.shape[1]:][:n].tolist()
        expected = sum(float(step_logp[i, t, tok]) for t, tok in enumerate(sample.token_ids))
        assert measured[i].item() == pytest.approx(expected, abs=1e-3)
        assert measured[i].item() == pytest.approx(manual_logprob(policy, prompt, list(sample.token_ids)),
                                                   abs=1e-3)


@pytest.mark.parametrize("chat_template", [True, False])
def test_truncated_samples_get_no_eos_and_finished_ones_end_at_their_first(tiny_policy, chat_template):
    policy = Policy.from_pretrained(tiny_policy, device="cpu", chat_template=chat_template)
    eos, new = policy.tokenizer.eos_token_id, 16
    groups = policy.sample_responses(PROMPTS, 8, max_new_tokens=new, seed=5)
    samples = [s for group in groups for s in group]
    prompts = [p for p, group in zip(PROMPTS, groups, strict=True) for _ in group]
    finished = [s for s in samples if s.finished]
    truncated = [s for s in samples if not s.finished]
    assert finished and truncated  # the random tiny LM emits EOS now and then: both kinds occur
    for s in truncated:
        assert len(s.token_ids) == new and eos not in s.token_ids
    for s in finished:  # nothing after the first EOS: the padding generate() adds is not kept
        assert s.token_ids[-1] == eos and s.token_ids.count(eos) == 1 and len(s.token_ids) <= new
    batch = policy.encode(prompts, samples)
    for i, s in enumerate(samples):  # the batch holds exactly the sampled ids, no EOS appended
        response = batch.input_ids[i][batch.response_mask[i].bool()].tolist()
        assert response == list(s.token_ids)
    texts = [s.text for s in samples]
    assert policy.sample(PROMPTS, 8, max_new_tokens=new, seed=5) == [texts[i:i + 8] for i in (0, 8)]
    if chat_template:  # the text path would have given every truncated sample an EOS
        assert all(policy.response_ids(s.text)[-1] == eos for s in truncated)


def test_a_sample_that_re_tokenizes_differently_keeps_its_sampled_ids_log_prob(tiny_policy):
    policy = Policy.from_pretrained(tiny_policy, device="cpu")
    tok = policy.tokenizer
    # "good" is one token (or two) for the tokenizer; spelled letter by letter it is other ids
    spelled = tuple(tok.convert_tokens_to_ids(list("good")))
    assert tok.decode(list(spelled)) == "good" and list(spelled) != tok("good", add_special_tokens=False)["input_ids"]
    constructed = Sample("good", spelled, finished=False)
    groups = policy.sample_responses(PROMPTS, 4, max_new_tokens=8, seed=2)
    sampled = [(p, s) for p, group in zip(PROMPTS, groups, strict=True) for s in group]
    differ = [(p, s) for p, s in sampled if policy.response_ids(s.text) != list(s.token_ids)]
    assert differ  # random tokens decode to text that splits (and ends) otherwise
    for prompt, sample in [(PROMPTS[0], constructed), *differ]:
        from_ids = policy.logprobs_chunked([prompt], [sample]).item()
        from_text = policy.logprobs_chunked([prompt], [sample.text]).item()
        assert from_ids == pytest.approx(manual_logprob(policy, prompt, list(sample.token_ids)), abs=1e-3)
        assert from_text == pytest.approx(manual_logprob(policy, prompt, sample.text), abs=1e-3)
        assert from_ids != pytest.approx(from_text, abs=1e-3)


def test_kl_estimate_on_samples_uses_their_ids(tiny_policy):
    policy = Policy.from_pretrained(tiny_policy, device="cpu", lora=LoraSpec(r=4, alpha=8))
    groups = policy.sample_responses(PROMPTS, 3, max_new_tokens=6, seed=4)
    samples = [s for group in groups for s in group]
    prompts = [p for p, group in zip(PROMPTS, groups, strict=True) for _ in group]
    assert kl_estimate(policy, prompts, samples) == pytest.approx(0.0, abs=1e-5)  # B = 0 at init
    with torch.no_grad():
        for p in policy.trainable_parameters().values():
            p.add_(0.3 * torch.randn_like(p))
    adapted = [manual_logprob(policy, p, list(s.token_ids)) for p, s in zip(prompts, samples, strict=True)]
    with policy.reference_mode():
        reference = [manual_logprob(policy, p, list(s.token_ids)) for p, s in zip(prompts, samples, strict=True)]
    expected = sum(a - r for a, r in zip(adapted, reference, strict=True)) / len(samples)
    on_ids = kl_estimate(policy, prompts, samples)
    assert on_ids == pytest.approx(expected, abs=1e-3)
    assert on_ids != pytest.approx(kl_estimate(policy, prompts, [s.text for s in samples]), abs=1e-3)
    # a full fine-tuned policy against a separate reference model takes samples the same way
    full = Policy.from_pretrained(tiny_policy, device="cpu")
    assert kl_estimate(full, prompts, samples, Policy.from_pretrained(tiny_policy, device="cpu")) == 0.0
