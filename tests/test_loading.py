"""Sharded loading (models.load_model under FSDP2): each rank reads only its shards, and the model comes out as
from_pretrained makes it, for plain, tied, prefixed (AutoModel from a causal LM) and converted (MoE) files."""
import argparse
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import common
from sharded_load import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    """A tiny Mixtral: its files hold one tensor per expert, which transformers fuses on load."""
    from transformers import MixtralConfig, MixtralForCausalLM

    out = str(tmp_path_factory.mktemp("mixtral"))
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
    model.save_pretrained(out)
    stored = set(safe_open(os.path.join(out, "model.safetensors"), "pt").keys())
    assert not set(model.state_dict()) <= stored  # the converting path is the one exercised
    return out


def specs(tiny_model, chat_model, moe_model):
    return [f"{tiny_model}:AutoModelForCausalLM:bfloat16", f"{chat_model}:AutoModelForCausalLM:bfloat16",
            f"{tiny_model}:AutoModel:bfloat16", f"{moe_model}:AutoModelForCausalLM:bfloat16"]


def test_one_process_bf16_loads_sharded_float32_weights_as_from_pretrained(tiny_model, chat_model, moe_model):
    device = common.setup(argparse.Namespace(dtype="bfloat16", seed=0, dist_timeout=5, padding_free=None))
    for spec in specs(tiny_model, chat_model, moe_model):
        check(*spec.split(":"), device)


def test_two_ranks_load_shards_as_from_pretrained(tiny_model, chat_model, moe_model):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "tests", "sharded_load.py"), *specs(tiny_model, chat_model, moe_model)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("models load as from_pretrained does") == 2


def test_sharded_rollout_gathers_once_and_samples_the_same_tokens(tiny_model):
    """generate() on an FSDP2 policy under torchrun (2 ranks, gloo): gathered once for the rollout (models.unsharded)
    against FSDP2's gather per layer per decoded token; see sharded_rollout.py."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "sharded_rollout.py"), tiny_model]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"gathers": 5') == 2, done.stdout  # 4 layers and the root, once each, on each rank
