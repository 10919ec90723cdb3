"""orpo.py: the odds-ratio loss by hand, its stability near P = 1, the NLL term, and end-to-end training."""
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
import orpo
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


def test_orpo_loss_by_hand():
    # log_odds(y_w) = -0.5 - log(1 - e^-0.5) = -0.5 - log(0.3934693) = -0.5 + 0.9327521 = 0.4327521
    # log_odds(y_l) = -1.0 - log(1 - e^-1.0) = -1.0 - log(0.6321206) = -1.0 + 0.4586751 = -0.5413249
    # log_odds = 0.4327521 + 0.5413249 = 0.9740770
    # L = -0.1 * logsig(0.9740770) = 0.1 * log(1 + e^-0.9740770) = 0.1 * log(1.3775541) = 0.0320298
    losses, log_odds = orpo.orpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), lam=0.1)
    assert close(log_odds[0], 0.974077)
    assert close(losses[0], 0.032030)


def test_orpo_uses_odds_not_probabilities():
    # at equal odds the term is lam * log 2 whatever the probabilities: a_w = a_l = -2.3 -> 0.1 * 0.6931472
    # a chosen P of 1/2 against 1/3 (odds 1 vs 1/2): log_odds = log 2, L = 0.1 * log(1 + 1/2) = 0.0405465
    losses, log_odds = orpo.orpo_loss(torch.tensor([-2.3, math.log(1 / 2)]), torch.tensor([-2.3, math.log(1 / 3)]))
    assert close(log_odds[0], 0.0) and close(losses[0], 0.1 * math.log(2))
    assert close(log_odds[1], math.log(2)) and close(losses[1], 0.1 * math.log(1.5))


def test_orpo_is_finite_as_avg_logp_reaches_zero():
    # P(y) = exp(avg_logp) -> 1 makes 1 - P -> 0 and the odds infinite: losses and gradients must stay finite,
    # including for a pair whose two responses both have P = 1 exactly
    chosen = torch.tensor([0.0, -1e-12, -1e-6, 0.0], requires_grad=True)
    rejected = torch.tensor([-2.0, -2.0, -2.0, 0.0], requires_grad=True)
    losses, log_odds = orpo.orpo_loss(chosen, rejected)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(log_odds).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # near P = 1, log(1 - P) is still accurate: a = -1e-6 -> log(1 - e^a) = log(1e-6 - 5e-13) = -13.8155111
    # log_odds(y_w) = -1e-6 + 13.8155111 = 13.8155101
    # log_odds(y_l) = -2 - log(1 - e^-2) = -2 - log(0.8646647) = -2 + 0.1454135 = -1.8545865
    assert close(log_odds[2], 13.8155101 + 1.8545865, 1e-4)


def test_identical_chosen_and_rejected_give_finite_losses():
    # log_odds = 0 -> L = -0.1 * logsig(0) = 0.1 * log 2 = 0.0693147
    avg = torch.tensor([-0.7, -3.0])
    losses, log_odds = orpo.orpo_loss(avg, avg)
    assert torch.allclose(log_odds, torch.zeros(2))
    assert torch.allclose(losses, torch.full((2,), 0.1 * math.log(2)))


def test_orpo_step_by_hand():
    # the pair of test_orpo_loss_by_hand (chosen -0.5 -0.5: a_w = -0.5; rejected -1: a_l = -1) as one micro-batch's
    # share of a global batch of 2 pairs and 4 chosen tokens: NLL = 1 / 4 = 0.25
    # log_odds_ratio = logsig(0.9740770) = -log(1.3775541) = -0.3202998, loss = 0.03202998 / 2 + 0.25 = 0.2660150
    policy = torch.tensor([[-0.5, -0.5], [-1.0, 0]])
    loss, metrics = orpo.orpo_step(policy, policy != 0, 2, 4, orpo.parse_args([]))
    assert close(loss, 0.266015) and metrics["loss"] is loss  # rewards: 0.1 * a
    expected = {"nll_loss": 0.25, "rewards/chosen": -0.05, "rewards/rejected": -0.1, "rewards/margins": 0.05,
                "rewards/accuracies": 1.0, "logps/chosen": -0.5, "logps/rejected": -1.0,
                "log_odds_ratio": -0.3202998, "log_odds_chosen": 0.974077}
    assert {k: float(v) for k, v in metrics.items() if k != "loss"} == pytest.approx(expected, abs=1e-6)
    means = common.means({**{k: float(v) for k, v in metrics.items()}, "loss": 0.5}, 2, shares=orpo.SHARES)
    assert means == pytest.approx({**{k: v / 2 for k, v in expected.items()}, "loss": 0.5, "nll_loss": 0.25})


def test_beta_is_an_alias_of_lam():
    assert orpo.parse_args([]).lam == 0.1
    assert orpo.parse_args(["--beta", "0.25"]).lam == 0.25


def test_loss_adds_the_chosen_nll(tiny_model, tmp_path):
    """The logged step-1 loss is the mean odds-ratio term plus the chosen token-mean NLL, recomputed here by hand
    from the untrained model's log-probs, each sequence scored alone (one global batch holds all four pairs)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    orpo.main(["--model", tiny_model, "--data", str(data), "--output_dir", str(tmp_path / "out"),
               "--max_steps", "1", "--batch_size", "4", "--log_every", "1"])
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model)
    chosen = [naive_completion_logps(model, tokenizer, p["prompt"], p["chosen"]) for p in PAIRS]
    rejected = [naive_completion_logps(model, tokenizer, p["prompt"], p["rejected"]) for p in PAIRS]

    def log_odds(a):  # log(P / (1 - P)) with P = exp(avg_logp) = exp(a)
        return a - math.log(1 - math.exp(a))

    avg_chosen = [w.sum().item() / len(w) for w in chosen]
    avg_rejected = [l.sum().item() / len(l) for l in rejected]
    ratios = [log_odds(a_w) - log_odds(a_l) for a_w, a_l in zip(avg_chosen, avg_rejected, strict=True)]
    odds_terms = [0.1 * math.log1p(math.exp(-r)) for r in ratios]  # -lam * logsig(ratio), lam = 0.1
    nll = -sum(w.sum().item() for w in chosen) / sum(len(w) for w in chosen)  # a token mean over the chosen
    (logged,) = read_metrics(tmp_path / "out")
    assert close(logged["nll_loss"], nll, 1e-5)
    assert close(logged["loss"], sum(odds_terms) / 4 + nll, 1e-5)
    assert close(logged["log_odds_chosen"], sum(ratios) / 4, 1e-5)
    assert close(logged["log_odds_ratio"], sum(-math.log1p(math.exp(-r)) for r in ratios) / 4, 1e-5)
    assert close(logged["rewards/chosen"], 0.1 * sum(avg_chosen) / 4, 1e-5)


def test_end_to_end_heldout_accuracy_rises(sft_model, tmp_path):
    out = tmp_path / "out"
    orpo.main(["--model", sft_model, "--output_dir", str(out), "--max_steps", "30", "--log_every", "10"])
    evals = [m for m in read_metrics(out) if "eval/rewards/accuracies" in m]
    assert [r["step"] for r in evals] == [0, 30]
    assert evals[-1]["eval/rewards/accuracies"] > evals[0]["eval/rewards/accuracies"]
    assert os.path.exists(out / "model.safetensors")


def test_torchrun_two_processes_match_one(sft_model, tmp_path):
    # ORPO, 3 steps: 2 processes x batch 4 (FSDP2 on gloo) against 1 process x batch 8
    data = tmp_path / "pairs.jsonl"  # the first 48 toy pairs, outside toy/data so that the slow toy eval is skipped
    with open(os.path.join(TOY_DATA_DIR, "pairs.jsonl")) as f:
        data.write_text("".join(list(f)[:48]))
    flags = ["--model", sft_model, "--data", str(data), "--max_steps", "3", "--log_every", "1", "--lr", "1e-3"]
    orpo.main([*flags, "--output_dir", str(tmp_path / "one"), "--batch_size", "8"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "orpo.py", *flags,
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
