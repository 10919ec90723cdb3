"""Shared fixtures: the tiny model (also with a tokenizer that adds no BOS) and one toy SFT checkpoint,
built once per test session; `device`, where the device-aware tests run: TEST_DEVICE (default cpu), e.g.
TEST_DEVICE=cuda python -m pytest -q tests/test_logps.py tests/test_packing.py (as bench/gpu_check.sh does)."""
import json
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sft  # noqa: E402
from toy.task import TINY_MODEL_DIR, build_tiny_model  # noqa: E402

DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # a rank the tests launch that aborts prints where it was


def pytest_configure(config):
    # a run meant for a GPU must not pass on CPU by accident
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"TEST_DEVICE={DEVICE} but torch {torch.__version__} sees no CUDA device")


@pytest.fixture
def device():
    return DEVICE


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


@pytest.fixture(scope="session")
def no_bos_model(tiny_model, tmp_path_factory):
    """The tiny model with a Qwen-style tokenizer: the same words, but no BOS token and no post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("no_bos")
    backend = Tokenizer(models.WordLevel(AutoTokenizer.from_pretrained(tiny_model).get_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(out)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model, name), out)
    return str(out)


def read_metrics(out):
    """The rows of out/metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def naive_completion_logps(model, tokenizer, prompt, completion):
    """Per-token log-probs (1-D) of a plain-text completion and its EOS after a plain-text prompt, without the
    project's tokenize, collate or log-prob code: the sequence alone, full logits, log_softmax, gather."""
    prompt_ids = tokenizer(prompt).input_ids  # with BOS when the tokenizer adds one
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logps[len(prompt_ids) - 1:]  # the last prompt token predicts the first completion token
