"""sft.py: the loss by hand, training end to end, checkpoint round trip, and torchrun equivalence."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import common
import logprobs
import sft
from toy.task import DATA_DIR, TINY_MODEL_DIR
from conftest import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sft_loss_by_hand():
    """2 sequences x 3 positions x 5 classes; 4 of the 6 positions are scored.

    A row of logits [ln 2, 0, 0, 0, 0] has softmax denominator 2 + 4 = 6, so
    log p(class 0) = ln 2 - ln 6 = -ln 3 and log p(any other class) = -ln 6.
    A row of zeros gives -ln 5 to every class.
    """
    ln2 = math.log(2)
    peaked, flat = [ln2, 0, 0, 0, 0], [0, 0, 0, 0, 0]
    logits = torch.tensor([[peaked, peaked, flat], [flat, peaked, peaked]])
    labels = torch.tensor([[0, 3, -100], [-100, 0, 4]])
    token_logps = logprobs.gather_logps(logits, labels)
    # scored: -ln 3 (row 0, class 0 of peaked), -ln 6 (row 0, class 3), -ln 3 (row 1), -ln 6 (row 1, class 4)
    # token mean over the 4 tokens: (2 ln 3 + 2 ln 6) / 4 = (2.1972246 + 3.5835189) / 4 = 1.4451859
    loss = sft.sft_loss(token_logps, labels != -100, n_tokens=4)
    assert abs(loss.item() - 1.4451859) < 1e-6


def test_micro_batches_add_up_to_one_token_mean():
    """Rows of 1 and 3 scored tokens as two micro-batches: their sft_step losses add up to the token mean over
    all 4 tokens, (ln 3 + ln 5 + ln 3 + ln 6) / 4 = ln(270) / 4 = 1.3996055, not the mean of the rows' means
    (ln 3 + (ln 5 + ln 3 + ln 6) / 3) / 2 = 1.2992744; the perplexity is exp(ln(270) / 4) = 270 ** 0.25."""
    ln2 = math.log(2)
    peaked, flat = [ln2, 0, 0, 0, 0], [0, 0, 0, 0, 0]
    logits = torch.tensor([[peaked, peaked, flat], [flat, peaked, peaked]])
    labels = torch.tensor([[0, -100, -100], [3, 0, 4]])
    sums = common.Sums()
    for row in range(2):
        token_logps = logprobs.gather_logps(logits[row:row + 1], labels[row:row + 1])
        sums.add(sft.sft_step(token_logps, labels[row:row + 1] != -100, n_tokens=4)[1])
    logged = sft.token_means(sums.total(torch.device("cpu")), 4, prefix="eval/")
    assert logged == pytest.approx({"eval/loss": 1.3996055, "eval/perplexity": 270 ** 0.25}, abs=1e-6)


def copy_toy_data(tmp_path):
    """The toy SFT data outside toy/data, so runs skip the (slower) generation eval."""
    path = tmp_path / "sft.jsonl"
    shutil.copy(os.path.join(DATA_DIR, "sft.jsonl"), path)
    return str(path)


def test_training_lowers_the_loss_and_the_checkpoint_reloads(tmp_path, tiny_model):
    out = str(tmp_path / "out")
    sft.main(["--model", TINY_MODEL_DIR, "--data", copy_toy_data(tmp_path),
              "--output_dir", out, "--max_steps", "60", "--log_every", "10"])
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < losses[0] - 0.2, losses
    assert {"loss", "perplexity", "lr", "grad_norm", "tokens/s"} <= set(read_metrics(out)[-1])

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(tiny_model)
    trained.load_state_dict(load_file(os.path.join(out, "model.safetensors")))
    ids = torch.tensor([[1, 7, 8, 9, 30, 11, 40, 41]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained(ids).logits)
        assert not torch.allclose(reloaded(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_default_run_on_the_toy_task_raises_the_gold_score(sft_model):
    evals = [r for r in read_metrics(sft_model) if "eval/gold_score" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 400
    assert evals[-1]["eval/gold_score"] > evals[0]["eval/gold_score"] + 0.1, evals


def test_torchrun_two_processes_match_one(tmp_path, tiny_model):
    data = copy_toy_data(tmp_path)
    common_flags = ["--model", TINY_MODEL_DIR, "--data", data,
                    "--max_steps", "3", "--log_every", "1", "--grad_accum", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    sft.main(common_flags + ["--output_dir", one, "--batch_size", "8"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py", *common_flags,
           "--output_dir", two, "--batch_size", "4"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=300, capture_output=True)
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    w1, w2 = load_file(os.path.join(one, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=0)
    assert not torch.equal(w1["model.layers.0.mlp.up_proj.weight"],
                           load_file(os.path.join(tiny_model, "model.safetensors"))["model.layers.0.mlp.up_proj.weight"])


def test_tied_embeddings_are_saved_once_under_torchrun(tmp_path, tiny_model):
    """A model with tie_word_embeddings: 2 processes (FSDP2) save the tensors one process saves, no second
    copy of the embedding as lm_head.weight, and the directory reloads with lm_head tied to the embedding."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = str(tmp_path / "tied")
    config = LlamaConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(model_dir)
    flags = ["--model", model_dir, "--data", copy_toy_data(tmp_path), "--max_steps", "2", "--log_every", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    sft.main(flags + ["--output_dir", one, "--batch_size", "8"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py", *flags,
           "--output_dir", two, "--batch_size", "4"]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, timeout=300,
                   capture_output=True)
    w1, w2 = load_file(os.path.join(one, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    assert "lm_head.weight" not in w1 and sorted(w1) == sorted(w2)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(two)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, w2["model.embed_tokens.weight"])
