import json
import math
import os
import random
import re
import subprocess
import sys
import zlib

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_metrics
import common  # noqa: E402
import formats  # noqa: E402
import grpo  # noqa: E402
import models  # noqa: E402
import reward_functions  # noqa: E402
from toy.rewards import gold_reward  # noqa: E402
from toy.task import DATA_DIR, TOPIC_WORDS  # noqa: E402

CPU = torch.device("cpu")


# ---------------------------------------------------------------- advantages

def test_group_advantages_equal_rewards_give_zero_and_group_std():
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 2.0, 3.0])  # two groups of G = 3
    advantages, group_std = grpo.group_advantages(rewards, 3, "group")
    # group 1: all equal, A = 0 / (0 + 1e-4) = 0.  group 2: mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1
    expected = [0.0, 0.0, 0.0, -1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)]
    torch.testing.assert_close(advantages, torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(group_std, torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)


def test_group_advantages_none_and_batch():
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    # group means 3 and 5: R - mean = [-2, -1, 3, 0, 0, 0]
    none, _ = grpo.group_advantages(rewards, 3, "none")
    torch.testing.assert_close(none, torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    # group: std of (1, 2, 6) = sqrt((4 + 1 + 9) / 2) = sqrt(7)
    group, _ = grpo.group_advantages(rewards, 3, "group")
    torch.testing.assert_close(group, torch.tensor([-2.0, -1.0, 3.0, 0, 0, 0]) / (7 ** 0.5 + 1e-4), atol=1e-6, rtol=0)
    # batch: mean 24 / 6 = 4, squared deviations 9 + 4 + 4 + 1 + 1 + 1 = 20, std sqrt(20 / 5) = 2
    batch, _ = grpo.group_advantages(rewards, 3, "batch")
    torch.testing.assert_close(batch, torch.tensor([-2.0, -1.0, 3.0, 0, 0, 0]) / (2 + 1e-4), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- loss

def loss_of(logps, advantages, mask, loss_type, n_sequences=None, n_tokens=None, old_logps=None, ref_logps=None,
            beta=0.0, epsilon_low=0.2, epsilon_high=0.2, max_new_tokens=5, importance_sampling_level="token",
            use_bias_correction_kl=False):
    old_logps = logps.detach() if old_logps is None else old_logps
    return grpo.grpo_loss(logps, old_logps, ref_logps, advantages, mask, loss_type=loss_type,
                          importance_sampling_level=importance_sampling_level, epsilon_low=epsilon_low,
                          epsilon_high=epsilon_high, beta=beta, use_bias_correction_kl=use_bias_correction_kl,
                          n_sequences=n_sequences or len(mask), n_tokens=n_tokens or float(mask.sum()),
                          max_new_tokens=max_new_tokens)


# two sequences, 2 and 4 tokens, A = 1 and -0.25; ratio 1, so L_t = -A: [-1, -1] and [0.25] * 4.
# (loss, d loss / d logp of a token of sequence 0, of sequence 1): d L_t / d logp_t = -A * ratio = -A
AGGREGATIONS = {
    "grpo": ((-1 + 0.25) / 2, -1 / 2 / 2, 0.25 / 4 / 2),        # mean over 2 sequences of the token means -1, 0.25
    "dr_grpo": ((-2 + 1) / (2 * 5), -1 / 10, 0.25 / 10),       # token sum / (2 sequences * max_new_tokens 5)
    "dapo": ((-2 + 1) / 6, -1 / 6, 0.25 / 6),                  # token sum / 6 tokens
}


@pytest.mark.parametrize("loss_type", AGGREGATIONS)
def test_each_aggregation_on_two_sequences_of_different_lengths(loss_type):
    logps = torch.tensor([[-1.0, -2.0, 9.0, 9.0], [-0.5, -1.5, -2.5, -3.0]], requires_grad=True)  # 9: padding
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    advantages = torch.tensor([1.0, -0.25])
    loss, _, _, _ = loss_of(logps, advantages, mask, loss_type)
    loss.backward()
    value, grad0, grad1 = AGGREGATIONS[loss_type]
    assert loss.item() == pytest.approx(value, abs=1e-6)
    torch.testing.assert_close(logps.grad, torch.tensor([[grad0, grad0, 0, 0], [grad1] * 4]), atol=1e-6, rtol=0)
    # split over two micro-batches (or ranks) with the global counts, the parts add up to the whole
    parts = [loss_of(logps[i:i + 1], advantages[i:i + 1], mask[i:i + 1], loss_type, 2, 6.0)[0] for i in (0, 1)]
    assert sum(p.item() for p in parts) == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize("advantage, ratio, loss, low, high, grad", [
    # eps_low 0.2, eps_high 0.28: L = -min(r * A, clip(r, 0.8, 1.28) * A); d L / d logp = -A * r unless clipped
    (1.0, 1.1, -1.1, 0, 0, -1.1),      # inside
    (1.0, 1.25, -1.25, 0, 0, -1.25),   # inside thanks to clip-higher (eps 0.2 would clip at 1.2)
    (1.0, 1.5, -1.28, 0, 1, 0.0),      # above: min(1.5, 1.28) = 1.28, high clip, no gradient
    (1.0, 0.5, -0.5, 0, 0, -0.5),      # below with A > 0: min(0.5, 0.8) = 0.5, unclipped
    (-1.0, 1.5, 1.5, 0, 0, 1.5),       # above with A < 0: min(-1.5, -1.28) = -1.5, unclipped
    (-1.0, 0.5, 0.8, 1, 0, 0.0),       # below: min(-0.5, -0.8) = -0.8, low clip, no gradient
])
def test_clipping_on_both_sides(advantage, ratio, loss, low, high, grad):
    logps = torch.tensor([[0.3 + math.log(ratio)]], requires_grad=True)
    got, _, is_low, is_high = loss_of(logps, torch.tensor([advantage]), torch.ones(1, 1), "dapo",
                                      old_logps=torch.tensor([[0.3]]), epsilon_low=0.2, epsilon_high=0.28)
    got.backward()
    assert got.item() == pytest.approx(loss, abs=1e-6)
    assert (is_low.item(), is_high.item()) == (low, high)
    assert logps.grad.item() == pytest.approx(grad, abs=1e-6)


def test_kl_is_k3_and_zero_when_policy_is_reference():
    logps = torch.log(torch.tensor([[0.5, 0.2]]))
    mask, advantages = torch.ones(1, 2), torch.tensor([1.0])
    plain, _, _, _ = loss_of(logps, advantages, mask, "dapo")
    same, kl, _, _ = loss_of(logps, advantages, mask, "dapo", ref_logps=logps.clone(), beta=0.04)
    assert kl.abs().max().item() == 0.0 and same.item() == pytest.approx(plain.item(), abs=1e-7)
    # pi_ref = 0.25 and 0.2: ref/pi = 0.5 and 1, KL = 0.5 - log 0.5 - 1 = 0.193147 and 0
    loss, kl, _, _ = loss_of(logps, advantages, mask, "dapo", ref_logps=torch.log(torch.tensor([[0.25, 0.2]])),
                             beta=0.04)
    torch.testing.assert_close(kl, torch.tensor([[0.5 - math.log(0.5) - 1, 0.0]]), atol=1e-6, rtol=0)
    assert loss.item() == pytest.approx(plain.item() + 0.04 * 0.193147 / 2, abs=1e-6)


def test_rloo_baseline_is_the_mean_of_the_others_and_combines_with_scaling():
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    # R_i - mean of the other two: 1 - (2 + 6) / 2 = -3, 2 - (1 + 6) / 2 = -1.5, 6 - (1 + 2) / 2 = 4.5; 5 - 5 = 0
    rloo, _ = grpo.group_advantages(rewards, 3, "none", "rloo")
    torch.testing.assert_close(rloo, torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    group, _ = grpo.group_advantages(rewards, 3, "group", "rloo")  # std of (1, 2, 6) = sqrt(7)
    torch.testing.assert_close(group, torch.tensor([-3.0, -1.5, 4.5, 0, 0, 0]) / (7 ** 0.5 + 1e-4), atol=1e-6, rtol=0)
    # a NaN reward is no other response: [1, NaN, 3] has 1 - 3 = -2 and 3 - 1 = 2
    rloo, _ = grpo.group_advantages(torch.tensor([1.0, math.nan, 3.0, 5.0, math.nan, math.nan]), 3, "none", "rloo")
    assert rloo.tolist() == [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]


def test_centered_batch_divides_by_the_std_of_the_advantages_not_of_the_rewards():
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    # REINFORCE++-baseline: A = R - mean_group = [-2, -1, 3, 0, 0, 0], batch mean 0, squares 4 + 1 + 9 = 14,
    # std sqrt(14 / 5); --scale_rewards batch divides by the rewards' std, 2 (test_group_advantages_none_and_batch)
    centred, _ = grpo.group_advantages(rewards, 3, "centered_batch")
    torch.testing.assert_close(centred, torch.tensor([-2.0, -1.0, 3.0, 0, 0, 0]) / ((14 / 5) ** 0.5 + 1e-4),
                               atol=1e-6, rtol=0)


def test_gspo_clips_one_ratio_per_sequence():
    # sequence 0 (2 tokens, A = 1): log-ratios 0.1, 0.3, mean 0.2, s = e^0.2 = 1.2214 > 1.2: clipped, no gradient.
    # sequence 1 (3 tokens, A = -1): log-ratios -0.3, 0, 0.15, mean -0.05, s = e^-0.05 = 0.951229, inside.
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -2.5]])
    logps = (old + torch.tensor([[0.1, 0.3, 7.0], [-0.3, 0.0, 0.15]])).requires_grad_()  # 7: padding
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    s1 = math.exp(-0.05)
    # L_0 = -min(1.2214 * 1, 1.2 * 1) = -1.2;  L_1 = -min(-s1, -s1) = s1;  d L_1 / d logp_t = -A * s1 / 3 = s1 / 3
    for loss_type, value, weight in [("grpo", (-1.2 + s1) / 2, 1 / 2),      # mean over the 2 sequences
                                     ("dapo", (2 * -1.2 + 3 * s1) / 5, 3 / 5)]:  # each token carries L_i; 5 tokens
        logps.grad = None
        loss, _, low, high = loss_of(logps, torch.tensor([1.0, -1.0]), mask, loss_type, old_logps=old,
                                     importance_sampling_level="sequence")
        loss.backward()
        assert loss.item() == pytest.approx(value, abs=1e-6)
        expected = torch.tensor([[0.0, 0.0, 0.0], [s1 / 3 * weight] * 3])
        torch.testing.assert_close(logps.grad, expected, atol=1e-6, rtol=0)
        assert high.tolist() == [[1.0, 1.0, 1.0], [0.0] * 3] and low.sum() == 0
    # per token, sequence 0's first token (ratio e^0.1 = 1.105) is not clipped: the levels differ
    token, _, _, _ = loss_of(logps, torch.tensor([1.0, -1.0]), mask, "grpo", old_logps=old)
    assert token.item() != pytest.approx((-1.2 + s1) / 2, abs=1e-3)


def test_cispo_weight_is_clipped_and_detached_so_every_token_keeps_a_gradient():
    # eps_low 0.2, eps_high 4: weights clip(r, 0.8, 5). Sequence 0 (A = 1): r = 0.5, 1.1, 6 -> 0.8, 1.1, 5;
    # sequence 1 (A = -0.5): r = 2 -> 2. n_tokens 4.
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, 0.0, 0.0]], requires_grad=True)
    old = logps.detach() - torch.log(torch.tensor([[0.5, 1.1, 6.0], [2.0, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, _, low, high = loss_of(logps, torch.tensor([1.0, -0.5]), mask, "cispo", old_logps=old, epsilon_low=0.2,
                                 epsilon_high=4.0)
    loss.backward()
    # L = -(1/4) * [(0.8 * -1 + 1.1 * -2 + 5 * -0.5) * 1 + 2 * -1.5 * -0.5] = -(1/4) * (-5.5 + 1.5) = 1
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    # d L / d logp_t = -sg(clip(r_t)) * A / n_tokens: the clipped 6 -> 5 token too (PPO's clip would give it 0)
    expected = torch.tensor([[-0.8 / 4, -1.1 / 4, -5.0 / 4], [2.0 * 0.5 / 4, 0.0, 0.0]])
    torch.testing.assert_close(logps.grad, expected, atol=1e-6, rtol=0)
    assert low[0, 0].item() == 1 and high[0, 2].item() == 1 and (low + high).sum() == 2  # weights clipped


def test_kl_bias_correction_weights_k3_by_the_ratio_and_gives_the_reverse_kl_gradient():
    # one token: logp = log 0.5, pi_old = 0.4 (ratio 1.25), pi_ref = 0.25 (rho = pi_ref / pi = 0.5), A = 0
    logps = torch.log(torch.tensor([[0.5]])).requires_grad_()
    old, ref = torch.log(torch.tensor([[0.4]])), torch.log(torch.tensor([[0.25]]))
    k3 = 0.5 - math.log(0.5) - 1  # 0.193147
    for correct, value, grad in [
        # plain: beta * k3;  d/d logp (rho - log rho - 1) = -rho + 1 = 0.5
        (False, 0.1 * k3, 0.1 * 0.5),
        # corrected: beta * r * k3;  d/d logp = beta * r * (k3 + 1 - rho) = beta * r * (logp - ref_logp)
        #                                     = beta * 1.25 * log 2
        (True, 0.1 * 1.25 * k3, 0.1 * 1.25 * math.log(2)),
    ]:
        logps.grad = None
        loss, kl, _, _ = loss_of(logps, torch.tensor([0.0]), torch.ones(1, 1), "dapo", old_logps=old, ref_logps=ref,
                                 beta=0.1, use_bias_correction_kl=correct)
        loss.backward()
        assert loss.item() == pytest.approx(value, abs=1e-6) and kl.item() == pytest.approx(k3, abs=1e-6)
        assert logps.grad.item() == pytest.approx(grad, abs=1e-6)


def test_overlong_penalty_falls_linearly_over_the_buffer():
    # cap 8, buffer 3, penalty 0.5: 0 up to 8 - 3 = 5 tokens, then -0.5 * (|o| - 5) / 3
    got = reward_functions.overlong_penalty(torch.tensor([2.0, 5.0, 6.0, 7.0, 8.0]), 8, 3, 0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5 / 3, -1 / 3, -0.5]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- sampling and rewards

def test_masks_come_from_the_first_eos_not_from_pad():
    eos = pad = 2
    generated = torch.tensor([[5, eos, pad, pad], [eos, pad, pad, pad], [5, 6, 7, 8]])  # the last one is cut off
    assert common.completions_from(generated, [eos]) == [[5, eos], [eos], [5, 6, 7, 8]]


def test_completions_end_at_the_first_of_several_stop_ids():
    eos, end_of_turn = 2, 9
    generated = torch.tensor([[5, end_of_turn, 6, eos], [5, eos, end_of_turn, 6], [5, 6, 7, 8]])
    assert common.completions_from(generated, [eos, end_of_turn]) == [[5, end_of_turn], [5, eos], [5, 6, 7, 8]]


@pytest.fixture(scope="module")
def end_of_turn_model(tiny_model, tmp_path_factory):
    """The tiny model with an <end_of_turn> token that its generation config lists next to the tokenizer's EOS,
    and weights that emit it first: no layer writes to the residual stream, every embedding is all ones, and
    only <end_of_turn>'s row of the LM head is nonzero, so its logit is 128 * 0.5 = 64 and every other one 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path_factory.mktemp("end_of_turn"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert end_of_turn < model.config.vocab_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[end_of_turn] = 0.5
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, end_of_turn


def test_a_declared_end_of_turn_id_ends_the_completion(end_of_turn_model, tmp_path):
    path, end_of_turn = end_of_turn_model
    args = grpo.parse_args(["--model", path, "--num_generations", "2", "--max_new_tokens", "8"])
    tokenizer, policy = models.load_policy(args, CPU)
    common.set_sampling(policy, args, tokenizer)
    rows = [{"prompt": p} for p in ["tell me about animals :", "tell me about fruits and tools :"]]
    prompts = [{**ex, "row": row} for ex, row in zip(formats.tokenize(rows, tokenizer, 64, ()), rows)]
    reward_fns = [reward_functions.load_reward_fn(os.path.join(ROOT, "toy", "rewards.py") + ":gold_reward")]
    groups = grpo.sample(policy, None, reward_fns, reward_functions.reward_kwargs(0, 1, print), torch.ones(1),
                         prompts, tokenizer, args, CPU)
    # each of the 2 * 2 responses is the one token <end_of_turn>, not 8 tokens running past it
    assert [g.completions for g in groups] == [[[end_of_turn]] * 2] * 2
    assert [g.has_eos for g in groups] == [[True] * 2] * 2
    # end to end, on the toy data: no response is clipped, and the toy eval stops there too
    out = str(tmp_path / "grpo")
    grpo.main(["--model", path, "--output_dir", out, "--max_steps", "1", "--batch_size", "2", "--num_generations",
               "2", "--max_new_tokens", "8", "--log_every", "1", "--num_sample_generations", "0"])
    rows = read_metrics(out)
    train = [r for r in rows if "reward" in r][0]
    assert train["completions/clipped_ratio"] == 0.0 and train["completions/mean_length"] == 1.0
    assert [r["eval/mean_length"] for r in rows if "eval/mean_length" in r] == [1.0, 1.0]

    prompts = ["tell me about animals :", [{"role": "user", "content": "tell me about fruits and tools :"}]]
    completions = ["cat dog red blue", [{"role": "assistant", "content": "apple saw rain"}]]
    assert gold_reward(prompts, completions, answer=["x", "y"]) == [2 / 4, 2 / 3]


@pytest.mark.parametrize("body, message", [
    ("raise ValueError('no answer column')", "reward function bad raised ValueError: no answer column"),
    ("return [1.0]", "reward function bad returned 1 values for 2 completions"),
    ("return [1.0, float('nan')]", "reward function bad returned nan; rewards must be finite real numbers or None"),
    ("return [1.0, '0.5']", "reward function bad returned '0.5'; rewards must be finite real numbers or None"),
    ("return [1.0, torch.ones(2)]", "reward function bad returned tensor([1., 1.]); rewards must be finite real"),
    ("return None", "reward function bad returned NoneType for 2 completions"),
])
def test_a_failing_reward_function_is_named_in_one_line(tmp_path, body, message):
    path = tmp_path / "rewards.py"
    path.write_text(f"import torch\ndef bad(prompts, completions, **columns):\n    {body}\n")
    name, fn = reward_functions.load_reward_fn(f"{path}:bad")
    with pytest.raises(common.UserError, match=re.escape(message)):
        reward_functions.call_reward_fn(name, fn, ["p", "q"], ["a", "b"], [[1], [2]], {}, reward_functions.reward_kwargs(0, 1, print))
    with pytest.raises(common.UserError, match="has no function 'absent'"):
        reward_functions.load_reward_fn(f"{path}:absent")
    with pytest.raises(common.UserError, match="expected path/to/file.py:function"):
        reward_functions.load_reward_fn("rewards:bad")


# Reward functions as written for TRL's GRPOTrainer: trl.rewards' shapes (completions of one message, None for
# an unparseable gold answer, log_extra, a callable class with its own __name__), completion_ids and
# trainer_state, numpy and 0-d tensor numbers.
TRL_REWARDS = """
import numpy as np
import torch


def accuracy_reward(completions, solution, log_extra=None, **kwargs):
    contents = [completion[0]["content"] for completion in completions]
    if log_extra is not None:
        log_extra("solution", list(solution))
    return [None if sol == "?" else float(sol in content) for content, sol in zip(contents, solution)]


class LengthReward:
    def __call__(self, completion_ids, trainer_state, log_metric, solution, **kwargs):
        log_metric("seen", len(completion_ids))
        log_metric("global_step", trainer_state.global_step)
        return [None if sol == "?" else np.int64(len(ids)) for ids, sol in zip(completion_ids, solution)]


class _Cosine:
    __name__ = "cosine_scaled_reward"

    def __call__(self, completions, completion_ids, **kwargs):
        return [torch.tensor(0.25), np.float32(0.5), np.array(2.0), True]


length_reward = LengthReward()
cosine = _Cosine()
"""


def test_trl_reward_functions_run_unchanged(tmp_path):
    path = tmp_path / "trl_rewards.py"
    path.write_text(TRL_REWARDS)
    logged = []
    kwargs = reward_functions.reward_kwargs(3, 10, lambda name, value: logged.append((name, value)))
    completions = [[{"role": "assistant", "content": c}] for c in ("so 7", "so 8", "so 7", "so 7")]
    ids, columns = [[5, 6], [5, 6, 2], [5], [5]], {"solution": ["7", "7", "?", "?"]}
    calls = {spec: reward_functions.load_reward_fn(f"{path}:{spec}") for spec in ("accuracy_reward", "length_reward", "cosine")}
    assert [name for name, _ in calls.values()] == ["accuracy_reward", "LengthReward", "cosine_scaled_reward"]
    out = {spec: reward_functions.call_reward_fn(name, fn, ["p"] * 4, completions, ids, columns, kwargs)
           for spec, (name, fn) in calls.items()}
    assert out["accuracy_reward"][:2] == [1.0, 0.0] and all(map(math.isnan, out["accuracy_reward"][2:]))
    assert out["length_reward"][:2] == [2.0, 3.0] and all(map(math.isnan, out["length_reward"][2:]))
    assert out["cosine"] == [0.25, 0.5, 2.0, 1.0] and all(type(r) is float for r in out["cosine"])
    assert logged == [("seen", 4), ("global_step", 3)]


def test_total_rewards_skip_none_and_leave_the_unscored_nan():
    nan = math.nan
    rewards = torch.tensor([[1.0, nan], [nan, nan], [nan, 2.0], [1.0, 2.0]])
    total = reward_functions.total_rewards(rewards, torch.tensor([1.0, 0.5]))
    assert total[[0, 2, 3]].tolist() == [1.0, 1.0, 2.0] and total[1].isnan()


def test_group_advantages_leave_unscored_responses_out():
    nan = math.nan
    rewards = torch.tensor([1.0, nan, 3.0, 5.0, nan, nan])  # two groups of G = 3, 2 and 1 responses scored
    none, group_std = grpo.group_advantages(rewards, 3, "none")
    assert none.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert group_std[0].item() == pytest.approx(2 ** 0.5) and group_std[1].isnan()  # (1 + 1) / (2 - 1)
    group, _ = grpo.group_advantages(rewards, 3, "group")
    torch.testing.assert_close(group, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (2 ** 0.5 + 1e-4))
    batch, _ = grpo.group_advantages(rewards, 3, "batch")  # scored 1, 3, 5: std ((4 + 0 + 4) / 2) ** 0.5 = 2
    torch.testing.assert_close(batch, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (2 + 1e-4))


def test_a_run_with_trl_reward_functions_skips_none(tiny_model, tmp_path, monkeypatch):
    rewards = tmp_path / "trl_rewards.py"
    rewards.write_text(TRL_REWARDS)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "tell me about animals :"}], "solution": "cat"})
                    + "\n" + json.dumps({"prompt": [{"role": "user", "content": "tell me about music :"}],
                                         "solution": "?"}) + "\n")
    tokenizer = models.load_tokenizer(tiny_model)
    cat, dog = tokenizer.convert_tokens_to_ids(["cat", "dog"])
    # the 2 responses of each prompt: "cat" (accuracy 1, 2 ids with EOS) and "dog dog" (accuracy 0, 3 ids)
    monkeypatch.setattr(common, "generate_completions", lambda policy, prompts, *_: [
        [cat, tokenizer.eos_token_id] if i % 2 == 0 else [dog, dog, tokenizer.eos_token_id] for i in range(len(prompts))])
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match="every reward function returned None for a response"):
        grpo.main(["--model", tiny_model, "--data", str(data), "--output_dir", out, "--max_steps", "1",
                   "--batch_size", "2", "--num_generations", "2", "--max_new_tokens", "4", "--max_length", "64",
                   "--num_sample_generations", "0", "--reward_fn", f"{rewards}:accuracy_reward",
                   "--reward_fn", f"{rewards}:length_reward", "--reward_weights", "1", "0.5"])
    (row,) = read_metrics(out)
    # music's responses have no reward: only animals' count, 1 + 0.5 * 2 = 2 and 0 + 0.5 * 3 = 1.5
    assert row["rewards/accuracy_reward"] == 0.5 and row["rewards/LengthReward"] == 2.5
    assert row["reward"] == pytest.approx(1.75) and row["reward_std"] == pytest.approx(0.125 ** 0.5)
    assert row["frac_reward_zero_std"] == 0.0  # music's group has no std, not a zero one
    assert row["seen"] == 4.0 and row["global_step"] == 0.0  # log_metric, before the first update
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])


def test_dynamic_sampling_drops_equal_groups_and_truncated_responses_leave_the_loss(tiny_model, tmp_path, monkeypatch):
    rewards = tmp_path / "constant.py"
    rewards.write_text("def one(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"tell me about {t} :"}) + "\n" for t in ("animals", "music")))
    tokenizer = models.load_tokenizer(tiny_model)
    cat, dog = tokenizer.convert_tokens_to_ids(["cat", "dog"])
    # animals: both responses "cat" + EOS.  music: "cat" + EOS (2 tokens) and "dog" x 4, cut off at the cap of 4
    monkeypatch.setattr(common, "generate_completions", lambda policy, prompts, tokenizer, *_: [
        [cat, tokenizer.eos_token_id] if i % 2 == 0 or "animals" in tokenizer.decode(p["prompt"]) else [dog] * 4
        for i, p in enumerate(prompts)])
    # reward 1 plus the overlong penalty (cap 4, buffer 2, p 1): 0 for 2 tokens, -(4 - 2) / 2 = -1 for 4 tokens.
    # animals: R = 1, 1 (std 0, dropped);  music: R = 1, 0, A = 0.5, -0.5 (--scale_rewards none)
    flags = ["--model", tiny_model, "--data", str(data), "--max_steps", "2", "--batch_size", "1", "--num_generations",
             "2", "--max_new_tokens", "4", "--max_length", "64", "--num_sample_generations", "0", "--log_every", "1",
             "--reward_fn", f"{rewards}:one", "--overlong_buffer", "2", "--scale_rewards", "none",
             "--dynamic_sampling", "--max_resample_rounds", "1"]
    # ratio 1, L_t = -A. Masked: only music's first response, (-0.5 * 2) / 2 tokens = -0.5;
    # unmasked: (-0.5 * 2 + 0.5 * 4) / 6 tokens = 1/6
    for extra, loss in [(["--mask_truncated_completions"], -0.5), ([], 1 / 6)]:
        out = str(tmp_path / f"out{len(extra)}")
        grpo.main(flags + extra + ["--output_dir", out])
        rows = read_metrics(out)
        for row in rows:  # each step samples both prompts, in the shuffle's order
            assert row["loss"] == pytest.approx(loss, abs=1e-6)
            assert row["reward"] == pytest.approx(0.5) and row["rewards/overlong_penalty"] == pytest.approx(-0.5)
            assert row["completions/mean_length"] == 3.0 and row["completions/clipped_ratio"] == 0.5
        # step 1 drew animals first: dropped, a second round (1 group of 2 had std 0); step 2 drew music first
        assert [(r["num_gen_batches"], r["frac_reward_zero_std"]) for r in rows] == [(2, 0.5), (1, 0.0)]


# ---------------------------------------------------------------- the same run over micro-batches and ranks

def fixed_generate():
    """A stand-in for common.generate_completions whose 'samples' depend on the prompt, the index within its
    group and the step only, so every split of a global batch over micro-batches and ranks gets the same ones."""
    words, calls = [w for ws in TOPIC_WORDS.values() for w in ws], []

    def generate(policy, prompts, tokenizer, device, batch_size):
        calls.append(1)
        out = []
        for i, p in enumerate(prompts):
            rng = random.Random(zlib.crc32(f"{p['prompt']}|{i % NUM_GENERATIONS}|{len(calls)}".encode()))
            n = rng.randint(1, MAX_NEW_TOKENS)
            ids = tokenizer.convert_tokens_to_ids(rng.choices(words, k=n))
            out.append(ids + [tokenizer.eos_token_id] if n < MAX_NEW_TOKENS else ids)  # some cut off
        return out
    return generate


# one run per configuration, each with other options; KL and two iterations (clipping) in all. "cispo" scores
# with COARSE (gold_reward weighted 0) plus the overlong penalty, so that some groups have equal rewards and
# dynamic sampling draws more prompts
CONFIGS = {
    "grpo": ["--loss_type", "grpo", "--scale_rewards", "batch"],
    "dr_grpo": ["--loss_type", "dr_grpo", "--scale_rewards", "none"],
    "dapo": ["--loss_type", "dapo", "--scale_rewards", "group"],
    "gspo": ["--loss_type", "grpo", "--importance_sampling_level", "sequence", "--advantage", "rloo",
             "--use_bias_correction_kl"],
    "cispo": ["--loss_type", "cispo", "--epsilon", "0.2", "--scale_rewards", "centered_batch", "--dynamic_sampling",
              "--mask_truncated_completions", "--overlong_buffer", "3", "--reward_weights", "0", "1"],
}
COARSE = "def coarse(completions, **kwargs):\n    return [float(len(c.split()) > 5) for c in completions]\n"
NUM_GENERATIONS, MAX_NEW_TOKENS = 4, 8
FLAGS = ["--max_steps", "2", "--num_generations", str(NUM_GENERATIONS), "--max_new_tokens", str(MAX_NEW_TOKENS),
         "--max_length", "64", "--beta", "0.04", "--num_iterations", "2", "--lr", "3e-3", "--warmup_ratio", "0",
         "--log_every", "1", "--num_sample_generations", "0",
         "--reward_fn", os.path.join(ROOT, "toy", "rewards.py") + ":gold_reward"]


def run_each_config(flags, out):
    """Every CONFIGS run into out/<name>; COARSE is in the folder above out."""
    sample = common.generate_completions
    coarse = ["--reward_fn", os.path.join(os.path.dirname(out), "coarse.py") + ":coarse"]
    try:
        for name, config in CONFIGS.items():
            common.generate_completions = fixed_generate()
            grpo.main(flags + config + coarse * (name == "cispo") + ["--output_dir", f"{out}/{name}"])
    finally:
        common.generate_completions = sample


def test_grad_accum_and_two_ranks_match_one_process(tiny_model, tmp_path):
    data = tmp_path / "prompts.jsonl"  # outside toy/data: no toy eval
    with open(os.path.join(DATA_DIR, "prompts.jsonl")) as f:
        data.write_text("".join(f.readlines()[:64]))
    (tmp_path / "coarse.py").write_text(COARSE)
    flags = FLAGS + ["--model", tiny_model, "--data", str(data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path / "two"), *flags, "--batch_size", "2", "--grad_accum", "2"]
    two = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_each_config(flags + ["--batch_size", "8"], str(tmp_path / "one"))
    run_each_config(flags + ["--batch_size", "4", "--grad_accum", "2"], str(tmp_path / "accum"))
    assert two.wait(timeout=300) == 0, two.stdout.read()[-3000:]
    sampled = read_metrics(str(tmp_path / "two" / "sampled"))
    assert [r["step"] for r in sampled] == [1, 2] and all(math.isfinite(v) for r in sampled for v in r.values())
    start = load_file(os.path.join(tiny_model, "model.safetensors"))
    for name in CONFIGS:
        one, accum, two = (str(tmp_path / run / name) for run in ("one", "accum", "two"))
        for other in (accum, two):
            for a, b in zip(read_metrics(one), read_metrics(other), strict=True):
                assert set(a) == set(b), (name, other)
                for key in ("loss", "grad_norm", "reward", "kl", "entropy", "clip_ratio/low_mean",
                            "clip_ratio/high_mean", "frac_reward_zero_std", "completions/mean_length"):
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (name, other, key)
                assert a.get("num_gen_batches") == b.get("num_gen_batches"), (name, other)
            # Adam turns float noise in a near-zero gradient into up to ~1e-4 here (packed rows differ between
            # the layouts, so do their roundings); the updates reach ~1e-2, a wrong aggregation moves them by more
            w1, w2 = (load_file(os.path.join(d, "model.safetensors")) for d in (one, other))
            for key in w1:
                torch.testing.assert_close(w1[key], w2[key], atol=3e-4, rtol=0)
        last = read_metrics(one)[-1]
        assert last["kl"] > 0 and last["clip_ratio/low_mean"] + last["clip_ratio/high_mean"] > 0  # all terms live
        assert (w1["lm_head.weight"] - start["lm_head.weight"]).abs().max() > 5e-3
    rows = read_metrics(str(tmp_path / "one" / "cispo"))  # equal groups were seen and more prompts drawn
    assert max(r["num_gen_batches"] for r in rows) > 1 and max(r["frac_reward_zero_std"] for r in rows) > 0, rows


# ---------------------------------------------------------------- end to end, resume

def test_gold_score_rises(sft_model, tmp_path):
    out = str(tmp_path / "grpo")
    grpo.main(["--model", sft_model, "--output_dir", out, "--max_steps", "10", "--log_every", "1",
               "--num_sample_generations", "0"])
    rows = read_metrics(out)
    train, evals = [r for r in rows if "reward" in r], [r for r in rows if "eval/gold_score" in r]
    assert [r["step"] for r in train] == list(range(1, 11)) and [r["step"] for r in evals] == [0, 10]
    expected = {"reward", "reward_std", "rewards/gold_reward", "frac_reward_zero_std", "completions/mean_length",
                "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy", "loss", "lr",
                "grad_norm", "tokens/s"}
    assert set(train[0]) == expected | {"step"}  # no kl with beta 0
    assert all(math.isfinite(v) for r in train for v in r.values())
    assert evals[-1]["eval/gold_score"] > evals[0]["eval/gold_score"] + 0.08, evals  # about +0.14 measured
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f).get("top_k") != 0  # the checkpoint's own sampling defaults, not GRPO's


def test_exact_resume_with_a_reward_model(tiny_model, tmp_path, monkeypatch):
    from test_reliability import rows, same_weights, sigterm_during_step
    from transformers import AutoModel

    import reward_models

    reward_model = str(tmp_path / "rm")  # an untrained head: a reward model that is only a function of the text
    torch.manual_seed(0)
    reward_models.save_reward_model(reward_models.RewardModel(models.load_model(tiny_model, CPU, auto_class=AutoModel)),
                                    models.load_tokenizer(tiny_model), reward_model)
    data = tmp_path / "prompts.jsonl"
    with open(os.path.join(DATA_DIR, "prompts.jsonl")) as f:
        data.write_text("".join(f.readlines()[:32]))
    flags = FLAGS + ["--model", tiny_model, "--data", str(data), "--max_steps", "6", "--batch_size", "2",
                     "--reward_model", reward_model, "--reward_weights", "1.0", "0.5"]
    straight, out = str(tmp_path / "straight"), str(tmp_path / "out")
    grpo.main(flags + ["--output_dir", straight])
    sigterm_during_step(monkeypatch, 5)  # 2 optimizer steps a rollout: stops after rollout 3
    with pytest.raises(SystemExit) as stopped:
        grpo.main(flags + ["--output_dir", out])
    assert stopped.value.code == 0
    assert sorted(os.listdir(out)) == ["checkpoint-3", "metrics.jsonl"]
    monkeypatch.undo()
    grpo.main(flags + ["--output_dir", out, "--resume"])
    assert same_weights(straight, out)
    assert rows(out) == rows(straight)
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    last = rows(out)[-1]
    assert last["reward"] == pytest.approx(last["rewards/gold_reward"] + 0.5 * last["rewards/reward_model"], abs=1e-5)


def run_under_torchrun():
    run_each_config(sys.argv[2:], sys.argv[1])
    # real sampling: ranks stop at other lengths, and gather each other's groups
    grpo.main(sys.argv[2:] + ["--dynamic_sampling", "--output_dir", f"{sys.argv[1]}/sampled"])


if __name__ == "__main__":  # under torchrun, from test_grad_accum_and_two_ranks_match_one_process
    common.run(run_under_torchrun)  # as the scripts end
