"""LoRA (lora.py): the adapter layer against a hand-built W + (alpha/r) B@A, the reference as the adapter off,
the saved adapter and merged model, training (log 2 at step 1, the base untouched, exact resume, 2 ranks), an
adapter as --model, and rm.py with a LoRA backbone."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import batching
import checkpoint
import common
import dpo
import formats
import logprobs
import lora
import models
import reward_models
import rm
import sft
from conftest import ROOT, read_metrics
from test_reliability import assert_resumes_exactly
from toy.task import DATA_DIR

CPU = torch.device("cpu")
FLAGS = ["--max_steps", "6", "--batch_size", "4", "--max_length", "64", "--log_every", "1", "--lr", "1e-2",
         "--lora_r", "8", "--merge_lora"]


def toy_rows(tmp_path, name, n):
    """The first n rows of a toy data file, outside toy/data (no toy eval)."""
    path = tmp_path / name
    with open(os.path.join(DATA_DIR, name)) as f:
        path.write_text("".join(f.readlines()[:n]))
    return str(path)


def lora_policy(model_dir, *flags):
    args = dpo.parse_args(["--model", model_dir, "--lora_r", "4", "--lora_alpha", "8", *flags])
    return args, *models.load_policy(args, CPU)


def pair_batch(tokenizer, tmp_path, n=4):
    rows, _ = formats.read_data(toy_rows(tmp_path, "pairs.jsonl", n), ("chosen", "rejected"))
    return batching.collate_pairs(formats.tokenize(rows, tokenizer, 64, ("chosen", "rejected")),
                                  tokenizer.pad_token_id, CPU)


def test_adapter_layer_is_w_plus_scaled_ba_with_its_gradient(tiny_model):
    _, _, model = lora_policy(tiny_model)
    layer = model.model.layers[0].self_attn.q_proj
    A, B, W = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight
    assert torch.equal(B, torch.zeros_like(B))  # B = 0 at first: the policy starts as the base
    with torch.no_grad():
        B.normal_()  # as after some training
    x, g = torch.randn(3, W.shape[1]), torch.randn(3, W.shape[0])
    a, b = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    by_hand = x @ (W.detach() + (8 / 4) * b @ a).T  # alpha/r = 8/4
    out = layer(x)
    assert torch.allclose(out, by_hand, atol=1e-5)
    (out * g).sum().backward()
    (by_hand * g).sum().backward()
    # float32 sums of terms of size ~50, added in another order
    torch.testing.assert_close(A.grad, a.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(B.grad, b.grad, rtol=1e-5, atol=1e-4)
    assert W.grad is None
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained) and set(trained.values()) == {torch.float32}


def test_bf16_base_keeps_a_float32_adapter(tiny_model, tmp_path):
    _, tokenizer, model = lora_policy(tiny_model, "--dtype", "bfloat16")
    dtypes = {(".lora_" in n, p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    logprobs.token_logps(model, pair_batch(tokenizer, tmp_path)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_reference_is_the_base_and_both_saves_load_back(sft_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args, tokenizer, model = lora_policy(sft_model)
    for _, layer in lora.layers(model):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)  # a trained-looking adapter
    batch = pair_batch(tokenizer, tmp_path)
    with torch.no_grad():
        policy = logprobs.naive_token_logps(model, batch)
    base = logprobs.token_logps(models.load_reference(args, CPU, sft_model), batch)  # the base, from its files
    reference = logprobs.token_logps(models.load_reference(args, CPU, policy=model), batch)
    assert torch.equal(reference, base)  # the adapter off is the base, bit for bit
    assert (policy - base).abs().max() > 1e-2  # and the adapter does change the policy
    checkpoint.save_model(model, tokenizer, str(tmp_path / "adapter"), torch.float32)
    checkpoint.save_model(model, tokenizer, str(tmp_path / "merged"), torch.float32, merge=True)
    assert sorted(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))[0] == \
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"  # peft's names
    loaded = {"merged": AutoModelForCausalLM.from_pretrained(tmp_path / "merged"),
              "peft": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_model), tmp_path / "adapter"),
              "as --model": models.load_model(str(tmp_path / "adapter"), CPU)}
    for name, other in loaded.items():
        with torch.no_grad():
            assert (logprobs.naive_token_logps(other, batch) - policy).abs().max() < 1e-5, name


def test_an_adapter_on_the_lm_head_is_refused(tiny_model):
    """HeadLogps computes the log-probs from the head's weight, so an adapter there would never train."""
    config = lora.config(8, 16, 0.0, "q_proj,lm_head", tiny_model)
    with pytest.raises(common.UserError, match="^--lora_target_modules: the LM head cannot take an adapter"):
        lora.add_adapter(models.load_model(tiny_model, CPU), config, 0)
    lora.add_adapter(models.load_model(tiny_model, CPU), lora.config(8, 16, 0.0, "q_proj", tiny_model), 0)


def test_peft_missing_is_one_line(sft_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(common.UserError, match="pip install peft"):
        lora_policy(sft_model)


@pytest.fixture(scope="module")
def lora_dpo(sft_model, tmp_path_factory):
    """6 steps of LoRA DPO (batch 4), the policy kept to look at after training."""
    tmp = tmp_path_factory.mktemp("lora_dpo")
    data, out, kept = toy_rows(tmp, "pairs.jsonl", 32), str(tmp / "out"), []
    real = models.load_policy
    flags = FLAGS + ["--model", sft_model, "--data", data]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_policy", lambda *a: kept.append(real(*a)) or kept[-1])
        dpo.main(flags + ["--output_dir", out])
    return flags, out, kept[0][1]


def test_lora_dpo_starts_at_log2_trains_and_leaves_the_base(sft_model, lora_dpo):
    _, out, policy = lora_dpo
    rows = read_metrics(out)
    # step 1: B = 0, so policy == reference: h = 0 and L = -log sigmoid(0) = log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == 0.0 and rows[-1]["rewards/margins"] > 0.05
    base = load_file(os.path.join(sft_model, "model.safetensors"))
    state = {k.replace(".base_layer.", "."): v for k, v in policy.state_dict().items() if ".lora_" not in k}
    assert state.keys() == base.keys() and all(torch.equal(state[k], base[k]) for k in base)  # bit for bit


def test_lora_resumes_exactly_from_adapter_checkpoints(lora_dpo, tmp_path, monkeypatch):
    flags, _, _ = lora_dpo
    assert_resumes_exactly(dpo.main, flags + ["--save_every", "2"], tmp_path, monkeypatch)
    ckpt = tmp_path / "resumed" / "checkpoint-6"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(ckpt))
    assert all(".lora_" in k for k in load_file(ckpt / "adapter_model.safetensors"))  # the adapter alone


def test_lora_torchrun_two_processes_match_one(lora_dpo, tmp_path):
    flags, out, _ = lora_dpo
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dpo.py", *flags,
           "--batch_size", "2", "--output_dir", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(read_metrics(out), read_metrics(str(tmp_path)), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (out, str(tmp_path)))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_dpo_on_an_sft_adapter_trains_on_base_plus_adapter(sft_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = str(tmp_path / "sft_lora")
    data = toy_rows(tmp_path, "sft.jsonl", 32)
    sft.main(["--model", sft_model, "--data", data, "--eval_data", data, "--output_dir", adapter, "--max_steps", "8",
              "--batch_size", "4", "--log_every", "1", "--lr", "1e-2", "--lora_r", "8"])
    rows = read_metrics(adapter)
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"] - 0.005  # the NLL of the 32 rows trained on
    assert json.load(open(os.path.join(adapter, "adapter_config.json")))["base_model_name_or_path"] == sft_model
    kept, real = [], models.load_reference
    out = str(tmp_path / "dpo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_reference", lambda *a, **k: kept.append(real(*a, **k)) or kept[-1])
        dpo.main(["--model", adapter, "--data", toy_rows(tmp_path, "pairs.jsonl", 8), "--output_dir", out,
                  "--max_steps", "1", "--batch_size", "8", "--lora_r", "8", "--log_every", "1"])
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0)
    tokenizer = models.load_tokenizer(adapter)
    batch = pair_batch(tokenizer, tmp_path)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_model), adapter)
    base = AutoModelForCausalLM.from_pretrained(sft_model)
    with torch.no_grad():
        reference, expected = logprobs.token_logps(kept[0], batch), logprobs.naive_token_logps(peft_model, batch)
        bare = logprobs.naive_token_logps(base, batch)
    assert (reference - expected).abs().max() < 1e-5  # the reference is base + the SFT adapter
    assert (reference - bare).abs().max() > 1e-3  # not the bare base
    assert os.listdir(out).count("adapter_config.json") == 1


def test_rm_with_a_lora_backbone_trains_and_loads_back(sft_model, tmp_path):
    out = str(tmp_path / "rm")
    rm.main(["--model", sft_model, "--data", toy_rows(tmp_path, "pairs.jsonl", 32), "--output_dir", out,
             "--max_steps", "6", "--batch_size", "4", "--log_every", "1", "--lr", "1e-2", "--lora_r", "8"])
    rows = read_metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"adapter_model.safetensors", "value_head.safetensors"} <= set(os.listdir(out))
    model = reward_models.load_reward_model(out, CPU)  # the base + adapter merged, the trained head
    assert model.value_head.weight.abs().sum() > 0


def test_lora_dropout_is_off_by_default_and_drops_the_adapter_input(tiny_model):
    _, _, model = lora_policy(tiny_model)
    assert isinstance(model.model.layers[0].self_attn.q_proj.lora_dropout["default"], torch.nn.Identity)
    _, _, model = lora_policy(tiny_model, "--lora_dropout", "0.5")
    layer = model.model.layers[0].self_attn.q_proj
    A, B, W = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight
    with torch.no_grad():
        B.normal_()
    x = torch.randn(3, W.shape[1])
    layer.train()
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)  # the same draw of torch's dropout: each input kept with probability 1 - p, times 1/(1 - p)
    dropped = torch.nn.functional.dropout(x, 0.5)
    assert set((dropped / x).unique().tolist()) == {0.0, 2.0}
    by_hand = x @ W.T + (8 / 4) * dropped @ A.T @ B.T  # the base sees all of x, the adapter the dropped x
    torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (W + (8 / 4) * B @ A).T, atol=1e-5, rtol=1e-5)  # no dropout in eval


def test_lora_kto_rewards_are_zero_at_step_one(sft_model, tmp_path):
    import kto

    out = str(tmp_path / "kto")
    kto.main(["--model", sft_model, "--data", toy_rows(tmp_path, "unpaired.jsonl", 32), "--output_dir", out,
              "--max_steps", "3", "--batch_size", "8", "--log_every", "1", "--lr", "1e-2", "--lora_r", "8"])
    rows = read_metrics(out)
    # step 1: B = 0, so logp = logp_ref: r = 0, z0 = max(0, 0) = 0, beta * r = 0 and L = 1 - sigmoid(0) = 0.5
    assert (rows[0]["rewards/chosen"], rows[0]["rewards/rejected"], rows[0]["kl"]) == (0.0, 0.0, 0.0)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert rows[-1]["rewards/chosen"] != 0 and rows[-1]["rewards/margins"] > 0  # the reference stays the base


def test_lora_ppo_starts_at_the_reference(tiny_model, tmp_path):
    import ppo
    from transformers import AutoModel

    reward_model = str(tmp_path / "rm")  # an untrained head: a reward model that is only a function of the text
    torch.manual_seed(0)
    reward_models.save_reward_model(reward_models.RewardModel(models.load_model(tiny_model, CPU, auto_class=AutoModel)),
                         models.load_tokenizer(tiny_model), reward_model)
    out = str(tmp_path / "ppo")
    ppo.main(["--model", tiny_model, "--reward_model", reward_model, "--data", toy_rows(tmp_path, "prompts.jsonl", 16),
              "--output_dir", out, "--max_steps", "2", "--batch_size", "8", "--num_mini_batches", "1",
              "--ppo_epochs", "1", "--warmup_ratio", "0", "--log_every", "1", "--lr", "1e-2", "--lora_r", "8",
              "--num_sample_generations", "0", "--save_value_model"])
    first, second = read_metrics(out)
    # step 1: B = 0, so pi = pi_ref on every sampled token: KL = sum(logp - logp_ref) = 0 and the rlhf reward is
    # the score; one update of one minibatch starts at ratio pi/pi_old = 1, inside the clip: clipfrac 0
    assert first["objective/kl"] == 0.0 and first["objective/rlhf_reward"] == first["objective/scores"]
    assert first["policy/clipfrac"] == 0.0
    assert second["objective/kl"] != 0.0  # the adapter moved the policy; the reference stayed the base
    # the value model: its own adapter on the reward model's backbone (saved alone), its head trained in full
    value = os.path.join(out, "value_model")
    assert os.path.isfile(os.path.join(value, "adapter_config.json"))
    assert all(".lora_" in k for k in load_file(os.path.join(value, "adapter_model.safetensors")))
    head, start = (load_file(os.path.join(d, reward_models.HEAD_FILE))["weight"] for d in (value, reward_model))
    assert not torch.equal(head, start)


def test_lora_grpo_starts_at_kl_zero_and_raises_the_gold_score(sft_model, tmp_path):
    import grpo

    out = str(tmp_path / "grpo")
    grpo.main(["--model", sft_model, "--output_dir", out, "--max_steps", "30", "--log_every", "1", "--lr", "3e-3",
               "--lora_r", "8", "--beta", "0.04", "--num_sample_generations", "0"])
    rows = read_metrics(out)
    train, evals = [r for r in rows if "reward" in r], [r for r in rows if "eval/gold_score" in r]
    # step 1: B = 0, so logp = logp_ref and KL_t = exp(logp_ref - logp) - (logp_ref - logp) - 1 = 1 - 0 - 1 = 0
    assert train[0]["kl"] == 0.0 and train[-1]["kl"] > 0  # (step 1's update has lr 0: warmup starts at 0)
    assert evals[-1]["eval/gold_score"] > evals[0]["eval/gold_score"] + 0.02, evals  # about +0.04 measured
