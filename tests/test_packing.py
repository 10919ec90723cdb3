"""Padding-free batches: batching.pack's layout by hand, packed == padded for every script's forwards
(lengths 1 to 60), the start-up check and its fallback, and two runs that differ only in the layout.
On the `device` fixture (TEST_DEVICE, default cpu); the runs go where the scripts put them (CUDA if any), in float32."""
import itertools
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

import batching
import common
import dpo
import kto
import logprobs
import models
import ppo
import reward_models
from conftest import read_metrics

VOCAB = 300
CPU = torch.device("cpu")


def tiny_config():
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


# transformers' sdpa packs into rows with (T x T) block masks; models.packed_sdpa (what load_model gives for
# sdpa) into one row, attention run sequence by sequence
ATTENTION = ["sdpa", models.PACKED_SDPA]


def with_attention(model, attention):
    models.register_packed_sdpa()
    model.set_attn_implementation(attention)
    return model


def tiny_llama(device, seed=0, attention="sdpa"):
    torch.manual_seed(seed)
    return with_attention(LlamaForCausalLM(tiny_config()).to(device), attention)


def tokens(n, offset):
    return [(offset + 7 * i) % (VOCAB - 3) + 3 for i in range(n)]


# pairs with very different lengths: a 1-token prompt, 1-token completions, a 40 + 20 token pair
PAIRS = [dict(prompt=tokens(p, 11 * i), chosen=tokens(c, 13 * i + 1), rejected=tokens(r, 17 * i + 2))
         for i, (p, c, r) in enumerate([(1, 1, 5), (40, 20, 1), (6, 3, 9), (2, 12, 2)])]
SINGLE = [dict(prompt=e["prompt"], completion=e[k], label=k == "chosen") for e in PAIRS for k in ("chosen", "rejected")]


@pytest.fixture
def layout(monkeypatch):
    """layout(fn, *args): fn's outputs padded, then packed, with their gradients as a second forward."""
    monkeypatch.setattr(logprobs, "MIN_PACK_SAVING", 0.0)  # packed whatever packing saves
    def run(fn, *args):
        results = []
        for packed in (False, True):
            monkeypatch.setattr(logprobs, "packs", lambda model: packed)
            results.append(fn(*args))
        return results
    return run


def test_pack_layout_by_hand(device):
    # lengths (prompt + completion): 3 + 2 = 5, 1 + 1 = 2, 2 + 4 = 6; the padded width W = 3 + 4 = 7
    batch = batching.collate([[5, 6, 7], [8], [9, 10]], [[11, 12], [13], [14, 15, 16, 17]], 0, device)
    packed = batching.pack(batch)
    # first fit by decreasing length into rows of at most 7: row 0 = seq 2 (6), row 1 = seq 0 (5) + seq 1 (2)
    assert packed["input_ids"].tolist() == [[9, 10, 14, 15, 16, 17, 0], [5, 6, 7, 11, 12, 8, 13]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 4, 0, 1]]
    # row 1 of the padded batch is [pad pad 8 13 pad pad pad]: 8 and 13 sit at flat positions 7+5 and 7+6
    assert packed["index"].tolist() == [[7, 8, 9, 10, 11, -1, -1], [-1, -1, 12, 13, -1, -1, -1],
                                        [-1, 0, 1, 2, 3, 4, 5]]
    # what transformers makes of it: three sequences and a filler, never one across a boundary
    from transformers.masking_utils import find_packed_sequence_indices
    assert find_packed_sequence_indices(packed["position_ids"]).tolist() == [[0] * 6 + [1], [0] * 5 + [1, 1]]


def test_the_layout_comes_from_the_host_not_the_device(device):
    # pack() and scored_index() read the host's spans and label mask: a device attention mask of zeros, which
    # a layout built from the device would read as empty rows, changes nothing
    batch = batching.collate([[5, 6, 7], [8], [9, 10]], [[11, 12], [13], [14, 15, 16, 17]], 0, device,
                             [None, [0], [1, 0, 1, 1]])
    assert batch["spans"].device.type == "cpu" and batch["spans"].tolist() == [[0, 5], [2, 2], [1, 6]]
    expected = batching.pack(batch)
    batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    packed = batching.pack(batch)
    assert all(torch.equal(packed[k], expected[k]) for k in ("input_ids", "position_ids", "index"))
    rows, columns = logprobs.scored_index(batch)
    assert (rows.tolist(), columns.tolist()) == ([0, 0, 2, 2, 2], [0, 1, 0, 2, 3])  # row 1 unscored, (2, 1) masked


@pytest.mark.parametrize("seed", range(5))
def test_packed_rows_never_exceed_the_padded_batch(seed, device):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 12, (1,), generator=g))
    prompts = [[3] * int(k) for k in torch.randint(1, 300, (n,), generator=g)]
    completions = [[4] * int(k) for k in torch.randint(1, 300, (n,), generator=g)]
    batch = batching.collate(prompts, completions, 0, device)
    (B, W), (R, T) = batch["input_ids"].shape, batching.pack(batch)["input_ids"].shape
    assert R <= B and T <= W and R * T * T <= B * W * W  # activations and the (T x T) mask
    assert (batching.pack(batch)["index"] >= 0).sum() == batch["attention_mask"].sum()  # every token once


def test_a_batch_that_packing_barely_shortens_runs_padded(device, monkeypatch):
    # no padding: 4 rows of 3 + 4 = 7 tokens; packed, still 4 rows of 7: it saves 0 of 28 positions
    flat = batching.collate([[5, 6, 7]] * 4, [[11, 12, 13, 14]] * 4, 0, device)
    assert batching.pack(flat)["input_ids"].shape == (4, 7)
    assert batching.pack(flat, min_saving=logprobs.MIN_PACK_SAVING) is None
    # test_pack_layout_by_hand's batch: 2 rows of 7 instead of 3, it saves 7 of 21 positions, 1/3
    uneven = batching.collate([[5, 6, 7], [8], [9, 10]], [[11, 12], [13], [14, 15, 16, 17]], 0, device)
    assert batching.pack(uneven, min_saving=0.33)["input_ids"].shape == (2, 7)
    assert batching.pack(uneven, min_saving=0.34) is None
    # a model that packs runs the flat batch padded; packed anyway, the log-probs and gradients are the same
    model = tiny_llama(device)
    model.padding_free = False
    padded = values_and_grads(model, lambda: logprobs.token_logps(model, flat))
    model.padding_free, layouts, pack = True, [], batching.pack
    monkeypatch.setattr(logprobs, "pack", lambda batch, **kw: layouts.append(pack(batch, **kw)) or layouts[-1])
    chosen = values_and_grads(model, lambda: logprobs.token_logps(model, flat))
    assert layouts == [None]
    torch.testing.assert_close(chosen[0], padded[0], rtol=0, atol=0)  # the padded forward itself
    monkeypatch.setattr(logprobs, "MIN_PACK_SAVING", 0.0)
    packed = values_and_grads(model, lambda: logprobs.token_logps(model, flat))
    assert layouts[-1]["input_ids"].shape == (4, 7)
    assert_same(padded, packed)


def values_and_grads(model, fn):
    model.zero_grad()
    out = fn()
    (out * torch.arange(1.0, 1.0 + out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(padded, packed):
    (a, a_grads), (b, b_grads) = padded, packed
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-5)  # sequence sums reach ~100: float32 spacing ~8e-6
    assert a_grads.keys() == b_grads.keys()
    for name in a_grads:
        assert (b_grads[name] - a_grads[name]).abs().max() <= 1e-5 * max(1.0, a_grads[name].abs().max()), name


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sft_and_pairwise_token_logps_packed_equal_padded(layout, temperature, attention, device):
    """sft (collate_single), dpo, ld_dpo, simpo, orpo (collate_pairs): training forwards with gradients."""
    model = tiny_llama(device, attention=attention)
    for batch in (batching.collate_single(SINGLE, 0, device), batching.collate_pairs(PAIRS, 0, device)):
        padded, packed = layout(values_and_grads, model, lambda: logprobs.token_logps(model, batch, temperature))
        assert (padded[0][batch["labels"] != -100] < 0).all()
        assert_same(padded, packed)


@pytest.mark.parametrize("attention", ATTENTION)
def test_reference_forwards_packed_equal_padded(layout, attention, device):
    """dpo/ld_dpo's reference and precompute_ref (no grad), kto's matched and mismatched halves."""
    reference = models.frozen(tiny_llama(device, 1, attention))
    pairs = batching.collate_pairs(PAIRS, 0, device)
    with torch.no_grad():
        padded, packed = layout(logprobs.token_logps, reference, pairs)
        torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
        batch = kto.collate_with_mismatched(SINGLE, 0, device)
        for rows in (batch, kto.rows_slice(batch, len(SINGLE), None)):
            padded, packed = layout(lambda b: logprobs.sequence_logps(reference, b)[0], rows)
            torch.testing.assert_close(packed, padded, rtol=1e-6, atol=1e-5)  # sequence sums, as in assert_same
    model = tiny_llama(device, attention=attention)  # and kto's trained forward, on the matched half
    padded, packed = layout(values_and_grads, model, lambda: logprobs.sequence_logps(
        model, kto.rows_slice(batch, 0, len(SINGLE)))[0])
    assert_same(padded, packed)


def reward_model(device, seed=2, attention="sdpa"):
    torch.manual_seed(seed)
    model = reward_models.RewardModel(with_attention(LlamaModel(tiny_config()), attention))
    torch.nn.init.normal_(model.value_head.weight)
    return model.to(device)


@pytest.mark.parametrize("attention", ATTENTION)
def test_reward_and_value_forwards_packed_equal_padded(layout, attention, device):
    """rm.py's last-token rewards (trained) and ppo's per-token values (trained) and scores."""
    model, batch = reward_model(device, attention=attention), batching.collate_pairs(PAIRS, 0, device)
    assert_same(*layout(values_and_grads, model, lambda: logprobs.last_token_outputs(model, batch)))
    mask = batch["labels"] != -100  # values on padding are never read (ppo masks them)
    assert_same(*layout(values_and_grads, model, lambda: ppo.token_values(model, batch) * mask))


@pytest.mark.parametrize("attention", ATTENTION)
def test_ppo_policy_forwards_packed_equal_padded(layout, attention, device):
    """ppo.py: the trained policy's log-probs and entropies, the rollout's old and reference log-probs."""
    policy, batch = tiny_llama(device, attention=attention), batching.collate_single(SINGLE, 0, device)
    padded, packed = layout(values_and_grads, policy, lambda: logprobs.logps_and_entropy(policy, batch, 0.7)[0])
    assert_same(padded, packed)
    with torch.no_grad():
        padded, packed = layout(logprobs.logps_and_entropy, policy, batch, 0.7)
        torch.testing.assert_close(packed[1], padded[1], rtol=0, atol=1e-5)  # entropies
        torch.testing.assert_close(packed[0], logprobs.token_logps(policy, batch, 0.7), rtol=0, atol=1e-5)


def test_packed_sdpa_attends_sequence_by_sequence_in_one_row(device, monkeypatch):
    """One row, its boundaries as ints, and one maskless causal attention per sequence and layer: no (T x T)
    mask, so a sequence of L tokens costs L^2 / 2 wherever it sits."""
    model = tiny_llama(device, attention=models.PACKED_SDPA)
    assert logprobs.one_row(model) == "packed_sdpa"
    batch = batching.collate_pairs(PAIRS, 0, device)
    packed = batching.pack(batch, one_row="packed_sdpa")
    lengths = sorted(batch["spans"][:, 1].tolist(), reverse=True)  # first fit by decreasing length
    assert packed["input_ids"].shape == (1, sum(lengths))
    # ints, not a tensor: FSDP2 would move a tensor to the GPU, and reading it there waits for the device
    assert packed["varlen"] == dict(sequence_bounds=(0, *itertools.accumulate(lengths)))
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        calls.append((query.shape[2], attn_mask, is_causal))
        return sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        logprobs.forward_outputs(model, packed["input_ids"], None, packed["position_ids"], packed["varlen"])
    assert calls == [(n, None, True) for n in lengths] * model.config.num_hidden_layers


@pytest.mark.parametrize("window", [3, 100])
def test_packed_sdpa_keeps_a_sliding_window(window, layout, device):
    """A Mistral-style sliding window of 3 tokens (shorter than most sequences, so it masks) or 100 (longer than
    all): packed log-probs and gradients equal transformers' sdpa on the padded batch and its sliding mask."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window)
    model = with_attention(MistralForCausalLM(config).to(device), models.PACKED_SDPA)
    batch = batching.collate_pairs(PAIRS, 0, device)
    padded, packed = layout(values_and_grads, model, lambda: logprobs.token_logps(model, batch))
    assert_same(padded, packed)
    model.config.sliding_window = 100 if window == 3 else 3  # the other window gives other log-probs
    other = logprobs.token_logps(model, batch).detach()
    assert (other - padded[0]).abs().max() > 1e-3


def test_generation_under_packed_sdpa_equals_sdpa(device):
    """Left-padded prompts and a cache: packed_sdpa is transformers' sdpa, token for token."""
    batch = batching.collate_prompts([dict(prompt=e["prompt"]) for e in PAIRS], 0, device)
    outputs = []
    for attention in ATTENTION:
        model = tiny_llama(device, attention=attention)
        outputs.append(model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      max_new_tokens=12, do_sample=False, pad_token_id=0))
    assert torch.equal(outputs[0], outputs[1]) and outputs[0].shape[1] == batch["input_ids"].shape[1] + 12


def test_load_model_gives_packed_sdpa_for_sdpa(tiny_model, tmp_path):
    assert models.load_model(tiny_model, CPU).config._attn_implementation == models.PACKED_SDPA
    assert models.load_model(tiny_model, CPU, attn_implementation="sdpa").config._attn_implementation == "sdpa"
    assert models.load_model(tiny_model, CPU, attn_implementation="eager").config._attn_implementation == "eager"
    # Llama 4's chunked attention is in its masks, which packed_sdpa does not build: it keeps sdpa
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_chunk_size=4, num_local_experts=2,
    )).save_pretrained(tmp_path / "llama4")
    assert models.load_model(str(tmp_path / "llama4"), CPU).config._attn_implementation == "sdpa"


class IgnoresPositions(LlamaForCausalLM):
    """Attention that ignores position_ids: without a mask, packed sequences would see each other."""

    def forward(self, *args, position_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_start_up_check_packs_a_good_model_and_falls_back_for_one_that_ignores_positions(capsys, device):
    good = tiny_llama(device)
    bad = IgnoresPositions(good.config).to(device)
    bad.load_state_dict(good.state_dict())
    assert logprobs.packs(good) and capsys.readouterr().err == ""
    assert not logprobs.packs(bad)
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "IgnoresPositions pads its batches" in notice
    assert not logprobs.packs(bad) and capsys.readouterr().err == ""  # checked once
    batch = batching.collate_pairs(PAIRS, 0, device)
    with torch.no_grad():  # padded (fallback) scores equal the model scored padded; forced packing would not
        fallback = logprobs.token_logps(bad, batch)
        torch.testing.assert_close(fallback, logprobs.token_logps(good, batch), rtol=0, atol=1e-5)
        bad.padding_free = True  # as --padding_free sets it
        forced = logprobs.token_logps(bad, batch)
    assert (forced - fallback).abs().max() > 1e-2


def test_flags_force_either_layout():
    parser = common.base_parser("x", data="d", model="m")
    assert [parser.parse_args(a).padding_free for a in ([], ["--padding_free"], ["--no-padding_free"])] == \
        [None, True, False]


@pytest.mark.parametrize("script, rows", [
    (dpo, [dict(prompt="tell me about " + "cat " * (i % 3 * 9), chosen="dog " * (1 + i % 4 * 7),
                rejected="red") for i in range(8)]),
    (kto, [dict(prompt="tell me about" + " fig" * (i % 5 * 6), completion="apple " * (1 + i % 3 * 10),
                label=i % 2 == 0) for i in range(8)])])
def test_a_run_packed_equals_a_run_padded(script, rows, tiny_model, tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    packed_batches, pack = [], batching.pack
    monkeypatch.setattr(logprobs, "pack", lambda batch, **kw: packed_batches.append(1) or pack(batch, **kw))
    runs = []
    for flag in ("--padding_free", "--no-padding_free"):
        out = str(tmp_path / flag)
        script.main(["--model", tiny_model, "--data", str(data), "--batch_size", "4", "--max_steps", "3",
                     "--log_every", "1", "--output_dir", out, "--dtype", "float32", flag])
        runs.append(read_metrics(out))
        packed_batches.append(flag)
    assert packed_batches.index("--padding_free") >= 6 and packed_batches[-2] == "--padding_free"  # only it packs
    for packed, padded in zip(*runs):
        for key in ("loss", "rewards/chosen", "logps/chosen", "grad_norm"):
            if key in padded:
                assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-5), key
        assert packed["tokens/s"] > 0


def exact_attention(q, k, v, causal=True, softmax_scale=None, **unused):
    """flash_attn_func's contract, (B, T, heads, D) in and out, computed exactly (SDPA's math on CPU)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


def exact_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                           softmax_scale=None, dropout_p=0.0, **unused):
    """flash_attn_varlen_func's contract, (total, heads, D): each cu_seqlens segment attends only within itself."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == int(cu_seqlens_q.diff().max())
    bounds = cu_seqlens_q.tolist()
    return torch.cat([exact_attention(q[None, a:b], k[None, a:b], v[None, a:b], causal, softmax_scale)[0]
                      for a, b in zip(bounds, bounds[1:])])


@pytest.fixture
def flash_attention(monkeypatch):
    """A model whose config asks for flash_attention_2, transformers' own flash-attention dispatch, and
    exact kernels in flash-attn's place (the package needs CUDA)."""
    from transformers import modeling_flash_attention_utils as fa

    kernels = (exact_attention, exact_varlen_attention, None, fa._pad_input, fa._unpad_input)
    processing = (fa._lazy_define_process_function(exact_varlen_attention), dict)
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *args, **kwargs: (kernels, processing))

    def model(device, seed=0):
        model = tiny_llama(device, seed)
        model.config._attn_implementation = "flash_attention_2"
        return model
    return model


def test_packed_equals_padded_under_flash_attention(flash_attention, layout, device):
    """One packed row and the varlen kernel's boundaries: packed sequences never see each other."""
    model = flash_attention(device)
    assert logprobs.one_row(model) == "flash" and logprobs.one_row(tiny_llama(device)) is None
    batch = batching.collate_pairs(PAIRS, 0, device)
    packed = batching.pack(batch, one_row="flash")
    lengths = batch["attention_mask"].sum(-1)
    assert packed["input_ids"].shape == (1, int(lengths.sum()))
    assert packed["varlen"]["cu_seq_lens_q"].tolist() == [0, *lengths.sort(descending=True).values.cumsum(0).tolist()]
    assert packed["varlen"]["max_length_q"] == int(lengths.max())
    padded, packed = layout(values_and_grads, model, lambda: logprobs.token_logps(model, batch, 0.7))
    assert_same(padded, packed)
    with torch.no_grad():
        padded, packed = layout(logprobs.position_outputs, model, batch)
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(packed[real], padded[real], rtol=0, atol=1e-5)
    assert logprobs.packing_check(model)
