"""ld_dpo.py: the desensitised log-probs by hand, alpha = 1 is DPO, and training end to end."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import common
import dpo
import ld_dpo
from toy.task import DATA_DIR as TOY_DATA_DIR
from conftest import read_metrics

# Two pairs, chosen rows then rejected rows, right-padded with 0:
#   pair 0: chosen -1 -2 -3 -4 (|y_w| = 4), rejected -5 -6 (|y_l| = 2)          -> l_p = 2
#   pair 1: chosen -1 (|y_w| = 1),          rejected -2 -3 -4 (|y_l| = 3)      -> l_p = 1
CHOSEN = torch.tensor([[-1.0, -2, -3, -4], [-1.0, 0, 0, 0]])
REJECTED = torch.tensor([[-5.0, -6, 0, 0], [-2.0, -3, -4, 0]])


def test_alpha_zero_drops_the_excess_tokens():
    # pair 0: chosen -1 + -2 = -3 (tokens 3, 4 dropped); rejected -5 + -6 = -11 (the shorter: whole)
    # pair 1: chosen -1 (the shorter: whole); rejected -2 (tokens 2, 3 dropped)
    chosen, rejected = ld_dpo.desensitized_logps(CHOSEN, CHOSEN != 0, REJECTED, REJECTED != 0, alpha=0.0)
    assert chosen.tolist() == [-3.0, -1.0]
    assert rejected.tolist() == [-11.0, -2.0]


def test_alpha_half_weighs_the_excess_and_changes_only_the_longer_response():
    # pair 0: chosen -3 + 0.5*(-3 - 4) = -6.5; rejected -11 unchanged
    # pair 1: chosen -1 unchanged;             rejected -2 + 0.5*(-3 - 4) = -5.5
    chosen, rejected = ld_dpo.desensitized_logps(CHOSEN, CHOSEN != 0, REJECTED, REJECTED != 0, alpha=0.5)
    assert chosen.tolist() == [-6.5, -1.0]
    assert rejected.tolist() == [-11.0, -5.5]


def test_alpha_one_is_the_plain_sum():
    chosen, rejected = ld_dpo.desensitized_logps(CHOSEN, CHOSEN != 0, REJECTED, REJECTED != 0, alpha=1.0)
    assert torch.equal(chosen, CHOSEN.sum(-1)) and torch.equal(rejected, REJECTED.sum(-1))  # -10 -1, -11 -9


def test_public_length_counts_response_tokens_not_columns():
    # the same pair 0 with the chosen tokens shifted right by one padding column: l_p is still 2
    shifted = torch.tensor([[0.0, -1, -2, -3, -4]])
    chosen, _ = ld_dpo.desensitized_logps(shifted, shifted != 0, torch.tensor([[-5.0, -6, 0, 0, 0]]),
                                          torch.tensor([[True, True, False, False, False]]), alpha=0.0)
    assert chosen.tolist() == [-3.0]


def test_ld_dpo_loss_by_hand():
    # policy: pair 0 above; reference: chosen -1.5 -2 -3 -3, rejected -5 -5; alpha 0.5, beta 0.1
    #   policy:    chosen -1-2 + 0.5*(-3-4) = -6.5      rejected -11
    #   reference: chosen -1.5-2 + 0.5*(-3-3) = -6.5    rejected -10
    #   h = (-6.5 - -6.5) - (-11 - -10) = 1  ->  L = -logsig(0.1) = 0.644397
    # (plain DPO: h = (-10 - -9.5) - (-11 - -10) = 0.5  ->  L = -logsig(0.05) = 0.668460)
    policy = torch.tensor([[-1.0, -2, -3, -4], [-5.0, -6, 0, 0]])
    ref = torch.tensor([[-1.5, -2, -3, -3], [-5.0, -5, 0, 0]])
    args = ld_dpo.parse_args([])
    losses, chosen_r, rejected_r = ld_dpo.dpo_loss(*ld_dpo.pair_logps(policy, ref, policy != 0, args.ld_alpha), beta=0.1)
    assert args.ld_alpha == 0.5
    assert losses.item() == pytest.approx(0.644397, abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.0, abs=1e-7) and rejected_r.item() == pytest.approx(-0.1, abs=1e-7)
    losses, _, _ = dpo.dpo_loss(*dpo.pair_logps(policy, ref, policy != 0), beta=0.1)
    assert losses.item() == pytest.approx(0.668460, abs=1e-6)


def test_ld_dpo_step_by_hand():
    # the pair above as one micro-batch's share of a global batch of 2 pairs and 8 chosen tokens, RPO weight 1:
    #   loss = 0.644397 / 2 - 1 * (-1-2-3-4) / 8 = 0.322199 + 1.25 = 1.572199
    #   rewards: chosen 0.1 * (-6.5 - -6.5) = 0, rejected 0.1 * (-11 - -10) = -0.1; logps: the desensitised sums
    policy = torch.tensor([[-1.0, -2, -3, -4], [-5.0, -6, 0, 0]])
    ref = torch.tensor([[-1.5, -2, -3, -3], [-5.0, -5, 0, 0]])
    args = ld_dpo.parse_args(["--rpo_alpha", "1"])
    loss, metrics = ld_dpo.ld_dpo_step(policy, ref, policy != 0, 2, 8, args)
    assert loss.item() == pytest.approx(1.572199, abs=1e-6) and metrics["loss"] is loss
    expected = {"rewards/chosen": 0.0, "rewards/rejected": -0.1, "rewards/margins": 0.1, "rewards/accuracies": 1.0,
                "logps/chosen": -6.5, "logps/rejected": -11.0}
    assert {k: float(v) for k, v in metrics.items() if k != "loss"} == pytest.approx(expected, abs=1e-6)


def test_rdpo_term_is_added():
    # R-DPO (Park et al. 2024, eq. 9): z = beta*h + alpha*(|y_w| - |y_l|), here h = 1, beta = 0.1 and
    # alpha*(|y_w| - |y_l|) = 0.01 * (10 - 5) = 0.05: L = log(1 + e^-0.15) = log(1.860708) = 0.620957
    losses, _, _ = ld_dpo.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                   torch.tensor([-1.5]), beta=0.1, rdpo_term=0.01 * (10 - 5))
    assert losses.item() == pytest.approx(0.620957, abs=1e-6)


def test_identical_chosen_and_rejected_give_log2():
    chosen, rejected = ld_dpo.desensitized_logps(CHOSEN, CHOSEN != 0, CHOSEN, CHOSEN != 0, alpha=0.3)
    losses, _, _ = ld_dpo.dpo_loss(chosen, rejected, chosen + 1, rejected + 1)
    assert torch.allclose(losses, torch.full((2,), math.log(2)), atol=1e-7)


def test_alpha_outside_0_1_is_a_user_error():
    with pytest.raises(common.UserError, match="ld_alpha"):
        ld_dpo.parse_args(["--ld_alpha", "1.5"])


def small_pairs(tmp_path, n=48):
    """The first n toy pairs, outside toy/data so that the (slow) toy eval is skipped."""
    path = tmp_path / "pairs.jsonl"
    with open(os.path.join(TOY_DATA_DIR, "pairs.jsonl")) as src:
        path.write_text("".join(list(src)[:n]))
    return str(path)


def test_alpha_one_trains_exactly_like_dpo(sft_model, tmp_path):
    common_args = ["--model", sft_model, "--data", small_pairs(tmp_path), "--max_steps", "2", "--batch_size", "8",
                   "--log_every", "1", "--lr", "1e-3"]
    dpo.main([*common_args, "--output_dir", str(tmp_path / "dpo")])
    ld_dpo.main([*common_args, "--output_dir", str(tmp_path / "ld"), "--ld_alpha", "1.0"])
    for a, b in zip(read_metrics(tmp_path / "dpo"), read_metrics(tmp_path / "ld"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)
    wa, wb = load_file(tmp_path / "dpo" / "model.safetensors"), load_file(tmp_path / "ld" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_end_to_end_heldout_reward_accuracy_rises(sft_model, tmp_path):
    ld_dpo.main(["--model", sft_model, "--output_dir", str(tmp_path), "--max_steps", "20", "--log_every", "10"])
    evals = [m for m in read_metrics(tmp_path) if "eval/rewards/accuracies" in m]
    assert evals[0]["eval/rewards/accuracies"] == 0  # policy == reference: every reward is 0
    assert evals[-1]["eval/rewards/accuracies"] > 0.7
    assert evals[-1]["eval/rewards/margins"] > 0
