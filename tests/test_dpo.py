"""dpo.py: the loss by hand, its variants, the reference paths, and training end to end."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import batching
import dpo
import formats
import logprobs
import models
from conftest import naive_completion_logps, read_metrics
from toy.task import DATA_DIR as TOY_DATA_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- the loss by hand

def test_dpo_loss_by_hand():
    # h = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1; beta*h = 0.1
    # L = -logsig(0.1) = log(1 + e^-0.1) = log(1.904837) = 0.644397
    losses, chosen_r, rejected_r = dpo.dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    assert losses.item() == pytest.approx(0.644397, abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.05, abs=1e-7)  # 0.1 * (-1 - -1.5)
    assert rejected_r.item() == pytest.approx(-0.05, abs=1e-7)  # 0.1 * (-2 - -1.5)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    # h = 0 for every pair, whatever the log-probs: L = -logsig(0) = log 2 = 0.693147
    logps = t(-3.0, -7.5, -0.2)
    losses, chosen_r, rejected_r = dpo.dpo_loss(logps, logps - 1, logps, logps - 1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)), atol=1e-7)
    assert chosen_r.abs().max() == 0 and rejected_r.abs().max() == 0


def test_ipo_loss_by_hand():
    # beta = 0.25, so 1/(2*beta) = 2. Pair 1: h = 1 as above -> (1-2)^2 = 1. Pair 2: h = 0 -> (0-2)^2 = 4
    losses, _, _ = dpo.dpo_loss(t(-1.0, -1.0), t(-2.0, -1.0), t(-1.5, -1.0), t(-1.5, -1.0), beta=0.25, loss_type="ipo")
    assert losses.tolist() == pytest.approx([1.0, 4.0], abs=1e-6)


def test_label_smoothing_by_hand():
    # beta*h = 0.1; eps = 0.2: L = 0.8 * -logsig(0.1) + 0.2 * -logsig(-0.1)
    #   -logsig(0.1) = 0.644397; -logsig(-0.1) = log(1 + e^0.1) = 0.744397
    #   L = 0.8*0.644397 + 0.2*0.744397 = 0.515517 + 0.148879 = 0.664397
    losses, _, _ = dpo.dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1, label_smoothing=0.2)
    assert losses.item() == pytest.approx(0.664397, abs=1e-6)


def test_rdpo_loss_by_hand():
    # R-DPO (Park et al. 2024, eq. 9) with alpha 0.01, |y_w| = 10, |y_l| = 5: alpha*(|y_w| - |y_l|) = +0.05
    # z = beta*h + 0.05 = 0.1 + 0.05 = 0.15;  L = log(1 + e^-0.15) = log(1.860708) = 0.620957
    # (the reversed sign, z = 0.1 - 0.05, would give log(1 + e^-0.05) = 0.668460)
    losses, _, _ = dpo.dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1, rdpo_term=0.01 * (10 - 5))
    assert losses.item() == pytest.approx(0.620957, abs=1e-6)


def test_rdpo_in_the_script_discounts_the_longer_chosen_response(tiny_model, tmp_path):
    # step 1, policy == reference: h = 0, so the loss is the mean over pairs of -logsig(alpha*(|y_w| - |y_l|)),
    # |y| counting the response's words plus its EOS. alpha = 0.5:
    #   pair 1: chosen "cat dog horse" (3 + 1), rejected "red" (1 + 1):              z = 0.5 * 2 = 1
    #   pair 2: chosen "apple" (1 + 1), rejected "rain snow wind fog" (4 + 1):       z = 0.5 * -3 = -1.5
    #   L = (log(1 + e^-1) + log(1 + e^1.5)) / 2 = (0.313262 + 1.701413) / 2 = 1.0073375
    # (the reversed sign gives (1.313262 + 0.201413) / 2 = 0.757337)
    rows = [{"prompt": "tell me about animals :", "chosen": "cat dog horse", "rejected": "red"},
            {"prompt": "tell me about fruits :", "chosen": "apple", "rejected": "rain snow wind fog"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dpo.main(["--model", tiny_model, "--data", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
              "--batch_size", "2", "--log_every", "1", "--rdpo_alpha", "0.5"])
    assert read_metrics(tmp_path / "out")[0]["loss"] == pytest.approx(1.0073375, abs=1e-6)


def test_identical_chosen_and_rejected_give_a_finite_loss():
    same = t(-4.0, -9.0)
    for loss_type in ("sigmoid", "ipo"):
        losses, _, _ = dpo.dpo_loss(same, same, same + 1, same + 1, loss_type=loss_type)
        assert torch.isfinite(losses).all()


def test_gradient_pushes_chosen_up_and_rejected_down():
    # dL/d logp_w = -beta * sigmoid(-beta*h) = -0.1 * sigmoid(-0.1) = -0.1 * 0.475021 = -0.0475021
    # dL/d logp_l = +beta * sigmoid(-beta*h) = +0.0475021
    chosen, rejected = t(-1.0).requires_grad_(), t(-2.0).requires_grad_()
    losses, _, _ = dpo.dpo_loss(chosen, rejected, t(-1.5), t(-1.5), beta=0.1)
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.0475021, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(0.0475021, abs=1e-6)


def test_one_step_on_a_model_raises_chosen_and_lowers_rejected(tiny_model):
    tokenizer = models.load_tokenizer(tiny_model)
    policy = models.load_model(tiny_model, torch.device("cpu"))
    ref = models.frozen(models.load_model(tiny_model, torch.device("cpu")))
    row = {"prompt": "tell me about fruits :", "chosen": "apple pear plum", "rejected": "cat red saw hammer"}
    batch = batching.collate_pairs(formats.tokenize([row], tokenizer, 64, ("chosen", "rejected")),
                                 tokenizer.pad_token_id, torch.device("cpu"))
    mask = batch["labels"] != -100
    before = logprobs.sequence_logps(policy, batch)[0].detach()
    logps = dpo.pair_logps(logprobs.token_logps(policy, batch), logprobs.token_logps(ref, batch).detach(), mask)
    dpo.dpo_loss(*logps)[0].sum().backward()
    torch.optim.SGD(policy.parameters(), lr=0.1).step()
    after = logprobs.sequence_logps(policy, batch)[0].detach()
    assert after[0] > before[0] and after[1] < before[1]  # rows: chosen, then rejected


# ---------------------------------------------------------------- SamPO

def test_sampo_keeps_the_shorter_length_of_real_tokens_and_is_seeded():
    # pair 0: |y_w| = 4, |y_l| = 2 -> keep 2 of each; pair 1: |y_w| = 1, |y_l| = 3 -> keep 1 of each
    lengths = torch.tensor([4, 1, 2, 3])  # chosen rows, then rejected rows
    mask = torch.arange(5)[None, :] < lengths[:, None]
    kept = dpo.sampo_mask(mask, torch.Generator().manual_seed(0))
    assert kept.sum(-1).tolist() == [2, 1, 2, 1]
    assert not (kept & ~mask).any()  # never padding
    assert torch.equal(kept[2], mask[2])  # the shorter response keeps all its tokens
    assert torch.equal(kept, dpo.sampo_mask(mask, torch.Generator().manual_seed(0)))


def test_sampo_draws_uniformly_and_uses_the_same_tokens_for_policy_and_reference():
    # 4000 copies of one pair: chosen logps -1 -2 -3 -4, rejected -5 -6 (keep 2 of 4 chosen tokens).
    # Each chosen token is kept with probability 2/4, so the mean chosen sum is (-1-2-3-4)/2 = -5.
    n = 4000
    tokens = torch.tensor([[-1.0, -2, -3, -4]] * n + [[-5.0, -6, 0, 0]] * n)
    mask = tokens != 0
    chosen, rejected, ref_chosen, ref_rejected = dpo.pair_logps(tokens, tokens - 0.5, mask,
                                                                torch.Generator().manual_seed(1))
    assert chosen.mean().item() == pytest.approx(-5.0, abs=0.1)  # std of the mean: 1.12 / sqrt(4000) = 0.018
    assert torch.all(rejected == -11)  # the shorter response is summed whole
    assert torch.allclose(chosen - ref_chosen, torch.full((n,), 1.0))  # 2 tokens * 0.5: the same positions
    assert torch.allclose(rejected - ref_rejected, torch.full((n,), 1.0))


# ---------------------------------------------------------------- the script

def small_pairs(tmp_path, n=48, identical=False):
    """The first n toy pairs, outside toy/data so that the (slow) toy eval is skipped."""
    path = tmp_path / "pairs.jsonl"
    with open(os.path.join(TOY_DATA_DIR, "pairs.jsonl")) as src, open(path, "w") as dst:
        for line in list(src)[:n]:
            row = json.loads(line)
            if identical:
                row["rejected"] = row["chosen"]
            dst.write(json.dumps(row) + "\n")
    return str(path)


def run_dpo(model, data, out, *extra):
    dpo.main(["--model", model, "--data", data, "--output_dir", str(out), "--max_steps", "3", "--batch_size", "8",
              "--log_every", "1", "--lr", "1e-3", "--rpo_alpha", "1.0", *extra])
    return read_metrics(out)


def assert_same_run(a, b):
    for ma, mb in zip(read_metrics(a), read_metrics(b), strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert ma[key] == pytest.approx(mb[key], abs=1e-5)
        # until the first update moves it, the policy is the reference: each reward is rounding noise around 0
        # (the reference scored in other batches differs in the last bit), so each accuracy is a coin toss
        if abs(ma["rewards/margins"]) > 1e-4:
            assert ma["rewards/accuracies"] == mb["rewards/accuracies"]
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.fixture(scope="module")
def live_run(sft_model, tmp_path_factory):
    """3 steps of DPO + RPO (rpo_alpha 1) with the live reference, batch 8, in one process."""
    tmp = tmp_path_factory.mktemp("live")
    data = small_pairs(tmp)
    run_dpo(sft_model, data, tmp / "out")
    return data, str(tmp / "out")


def test_precompute_ref_matches_the_live_reference(sft_model, live_run, tmp_path):
    data, live = live_run
    run_dpo(sft_model, data, tmp_path, "--precompute_ref")
    assert_same_run(live, str(tmp_path))


def test_rpo_adds_the_chosen_token_mean_nll(sft_model, tmp_path):
    # 8 pairs, batch 8: step 1 sees all of them, with policy == reference, so the DPO term is log 2 and the loss
    # is log 2 + 1.0 * NLL(chosen), the NLL a token mean over the 8 chosen responses, each scored here alone
    data = small_pairs(tmp_path, n=8)
    metrics = run_dpo(sft_model, data, tmp_path / "out", "--max_steps", "1")
    tokenizer, model = AutoTokenizer.from_pretrained(sft_model), AutoModelForCausalLM.from_pretrained(sft_model)
    chosen = [naive_completion_logps(model, tokenizer, row["prompt"], row["chosen"])
              for row in map(json.loads, open(data))]
    assert len(chosen) == 8
    nll = -sum(c.sum().item() for c in chosen) / sum(len(c) for c in chosen)
    assert metrics[0]["loss"] == pytest.approx(math.log(2) + nll, abs=1e-5)


def test_identical_pairs_train_without_nan(sft_model, tmp_path):
    metrics = run_dpo(sft_model, small_pairs(tmp_path, identical=True), tmp_path / "out", "--rpo_alpha", "0")
    assert all(m["loss"] == pytest.approx(math.log(2), abs=1e-6) for m in metrics)  # h = 0 for every pair
    assert all(m["grad_norm"] < 1e-6 for m in metrics)  # chosen and rejected gradients cancel (up to rounding)


def model_with_dropout(tiny_model, path, kind):
    """The toy tokenizer with a model whose dropout rate is 0.3: the tiny Llama with attention_dropout 0.3
    (a float its attention reads in train mode), or a small GPT-2 (nn.Dropout on embeddings, attention, residuals)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if kind == "llama":
        shutil.copytree(tiny_model, path)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    else:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                   resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dropout_is_off_so_step_one_is_log2(tiny_model, tmp_path, kind):
    # policy == reference at step 1, so h = 0 and L = -logsig(0) = log 2 = 0.693147 for every pair, unless dropout
    # makes the policy's train-mode forward differ from the reference's
    model = model_with_dropout(tiny_model, tmp_path / "model", kind)
    metrics = run_dpo(model, small_pairs(tmp_path, n=8), tmp_path / "out", "--max_steps", "1", "--rpo_alpha", "0")
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_bad_flags_are_user_errors():
    with pytest.raises(common.UserError, match="ipo"):
        dpo.parse_args(["--loss_type", "ipo", "--label_smoothing", "0.1"])
    with pytest.raises(common.UserError, match="label_smoothing"):
        dpo.parse_args(["--label_smoothing", "0.5"])


def test_end_to_end_heldout_reward_accuracy_rises(sft_model, tmp_path):
    dpo.main(["--model", sft_model, "--output_dir", str(tmp_path), "--max_steps", "20", "--log_every", "10"])
    evals = [m for m in read_metrics(tmp_path) if "eval/rewards/accuracies" in m]
    assert evals[0]["eval/rewards/accuracies"] == 0  # policy == reference: every reward is 0
    assert evals[-1]["eval/rewards/accuracies"] > 0.7
    assert evals[-1]["eval/rewards/margins"] > 0


def test_torchrun_two_processes_match_one(sft_model, live_run, tmp_path):
    # 2 processes x batch 4 (FSDP2 on gloo), reference log-probs precomputed and swapped between ranks,
    # against 1 process x batch 8 with the live reference
    data, live = live_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dpo.py",
           "--model", sft_model, "--data", data, "--output_dir", str(tmp_path), "--max_steps", "3", "--batch_size", "4",
           "--log_every", "1", "--lr", "1e-3", "--rpo_alpha", "1.0", "--precompute_ref"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(live, str(tmp_path))
