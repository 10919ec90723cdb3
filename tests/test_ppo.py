import math
import os
import subprocess
import sys

import pytest
import torch

import batching
import common
import formats
import logprobs
import models
import ppo
import reward_models
import rm
from conftest import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


# ---------------------------------------------------------------- GAE

def test_gae_by_hand_with_a_masked_position_after_eos():
    gamma, lam = 1.0, 0.95
    # row 0: 3 response tokens, then a masked position whose reward and value are garbage
    # row 1: 4 tokens, reward 1 at the end, values 0: A_t = lam^(3-t)
    rewards = torch.tensor([[0.1, -0.2, 1.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.3, 0.8, 9.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    # row 0, backwards (V and A past the end are 0):
    a2 = 1.0 + gamma * 0.0 - 0.8                   # delta_2 = 0.2                      A_2 = 0.2
    a1 = (-0.2 + gamma * 0.8 - 0.3) + gamma * lam * a2   # delta_1 = 0.3, A_1 = 0.3 + 0.95*0.2 = 0.49
    a0 = (0.1 + gamma * 0.3 - 0.5) + gamma * lam * a1    # delta_0 = -0.1, A_0 = -0.1 + 0.95*0.49 = 0.3655
    assert [a0, a1, a2] == pytest.approx([0.3655, 0.49, 0.2])
    expected_adv = torch.tensor([[a0, a1, a2, 0.0], [0.95 ** 3, 0.95 ** 2, 0.95, 1.0]])
    expected_ret = torch.tensor([[a0 + 0.5, a1 + 0.3, a2 + 0.8, 0.0], [0.95 ** 3, 0.95 ** 2, 0.95, 1.0]])
    torch.testing.assert_close(advantages, expected_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, expected_ret, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- policy loss

@pytest.mark.parametrize("advantage, ratio, loss, clipped, grad", [
    # loss = max(-A*r, -A*clip(r, 0.8, 1.2)); d loss / d logp = -A*r where the unclipped term wins, else 0
    (1.0, 1.1, -1.1, 0.0, -1.1),   # inside: both terms -1.1
    (1.0, 1.5, -1.2, 1.0, 0.0),    # above: max(-1.5, -1.2) = -1.2, clipped, no gradient
    (1.0, 0.5, -0.5, 0.0, -0.5),   # below: max(-0.5, -0.8) = -0.5, unclipped (pessimistic)
    (-1.0, 1.1, 1.1, 0.0, 1.1),    # inside
    (-1.0, 1.5, 1.5, 0.0, 1.5),    # above: max(1.5, 1.2) = 1.5, unclipped
    (-1.0, 0.5, 0.8, 1.0, 0.0),    # below: max(0.5, 0.8) = 0.8, clipped, no gradient
])
def test_policy_loss_clipping(advantage, ratio, loss, clipped, grad):
    logps = torch.tensor([[0.3 + torch.log(torch.tensor(ratio)).item()]], requires_grad=True)
    old_logps = torch.tensor([[0.3]])
    got, clipfrac = ppo.policy_loss(logps, old_logps, torch.tensor([[advantage]]), torch.ones(1, 1), 0.2)
    got.backward()
    assert got.item() == pytest.approx(loss, abs=1e-6)
    assert clipfrac.item() == clipped
    assert logps.grad.item() == pytest.approx(grad, abs=1e-6)


def test_policy_loss_is_a_masked_token_mean():
    ratios = torch.tensor([[1.1, 1.5, 3.0]])  # the third token is masked out
    loss, clipfrac = ppo.policy_loss(ratios.log(), torch.zeros(1, 3), torch.ones(1, 3),
                                     torch.tensor([[1.0, 1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx((-1.1 + -1.2) / 2, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


# ---------------------------------------------------------------- value loss

def test_value_loss_clipping():
    # old value 1, return 2, cliprange_value 0.2: the clipped value lies in [0.8, 1.2]
    values = torch.tensor([[1.1, 1.5, 0.5, 3.0, 5.0]], requires_grad=True)
    old_values = torch.ones(1, 5)
    returns = torch.full((1, 5), 2.0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = ppo.value_loss(values, old_values, returns, mask, 0.2)
    per_token = [
        (1.1 - 2) ** 2,  # inside: 0.81 either way
        (1.2 - 2) ** 2,  # 1.5 -> 1.2: max(0.25, 0.64) = 0.64, the clipped error
        (0.5 - 2) ** 2,  # 0.5 -> 0.8: max(2.25, 1.44) = 2.25, the unclipped error
        (3.0 - 2) ** 2,  # 3.0 -> 1.2: max(1.0, 0.64) = 1.0, the unclipped error
    ]
    assert loss.item() == pytest.approx(0.5 * sum(per_token) / 4, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 4)
    loss.backward()
    # d/dV of 0.5 * mean: (V - ret) / 4 where unclipped wins, 0 where the clipped error wins or masked
    torch.testing.assert_close(values.grad, torch.tensor([[-0.9 / 4, 0.0, -1.5 / 4, 1.0 / 4, 0.0]]))


# ---------------------------------------------------------------- rewards

def test_score_lands_on_the_last_response_token_when_pad_is_eos():
    eos = pad = 2
    generated = torch.tensor([
        [5, 6, eos, pad, pad],   # EOS at index 2; generate pads the rest with pad == eos
        [eos, pad, pad, pad, pad],  # EOS first: a one-token response
        [5, 6, 7, 8, 9],         # cut off without EOS: the score goes on the last token
    ])
    completions = common.completions_from(generated, [eos])
    assert completions == [[5, 6, eos], [eos], [5, 6, 7, 8, 9]]
    batch = batching.collate([[1, 10], [1], [1, 11, 12]], completions, pad, CPU)
    mask = (batch["labels"] != -100).float()
    old_logps = torch.full((3, 5), 0.5)  # logp - ref_logp = 0.2 everywhere, also on padding
    ref_logps = torch.full((3, 5), 0.3)
    rewards = ppo.kl_rewards(old_logps, ref_logps, torch.tensor([1.0, 2.0, 3.0]), mask, kl_coef=0.1)
    k = -0.1 * 0.2
    expected = torch.tensor([
        [k, k, k + 1.0, 0, 0],
        [k + 2.0, 0, 0, 0, 0],
        [k, k, k, k, k + 3.0],
    ])
    torch.testing.assert_close(rewards, expected, atol=1e-6, rtol=1e-6)


def test_whiten_over_response_tokens():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # values 1, 3, 5, 7: mean 4, unbiased variance (9 + 1 + 1 + 9) / 3 = 20/3
    std = (20 / 3) ** 0.5
    expected = torch.tensor([[-3 / std, -1 / std, 0.0], [1 / std, 3 / std, 0.0]])
    torch.testing.assert_close(ppo.whiten(x, mask, CPU), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ppo.whiten(x, mask, CPU, shift_mean=False), (expected + 4) * mask, atol=1e-6, rtol=1e-6)


def test_global_mean_std_over_masked_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    # 1, 2, 3: mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1; the masked 100 counts for nothing
    assert common.global_mean_std(x, CPU, torch.tensor([[1.0, 1.0, 1.0, 0.0]])) == pytest.approx((2.0, 1.0))
    # all four: mean 26.5, squared deviations 25.5^2 + 24.5^2 + 23.5^2 + 73.5^2 = 7205, std sqrt(7205 / 3)
    assert common.global_mean_std(x, CPU) == pytest.approx((26.5, (7205 / 3) ** 0.5))


# ---------------------------------------------------------------- sampling is what is scored

def test_sampled_tokens_are_scored_with_the_sampling_distribution(tiny_model):
    from transformers import AutoModel

    args = ppo.parse_args(["--model", tiny_model, "--temperature", "0.7", "--max_new_tokens", "12"])
    tokenizer, policy = models.load_policy(args, CPU)
    policy.generation_config.top_k = 50  # hub-style defaults that must not leak into PPO's sampling
    policy.generation_config.repetition_penalty = 1.5
    common.set_sampling(policy, args, tokenizer)
    value_model = reward_models.RewardModel(models.load_model(tiny_model, CPU, auto_class=AutoModel))
    rows = [{"prompt": p} for p in ["tell me about animals :", "tell me about fruits and tools :"] * 3]
    prompts = formats.tokenize(rows, tokenizer, 64, ())

    torch.manual_seed(0)
    policy.train()  # as in training: rollout samples and scores in eval mode, the update runs in train mode
    sampled = ppo.rollout(policy, policy, value_model, value_model, prompts, tokenizer, args, CPU)
    batch = sampled.batch
    torch.manual_seed(0)  # the same draw again, now keeping generate's own (processed) scores
    query = batching.collate_prompts(prompts, tokenizer.pad_token_id, CPU)
    out = policy.generate(input_ids=query["input_ids"], attention_mask=query["attention_mask"],
                          output_scores=True, return_dict_in_generate=True)

    mask = batch["labels"] != -100
    C = batch["labels"].shape[1]
    generated = out.sequences[:, query["input_ids"].shape[1]:][:, :C]
    assert torch.equal(generated[mask], batch["labels"][mask])
    sampled_logps = torch.stack(out.scores[:C], 1).log_softmax(-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(sampled.old_logps[mask], sampled_logps[mask], atol=1e-5, rtol=0)
    assert torch.equal(sampled.has_eos, batch["labels"].gather(1, mask.sum(1, keepdim=True) - 1).squeeze(1)
                       == tokenizer.eos_token_id)
    # the update's forward scores the same log-probs
    logps, _ = logprobs.logps_and_entropy(policy, batch, args.temperature)
    torch.testing.assert_close(logps, sampled.old_logps, atol=1e-6, rtol=1e-6)  # |logp| ~ 5


def test_bf16_update_starts_where_the_rollout_scored(tiny_model):
    # bf16 at T = 0.7 (CUDA's default dtype, on CPU here): the update's first forward (logps_and_entropy, train mode)
    # must score the rollout's old_logps exactly, so that the first ratio exp(logp - old_logp) is 1
    from transformers import AutoModel

    args = ppo.parse_args(["--model", tiny_model, "--temperature", "0.7", "--max_new_tokens", "12", "--dtype",
                           "bfloat16"])
    common.setup(args)  # bf16 compute on float32 weights: a one-rank FSDP2
    tokenizer, policy = models.load_policy(args, CPU)
    assert policy.dtype == torch.float32 and models.is_sharded(policy)
    common.set_sampling(policy, args, tokenizer)
    value_model = reward_models.RewardModel(models.load_model(tiny_model, CPU, "bfloat16", auto_class=AutoModel))
    rows = [{"prompt": p} for p in ["tell me about animals :", "tell me about fruits and tools :"] * 3]
    torch.manual_seed(0)
    policy.train()
    sampled = ppo.rollout(policy, policy, value_model, value_model, formats.tokenize(rows, tokenizer, 64, ()),
                          tokenizer, args, CPU)
    assert policy.training  # rollout hands the policy back in train mode, as the update uses it
    logps, _ = logprobs.logps_and_entropy(policy, sampled.batch, args.temperature)
    mask = sampled.batch["labels"] != -100
    assert mask.sum() > 6 and logps.dtype == sampled.old_logps.dtype == torch.float32
    torch.testing.assert_close(logps[mask], sampled.old_logps[mask], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def reward_model(sft_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rm"))
    rm.main(["--model", sft_model, "--output_dir", out, "--max_steps", "40", "--log_every", "40"])
    return out


def test_ppo_raises_the_reward_model_score(sft_model, reward_model, tmp_path):
    out = str(tmp_path / "ppo")
    ppo.main(["--model", sft_model, "--reward_model", reward_model, "--output_dir", out, "--max_steps", "4",
              "--batch_size", "16", "--num_mini_batches", "2", "--log_every", "1", "--save_value_model"])
    train = [m for m in read_metrics(out) if "objective/scores" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for m in train for v in m.values())
    assert train[-1]["objective/scores"] > train[0]["objective/scores"] + 0.5, [m["objective/scores"] for m in train]
    assert train[-1]["objective/kl"] > 0  # the policy moved away from the reference
    value_model = reward_models.load_reward_model(os.path.join(out, "value_model"), CPU)
    assert value_model.value_head.weight.shape == (1, value_model.backbone.config.hidden_size)


def test_ppo_under_torchrun_does_not_deadlock(sft_model, reward_model, tmp_path):
    out = str(tmp_path / "ppo2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "ppo.py"), "--model", sft_model, "--reward_model", reward_model, "--output_dir", out,
           "--max_steps", "2", "--batch_size", "8", "--num_mini_batches", "1", "--ppo_epochs", "1",
           "--warmup_ratio", "0",
           "--log_every", "1", "--save_value_model"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    train = [m for m in read_metrics(out) if "objective/scores" in m]
    assert [m["step"] for m in train] == [1, 2]
    assert all(math.isfinite(v) for m in train for v in m.values())
    from safetensors.torch import load_file

    before, after = (load_file(os.path.join(d, "model.safetensors")) for d in (sft_model, out))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert reward_models.load_reward_model(os.path.join(out, "value_model"), CPU).value_head.weight.abs().sum() > 0
