"""Shared fixtures: the tiny model and one toy SFT checkpoint, built once per test session."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sft  # noqa: E402
from toy.task import TINY_MODEL_DIR, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    if not os.path.exists(TINY_MODEL_DIR):
        build_tiny_model(TINY_MODEL_DIR)
    return TINY_MODEL_DIR


@pytest.fixture(scope="session")
def sft_model(tiny_model, tmp_path_factory):
    """A toy SFT policy (gold score about 0.4), the starting point of every preference test."""
    out = str(tmp_path_factory.mktemp("sft"))
    sft.main(["--output_dir", out, "--max_steps", "400", "--log_every", "50"])
    return out


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """A Qwen-style chat model directory (byte-level BPE, no BOS, ChatML, <|im_end|> EOS); see chat_model.py."""
    from chat_model import build_chat_model

    return build_chat_model(str(tmp_path_factory.mktemp("qwen_style")))
