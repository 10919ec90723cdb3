"""logprobs.token_logps (the chunked LM-head path, HeadLogps) against the naive form:
full (B, T, V) logits, log_softmax, gather. Values and gradients, left and right padding, 32k+ vocab.
On the `device` fixture (TEST_DEVICE, default cpu); weights and inputs are drawn on CPU, then moved."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import batching
import logprobs

VOCAB = 33000  # above 32k, and not a multiple of any chunk size used below


def tiny_llama(device, seed=0, vocab=VOCAB, model_class=LlamaForCausalLM):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return model_class(config).to(device)


def naive_token_logps(model, batch, temperature=1.0):
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    logits = logits[:, -labels.shape[1] - 1:-1] / temperature  # position P-1+j predicts completion token j
    logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logps.masked_fill(labels == -100, 0.0)


def padded_batch(device):
    # prompts of 3, 1 and 2 tokens (left padding), completions of 2, 4 and 1 tokens (right padding);
    # the last token id is the vocabulary's last
    prompts = [[5, 6, 7], [8], [9, 10]]
    completions = [[11, 12], [13, 14, 15, 16], [VOCAB - 1]]
    return batching.collate(prompts, completions, 0, device)


def values_and_grads(fn, model, batch, temperature):
    model.zero_grad()
    logps = fn(model, batch, temperature)
    weights = torch.arange(1.0, 1.0 + logps.numel()).view_as(logps)  # a different gradient at every position
    (logps * weights).sum().backward()
    return logps.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


# 7 scored rows: the softmax kept for the backward, or recomputed there in chunks of 3 rows
LAYOUTS = {"kept": dict(CHUNK_ELEMENTS=2**24, KEEP_ELEMENTS=2**25), "recomputed": dict(CHUNK_ELEMENTS=3 * VOCAB,
                                                                                    KEEP_ELEMENTS=0)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_matches_naive_values_and_gradients(monkeypatch, layout, temperature, device):
    for name, value in LAYOUTS[layout].items():
        monkeypatch.setattr(logprobs.HeadLogps, name, value)
    model, batch = tiny_llama(device), padded_batch(device)
    fast, fast_grads = values_and_grads(logprobs.token_logps, model, batch, temperature)
    naive, naive_grads = values_and_grads(naive_token_logps, model, batch, temperature)
    assert (fast[batch["labels"] == -100] == 0).all()
    assert (fast[batch["labels"] != -100] < 0).all()
    torch.testing.assert_close(fast, naive, rtol=1e-6, atol=1e-6)  # |logp| ~ 10: float32 spacing ~1e-6
    for name, grad in naive_grads.items():  # float32 sums in another order: relative to the gradient's scale
        assert (fast_grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max(), name
    assert "forward" not in vars(model.get_output_embeddings())  # the head is itself again


def test_token_logps_without_grad_matches_naive(device):
    model, batch = tiny_llama(device), padded_batch(device)
    with torch.no_grad():
        torch.testing.assert_close(logprobs.token_logps(model, batch), naive_token_logps(model, batch),
                                   rtol=1e-6, atol=1e-6)


def test_a_forward_without_grad_keeps_no_softmax(monkeypatch, device):
    # the model's weights require grad, but under no_grad (a reference, a rollout's scoring) nothing will call
    # the backward: the logits go through chunks of CHUNK_ELEMENTS, never one kept (N, V) softmax
    monkeypatch.setattr(logprobs.HeadLogps, "CHUNK_ELEMENTS", 3 * VOCAB)
    buffers = []
    chunk_buffer = logprobs.HeadLogps.chunk_buffer
    monkeypatch.setattr(logprobs.HeadLogps, "chunk_buffer",
                        staticmethod(lambda *a: buffers.append(chunk_buffer(*a)) or buffers[-1]))
    model, batch = tiny_llama(device), padded_batch(device)
    with torch.no_grad():
        logprobs.token_logps(model, batch)
    logprobs.token_logps(model, batch)
    n = int((batch["labels"] != -100).sum())
    assert [len(b) for b in buffers] == [3, n]  # no grad: 3 rows at a time; with grad: all n kept


@pytest.mark.parametrize("layout", LAYOUTS)
def test_head_logps_with_bias_matches_naive(monkeypatch, layout, device):
    for name, value in LAYOUTS[layout].items():
        monkeypatch.setattr(logprobs.HeadLogps, name, value)
    torch.manual_seed(0)
    hidden, weight, bias = (torch.randn(*shape).to(device).requires_grad_() for shape in ((5, 8), (VOCAB, 8), (VOCAB,)))
    labels = torch.tensor([0, 7, VOCAB - 1, 123, 7], device=device)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], device=device)
    fast, entropy = logprobs.HeadLogps.apply(hidden, weight, bias, labels, 2.0)
    assert entropy.numel() == 0  # not asked for
    fast_grads = torch.autograd.grad((fast * upstream).sum(), (hidden, weight, bias))
    naive = (F.linear(hidden, weight, bias) / 2.0).log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    naive_grads = torch.autograd.grad((naive * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-5)
    for got, want in zip(fast_grads, naive_grads, strict=True):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


class ScaledLlama(LlamaForCausalLM):
    """A model that changes its head's output after the head, as Gemma-2's soft-capping does."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2 * out.logits
        return out


def test_model_that_transforms_its_logits_is_scored_plainly(device):
    plain, model = tiny_llama(device), tiny_llama(device, model_class=ScaledLlama)  # the same weights
    batch = padded_batch(device)
    with torch.no_grad():
        torch.testing.assert_close(logprobs.token_logps(model, batch), naive_token_logps(model, batch),
                                   rtol=1e-6, atol=1e-6)
        # and not the head's own log-probs, which would ignore the doubling
        assert not torch.allclose(logprobs.token_logps(model, batch), logprobs.token_logps(plain, batch))


def test_plain_path_divides_bf16_logits_by_the_temperature_in_float32(device):
    # the plain path (a model that changes its head's output) at T = 0.7 in bf16 must score as the head path
    # does: bf16 logits, upcast, then / T. Dividing in bf16 first rounds the scaled logits (errors ~1e-3;
    # the tolerance, ~1e-5 on log-probs ~10, is about 10 float32 spacings)
    model = tiny_llama(device, model_class=ScaledLlama).to(torch.bfloat16)
    batch = padded_batch(device)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[:, -batch["labels"].shape[1] - 1:-1]
        expected = (logits.float() / 0.7).log_softmax(-1).gather(-1, batch["labels"].clamp(min=0)[..., None])
        expected = expected.squeeze(-1).masked_fill(batch["labels"] == -100, 0.0)
        torch.testing.assert_close(logprobs.token_logps(model, batch, 0.7), expected, rtol=1e-6, atol=1e-6)


def test_the_naive_reference_beside_the_fast_path_is_this_tests_naive_computation(device):
    model, batch = tiny_llama(device), padded_batch(device)
    with torch.no_grad():
        torch.testing.assert_close(logprobs.naive_token_logps(model, batch, 0.7), naive_token_logps(model, batch, 0.7),
                                   rtol=0, atol=0)


def naive_logps_and_entropy(model, batch, temperature):
    """Full (B, C, V) logits / T, log_softmax: the log-probs gathered, the entropy -sum p log p per position."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, -labels.shape[1] - 1:-1] / temperature
    logp_all = logits.log_softmax(-1)
    logps = logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).masked_fill(labels == -100, 0.0)
    entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(labels == -100, 0.0)
    return logps, entropy.detach()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_and_entropy_match_naive_values_and_gradients(monkeypatch, layout, temperature, device):
    """PPO's and GRPO's update: the log-probs with their exact gradient, the entropy without grad, from chunks."""
    for name, value in LAYOUTS[layout].items():
        monkeypatch.setattr(logprobs.HeadLogps, name, value)
    model, batch = tiny_llama(device), padded_batch(device)
    entropies = []

    def fast(model, batch, temperature):
        logps, entropy = logprobs.logps_and_entropy(model, batch, temperature)
        entropies.append(entropy)
        return logps

    def naive(model, batch, temperature):
        logps, entropy = naive_logps_and_entropy(model, batch, temperature)
        entropies.append(entropy)
        return logps

    fast_logps, fast_grads = values_and_grads(fast, model, batch, temperature)
    naive_logps, naive_grads = values_and_grads(naive, model, batch, temperature)
    torch.testing.assert_close(fast_logps, naive_logps, rtol=0, atol=1e-5)
    for name, grad in naive_grads.items():
        assert (fast_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    assert not entropies[0].requires_grad
    # a random head at V = 33000 is near uniform: entropies just under ln 33000 = 10.40
    assert ((entropies[1] > 10.0) & (entropies[1] < 10.41))[batch["labels"] != -100].all()
    torch.testing.assert_close(entropies[0], entropies[1], rtol=0, atol=1e-5)


def test_entropy_by_hand():
    """Logits [ln 2, 0, 0] (T = 1): p = (1/2, 1/4, 1/4), H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2 = 1.0397208;
    at T = 0.5 the logits are [2 ln 2, 0, 0]: p = (4/6, 1/6, 1/6), H = 2/3 ln 1.5 + 1/3 ln 6 = 0.8675632."""
    hidden, weight = torch.tensor([[1.0]]), torch.tensor([[math.log(2)], [0.0], [0.0]])
    for temperature, expected in ((1.0, 1.0397208), (0.5, 0.8675632)):
        _, entropy = logprobs.HeadLogps.apply(hidden, weight, None, torch.tensor([0]), temperature, True)
        assert abs(float(entropy) - expected) < 1e-6
        assert abs(float(logprobs.chunked_entropy(hidden @ weight.T, temperature)) - expected) < 1e-6


def test_rewritten_head_is_detected_once_and_scored_plainly_with_entropy(device):
    """A model that changes its head's output: found at its first call (one extra forward then), and from
    then on scored from the logits it returns, log-probs and entropies, in one forward."""
    model, batch = tiny_llama(device, model_class=ScaledLlama), padded_batch(device)
    model.padding_free, calls = False, []  # no start-up packing check: its forwards would count too
    model.register_forward_hook(lambda *_: calls.append(1))
    logprobs.token_logps(model, batch)
    assert model.changes_head_output and len(calls) == 2
    logps, entropy = logprobs.logps_and_entropy(model, batch, 0.7)
    assert len(calls) == 3
    naive_logps, naive_entropy = naive_logps_and_entropy(model, batch, 0.7)
    torch.testing.assert_close(logps, naive_logps.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, naive_entropy, rtol=0, atol=1e-5)
    plain = tiny_llama(device)
    logprobs.token_logps(plain, batch)
    assert plain.changes_head_output is False
