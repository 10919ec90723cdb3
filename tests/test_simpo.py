"""simpo.py: the SimPO and CPO losses by hand, the NLL mix, and end-to-end training on the toy task."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import simpo
from conftest import naive_completion_logps, read_metrics
from toy.task import DATA_DIR as TOY_DATA_DIR

PAIRS = [
    {"prompt": "tell me about animals :", "chosen": "cat dog horse", "rejected": "red"},
    {"prompt": "tell me about fruits and tools :", "chosen": "apple saw", "rejected": "rain snow wind fog"},
    {"prompt": "tell me about music :", "chosen": "drum flute piano violin", "rejected": "golf"},
    {"prompt": "tell me about colors :", "chosen": "red", "rejected": "cat cow"},
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) < tol


def test_simpo_loss_by_hand():
    # chosen: sum -4 over 2 tokens -> avg -2 -> r_w = 2 * -2 = -4
    # rejected: sum -9 over 3 tokens -> avg -3 -> r_l = 2 * -3 = -6
    # z = r_w - r_l - gamma = -4 + 6 - 0.5 = 1.5;  L = -logsig(1.5) = log(1 + e^-1.5) = log(1.2231302) = 0.2014133
    losses, chosen_rewards, rejected_rewards = simpo.simpo_loss(
        torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([2]), torch.tensor([3]), beta=2.0, gamma=0.5)
    assert close(losses[0], 0.201413)
    assert close(chosen_rewards[0], -4.0) and close(rejected_rewards[0], -6.0)


def test_simpo_normalizes_by_length():
    # the same average log-prob (-1 per token) over 2 and over 10 tokens: r_w = r_l = 2 * -1 = -2,
    # so L = -logsig(0 - gamma) = log(1 + e^1) = 1.3132617 (summed log-probs would give r_w - r_l = 16)
    losses, chosen_rewards, rejected_rewards = simpo.simpo_loss(
        torch.tensor([-2.0]), torch.tensor([-10.0]), torch.tensor([2]), torch.tensor([10]), beta=2.0, gamma=1.0)
    assert close(chosen_rewards[0], rejected_rewards[0])
    assert close(losses[0], math.log(1 + math.e))


def test_cpo_loss_by_hand():
    # summed log-probs, no length normalization, no margin: r_w = 0.1 * -4 = -0.4, r_l = 0.1 * -9 = -0.9
    # z = -0.4 + 0.9 = 0.5;  L = log(1 + e^-0.5) = log(1.6065307) = 0.4740770
    losses, chosen_rewards, rejected_rewards = simpo.cpo_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), beta=0.1)
    assert close(losses[0], 0.474077)
    assert close(chosen_rewards[0], -0.4) and close(rejected_rewards[0], -0.9)


def test_identical_chosen_and_rejected_give_finite_losses():
    # r_w = r_l: SimPO L = log(1 + e^gamma) = log(1 + e) = 1.3132617, CPO L = log 2 = 0.6931472
    logps, lengths = torch.tensor([-3.0, -7.5]), torch.tensor([3, 5])
    losses, _, _ = simpo.simpo_loss(logps, logps, lengths, lengths, beta=2.0, gamma=1.0)
    assert torch.allclose(losses, torch.full((2,), math.log(1 + math.e)))
    losses, _, _ = simpo.cpo_loss(logps, logps, beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))


def test_simpo_step_by_hand():
    # the pair of test_simpo_loss_by_hand (chosen -1 -3, rejected -3 -3 -3) as one micro-batch's share of a global
    # batch of 2 pairs and 4 chosen tokens: NLL = 4 / 4 = 1
    policy = torch.tensor([[-1.0, -3, 0], [-3.0, -3, -3]])
    # SimPO, beta 2, gamma 0.5, cpo_alpha 0.5: loss = 0.201413 / 2 + 0.5 * 1 = 0.600707; the logps are averages
    args = simpo.parse_args(["--gamma", "0.5", "--cpo_alpha", "0.5"])
    loss, metrics = simpo.simpo_step(policy, policy != 0, 2, 4, args)
    assert close(loss, 0.600707) and metrics["loss"] is loss
    assert {k: float(v) for k, v in metrics.items() if k != "loss"} == pytest.approx(
        {"nll_loss": 1.0, "rewards/chosen": -4.0, "rewards/rejected": -6.0, "rewards/margins": 2.0,
         "rewards/accuracies": 1.0, "logps/chosen": -2.0, "logps/rejected": -3.0}, abs=1e-6)
    # CPO, beta 0.1, cpo_alpha 1: loss = 0.474077 / 2 + 1 = 1.237039; the logps are sums
    loss, metrics = simpo.simpo_step(policy, policy != 0, 2, 4, simpo.parse_args(["--loss", "cpo"]))
    assert close(loss, 1.237039)
    assert {k: float(v) for k, v in metrics.items() if k != "loss"} == pytest.approx(
        {"nll_loss": 1.0, "rewards/chosen": -0.4, "rewards/rejected": -0.9, "rewards/margins": 0.5,
         "rewards/accuracies": 1.0, "logps/chosen": -4.0, "logps/rejected": -9.0}, abs=1e-6)


def test_means_keep_loss_and_nll_as_they_are():
    # loss and nll_loss are already global-batch means; the rest are sums over the 4 pairs
    sums = {"loss": 0.3, "nll_loss": 0.2, "rewards/chosen": -8.0, "rewards/accuracies": 3.0}
    assert common.means(sums, 4, "eval/", simpo.SHARES) == pytest.approx(
        {"eval/loss": 0.3, "eval/nll_loss": 0.2, "eval/rewards/chosen": -2.0, "eval/rewards/accuracies": 0.75})


def test_cpo_defaults_and_flag_checks():
    args = simpo.parse_args(["--loss", "cpo"])
    assert (args.beta, args.cpo_alpha) == (0.1, 1.0)
    args = simpo.parse_args([])
    assert (args.beta, args.gamma, args.cpo_alpha) == (2.0, 1.0, 0.0)
    args = simpo.parse_args(["--loss", "cpo", "--beta", "0.5", "--cpo_alpha", "0"])
    assert (args.beta, args.cpo_alpha) == (0.5, 0.0)
    with pytest.raises(common.UserError):
        simpo.parse_args(["--loss", "cpo", "--gamma", "0.5"])


@pytest.mark.parametrize("flags", [["--cpo_alpha", "0.5"], ["--loss", "cpo"]])
def test_nll_mix(tiny_model, tmp_path, flags):
    """The logged step-1 loss is the mean pair loss plus cpo_alpha times the chosen token-mean NLL, recomputed
    here by hand from the untrained model's log-probs, each sequence scored alone (one global batch holds all
    four pairs)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    simpo.main(["--model", tiny_model, "--data", str(data), "--output_dir", str(tmp_path / "out"),
                "--max_steps", "1", "--batch_size", "4", "--log_every", "1", *flags])
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model)
    chosen = [naive_completion_logps(model, tokenizer, p["prompt"], p["chosen"]) for p in PAIRS]
    rejected = [naive_completion_logps(model, tokenizer, p["prompt"], p["rejected"]) for p in PAIRS]
    pair_losses = []
    for w, l in zip(chosen, rejected, strict=True):
        if flags == ["--loss", "cpo"]:  # the CPO defaults beta 0.1, cpo_alpha 1: z = beta*logp_w - beta*logp_l
            z = 0.1 * w.sum().item() - 0.1 * l.sum().item()
        else:  # SimPO, beta 2, gamma 1: z = beta*avg_logp_w - beta*avg_logp_l - gamma
            z = 2.0 * w.sum().item() / len(w) - 2.0 * l.sum().item() / len(l) - 1.0
        pair_losses.append(math.log1p(math.exp(-z)))  # -logsig(z)
    alpha = 1.0 if flags == ["--loss", "cpo"] else 0.5
    nll = -sum(w.sum().item() for w in chosen) / sum(len(w) for w in chosen)  # a token mean over the chosen
    (logged,) = read_metrics(tmp_path / "out")
    assert close(logged["nll_loss"], nll, 1e-5)
    assert close(logged["loss"], sum(pair_losses) / 4 + alpha * nll, 1e-5)


@pytest.mark.parametrize("flags", [[], ["--loss", "cpo"]])
def test_end_to_end_heldout_accuracy_rises(sft_model, tmp_path, flags):
    out = tmp_path / "out"
    simpo.main(["--model", sft_model, "--output_dir", str(out), "--max_steps", "30", "--log_every", "10", *flags])
    evals = [m for m in read_metrics(out) if "eval/rewards/accuracies" in m]
    assert [r["step"] for r in evals] == [0, 30]
    assert evals[-1]["eval/rewards/accuracies"] > evals[0]["eval/rewards/accuracies"]
    assert os.path.exists(out / "model.safetensors")


def test_torchrun_two_processes_match_one(sft_model, tmp_path):
    # SimPO + NLL (cpo_alpha 1), 3 steps: 2 processes x batch 4 (FSDP2 on gloo) against 1 process x batch 8
    data = tmp_path / "pairs.jsonl"  # the first 48 toy pairs, outside toy/data so that the slow toy eval is skipped
    with open(os.path.join(TOY_DATA_DIR, "pairs.jsonl")) as f:
        data.write_text("".join(list(f)[:48]))
    flags = ["--model", sft_model, "--data", str(data), "--max_steps", "3", "--log_every", "1", "--lr", "1e-3",
             "--cpo_alpha", "1.0"]
    simpo.main([*flags, "--output_dir", str(tmp_path / "one"), "--batch_size", "8"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "simpo.py", *flags,
           "--output_dir", str(tmp_path / "two"), "--batch_size", "4"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for one, two in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), strict=True):
        for key in ("loss", "nll_loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert close(one[key], two[key], 1e-5), key
        assert one["rewards/accuracies"] == two["rewards/accuracies"]
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
