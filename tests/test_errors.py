"""Bad input: one line on stderr naming the file (and line) and what to do, exit code 2,
no traceback, and no output directory left behind. A few cases are real `python sft.py` runs (started
together, since each spends its time importing torch); the rest call the script's main through
common.run in this process, the same code path without the import cost."""
import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import formats
import models
from conftest import ROOT
from toy.task import TINY_MODEL_DIR

GOOD = {"prompt": "tell me about music :", "completion": "drum flute piano"}
USER, REPLY = {"role": "user", "content": "tell me about music :"}, {"role": "assistant", "content": "drum flute"}
SYSTEM = {"role": "system", "content": "be brief"}
STRICT = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"  # as
          "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"  # Gemma's and Mistral's
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


TINY = ["--model", TINY_MODEL_DIR]  # a script given its own data needs --model


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# case id: (script, file contents or None for the toy data, extra flags, pieces the one error line must contain)
CASES = {
    "not_json": ("sft.py", jsonl(GOOD, "{'prompt': 'single quotes'}"), TINY, ["data.jsonl:2: not valid JSON"]),
    "missing_field": ("sft.py", jsonl(GOOD, GOOD, {"prompt": "tell me :"}), TINY,
                      ["data.jsonl:3: missing field 'completion'", "each line needs prompt, completion"]),
    "messages_not_role_content": ("sft.py", jsonl({"prompt": [{"role": "user", "text": "hi"}], "completion": "x"}), TINY,
                                  ["data.jsonl:1: field 'prompt' must be a list of {'role': str, 'content': str}"]),
    "completion_not_text": ("sft.py", jsonl(GOOD, {"prompt": "tell me :", "completion": 7}), TINY,
                            ["data.jsonl:2: field 'completion' must be a string or a list of messages, got 7"]),
    "empty_completion": ("sft.py", jsonl(GOOD, {"prompt": "tell me :", "completion": "  "}), TINY,
                         ["data.jsonl:2: field 'completion' is empty"]),
    "empty_file": ("sft.py", "\n", TINY, ["data.jsonl: no examples; the file is empty"]),
    "smaller_than_one_batch": ("sft.py", jsonl(GOOD, GOOD, GOOD), [*TINY, "--batch_size", "2", "--grad_accum", "2"],
                               ["data.jsonl: 3 examples is fewer than one global batch (4", "lower --batch_size"]),
    "non_utf8": ("sft.py", jsonl(GOOD).encode() + b'{"prompt": "caf\xe9", "completion": "drum"}\n', TINY,
                 ["data.jsonl:2: not valid UTF-8; re-encode the file as UTF-8"]),
    "missing_data_file": ("sft.py", "absent", TINY, ["data.jsonl: no such data file"]),
    "model_path_missing": ("sft.py", None, ["--model", "/no/such/model"],
                           ["/no/such/model: no such model directory"]),
    "model_not_a_model_dir": ("sft.py", None, ["--model", os.path.join(ROOT, "toy")], ["toy: no config.json"]),
    "model_not_causal_lm": ("sft.py", None, ["--model", "BACKBONE"],
                            ["backbone: not loadable as AutoModelForCausalLM", "lacks lm_head.weight"]),
    "model_pickle_only": ("sft.py", None, ["--model", "PICKLED"],
                          ["pickled has only pickle weights (.bin)", "--allow_pickle"]),
    "model_not_causal_lm_bf16": ("sft.py", None, ["--model", "BACKBONE", "--dtype", "bfloat16"],  # sharded loading
                                 ["backbone: not loadable as AutoModelForCausalLM", "lacks lm_head.weight"]),
    "model_config_not_its_weights_bf16": ("sft.py", None, ["--model", "RESHAPED", "--dtype", "bfloat16"],
                                          ["reshaped: model.layers.0.mlp.gate_proj.weight is stored as [384, 128], "
                                           "but its config.json makes it [100, 128]"]),
    "batch_size_zero": ("sft.py", None, ["--batch_size", "0"], ["--batch_size must be > 0, got 0"]),
    "warmup_ratio_above_one": ("sft.py", None, ["--warmup_ratio", "1.5"],
                               ["--warmup_ratio must be >= 0 and <= 1, got 1.5"]),
    "ppo_cliprange_zero": ("ppo.py", None, ["--cliprange", "0"], ["--cliprange must be > 0, got 0.0"]),
    "ppo_lam_above_one": ("ppo.py", None, ["--lam", "1.5"], ["--lam must be >= 0 and <= 1, got 1.5"]),
    "rm_negative_center_coef": ("rm.py", None, ["--center_coef", "-1"], ["--center_coef must be >= 0, got -1.0"]),
    "dpo_beta_zero": ("dpo.py", None, ["--beta", "0"], ["--beta must be > 0, got 0.0"]),
    "ld_dpo_alpha_above_one": ("ld_dpo.py", None, ["--ld_alpha", "1.5"], ["--ld_alpha must be >= 0 and <= 1, got 1.5"]),
    "empty_prompt_without_bos": ("sft.py", jsonl(GOOD, {"prompt": "", "completion": "drum"}),
                                 ["--model", "NOBOS", "--batch_size", "1"],
                                 ["data.jsonl:2: the prompt is empty after tokenization", "adds no BOS token"]),
    "max_length_too_small": ("sft.py", jsonl(GOOD, GOOD), [*TINY, "--max_length", "2", "--batch_size", "1"],  # 3 words + EOS
                             ["data.jsonl:1: --max_length 2 cannot hold one prompt token and the whole completion",
                              "use --max_length 5 or more"]),
    "grpo_no_reward": ("grpo.py", jsonl({"prompt": "tell me about music :"}), TINY,
                       ["data.jsonl: no reward given; pass --reward_fn path/to/file.py:function or --reward_model"]),
    "grpo_reward_fn_absent": ("grpo.py", None, ["--model", TINY_MODEL_DIR, "--reward_fn", "toy/rewards.py:nope"],
                              ["--reward_fn toy/rewards.py:nope: toy/rewards.py has no function 'nope'"]),
    "own_data_without_model": ("dpo.py", jsonl({"prompt": "hi", "chosen": " a", "rejected": " b"}), [],
                               ["data.jsonl: give --model, the model to train on this data"]),
    "data_dir_missing": ("dpo.py", None, ["--model", TINY_MODEL_DIR, "--data", "/nonexistent/pairs.jsonl"],
                         ["/nonexistent/pairs.jsonl: no such data file"]),
    "kto_label_not_bool": ("kto.py", jsonl({**GOOD, "label": True}, {**GOOD, "label": "yes"}), ["--model", TINY_MODEL_DIR],
                           ["data.jsonl:2: field 'label' must be true or false, got \"yes\""]),
    # data shapes (the other refusals are in test_data.py): one line naming the file and line
    "data_json_array": ("sft.py", json.dumps([GOOD, GOOD], indent=2), TINY,
                        ["data.jsonl:1: expected JSONL, one object per line; this is a JSON array"]),
    "data_csv": ("sft.py", "prompt,completion\nhi,there\n", TINY,
                 ["data.jsonl:1: expected JSONL, one object per line; this looks like CSV"]),
    "data_shape_changes": ("sft.py", jsonl({"messages": [USER, REPLY]}, GOOD), TINY,
                           ["data.jsonl:2: a prompt/completion text row, but the first row is messages"]),
    "chat_template_rewrites_turns": ("sft.py", jsonl({"messages": [USER, REPLY, USER, REPLY]}), ["--model", "REWRITING"],
                                     ["data.jsonl:1: the chat template renders messages 1-2 differently"]),
    "chat_template_has_no_system_role": ("sft.py", jsonl({"messages": [SYSTEM, USER, REPLY]}), ["--model", "STRICT"],
                                         ["data.jsonl:1: the model's chat template refuses this conversation: System "
                                          "role not supported; this model's template has no system role: merge it "
                                          "into the first user turn"]),
    "chat_template_wants_alternating_roles": ("sft.py", jsonl({"messages": [USER, USER, REPLY]}), ["--model", "STRICT"],
                                              ["data.jsonl:1: the model's chat template refuses this conversation: "
                                               "Conversation roles must alternate user/assistant/user/assistant",
                                               "give turns that alternate user/assistant"]),
    "implicit_pairs_of_text": ("dpo.py", jsonl({"chosen": "a b", "rejected": "a c"}), ["--model", TINY_MODEL_DIR],
                               ["data.jsonl:1: without a 'prompt' field, 'chosen' and 'rejected' must both be lists"]),
    "pair_mixing_h4_and_reply": ("dpo.py", jsonl({"prompt": "hi", "chosen": [USER, REPLY], "rejected": [REPLY]}),
                                 ["--model", TINY_MODEL_DIR],
                                 ["data.jsonl:1: field 'chosen' must be one assistant reply (its roles: user, assistant)"]),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model, no_bos_model):
    """A backbone without its LM head (not a causal LM), a copy of the tiny model with pickle weights only,
    one whose chat template rewrites earlier turns, one whose template refuses system turns and turns that do
    not alternate, the tiny model with a tokenizer that adds no BOS, and one whose config.json does not match
    its weights."""
    from test_data import REWRITING
    from transformers import AutoModel, AutoTokenizer

    root = tmp_path_factory.mktemp("models")
    backbone, pickled, rewriting = str(root / "backbone"), str(root / "pickled"), str(root / "rewriting")
    shutil.copytree(tiny_model, rewriting)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = REWRITING
    tokenizer.save_pretrained(rewriting)
    strict = str(root / "strict")
    shutil.copytree(tiny_model, strict)
    tokenizer.chat_template = STRICT
    tokenizer.save_pretrained(strict)
    AutoModel.from_pretrained(tiny_model).save_pretrained(backbone)
    shutil.copytree(tiny_model, pickled)
    torch.save(load_file(os.path.join(pickled, "model.safetensors")), os.path.join(pickled, "pytorch_model.bin"))
    os.remove(os.path.join(pickled, "model.safetensors"))
    reshaped = str(root / "reshaped")
    shutil.copytree(tiny_model, reshaped)
    with open(os.path.join(reshaped, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(reshaped, "config.json"), "w") as f:
        json.dump({**config, "intermediate_size": 100}, f)
    return {"BACKBONE": backbone, "PICKLED": pickled, "REWRITING": rewriting, "NOBOS": no_bos_model,
            "RESHAPED": reshaped, "STRICT": strict}


SUBPROCESS_CASES = ("not_json", "model_path_missing", "model_pickle_only", "dpo_beta_zero")  # the real command line, end to end


def run_in_process(script, argv):
    """(stderr, exit code) of `python script argv`, run through common.run in this process."""
    module = importlib.import_module(script.removesuffix(".py"))
    err, cwd, sigterm = io.StringIO(), os.getcwd(), signal.getsignal(signal.SIGTERM)
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            common.run(lambda: module.main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(cwd)
        signal.signal(signal.SIGTERM, sigterm)
    return err.getvalue(), code


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dirs):
    """Every case's run; return case -> (stderr, exit code, output dir)."""
    started, done = {}, {}
    for case, (script, contents, flags, _) in CASES.items():
        root = tmp_path_factory.mktemp(case)
        argv = [model_dirs.get(f, f) for f in flags]
        if contents is not None:
            path = root / "data.jsonl"
            if contents != "absent":
                (path.write_bytes if isinstance(contents, bytes) else path.write_text)(contents)
            argv += ["--data", str(path)]
        out = str(root / "out")
        argv = ["--output_dir", out, "--max_steps", "2", *argv]
        if case in SUBPROCESS_CASES:
            started[case] = subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True), out
        else:
            done[case] = (*run_in_process(script, argv), out)
    for case, (proc, out) in started.items():
        done[case] = (proc.communicate(timeout=300)[1], proc.returncode, out)
    return done


@pytest.mark.parametrize("case", CASES)
def test_bad_input(runs, case):
    stderr, code, out = runs[case]
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for piece in CASES[case][3]:
        assert piece in lines[0]
    assert not os.path.exists(out)


def test_long_prompts_are_truncated_with_a_warning(tmp_path):
    """Not an error: the run goes on, after one warning that counts the examples and says what was done."""
    data, out = tmp_path / "data.jsonl", str(tmp_path / "out")
    long = {"prompt": "tell me about " + " and ".join(["music"] * 20) + " :", "completion": "drum flute"}
    data.write_text(jsonl(GOOD, long, GOOD, long))
    proc = subprocess.run([sys.executable, "sft.py", *TINY, "--data", str(data), "--output_dir", out, "--max_length", "16",
                           "--max_steps", "1", "--batch_size", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warning == [f"warning: 2 of 4 examples (the first at {data}:2) are longer than --max_length 16 and "
                       "were truncated, not dropped (prompt from the left first, then the completion); "
                       "raise --max_length to keep them whole"]
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_kto_label_must_be_boolean(tmp_path):
    """kto.py reads its data with a required `label`: a label that is not true/false names the line."""
    path = tmp_path / "unpaired.jsonl"
    path.write_text(jsonl({**GOOD, "label": True}, {**GOOD, "label": "yes"}))
    expected = f"{path}:2: field 'label' must be true or false, got \"yes\""
    with pytest.raises(common.UserError, match=re.escape(expected)):
        formats.read_jsonl(str(path), ["prompt", "completion", "label"])


@pytest.mark.parametrize("flag, value, bounds, message", [
    ("beta", 0.0, dict(above=0), "--beta must be > 0, got 0.0"),
    ("beta", float("nan"), dict(above=0), "--beta must be > 0, got nan"),
    ("alpha", 1.5, dict(low=0, high=1), "--alpha must be >= 0 and <= 1, got 1.5"),
    ("alpha", -0.1, dict(low=0, high=1), "--alpha must be >= 0 and <= 1, got -0.1"),
    ("cliprange", -0.2, dict(above=0), "--cliprange must be > 0, got -0.2"),
])
def test_check_range_rejects(flag, value, bounds, message):
    with pytest.raises(common.UserError, match=f"^{re.escape(message)}$"):
        common.check_range(argparse.Namespace(**{flag: value}), flag, **bounds)


@pytest.mark.parametrize("flag, value, bounds", [
    ("beta", 0.1, dict(above=0)), ("alpha", 0.0, dict(low=0, high=1)), ("alpha", 1.0, dict(low=0, high=1)),
])
def test_check_range_accepts(flag, value, bounds):
    common.check_range(argparse.Namespace(**{flag: value}), flag, **bounds)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: float32 masters, loaded sharded
def test_allow_pickle_loads_the_same_weights(model_dirs, dtype):
    reference = load_file(os.path.join(TINY_MODEL_DIR, "model.safetensors"))
    common.setup(argparse.Namespace(dtype=dtype, seed=0, dist_timeout=5, padding_free=None))
    model = models.load_model(model_dirs["PICKLED"], torch.device("cpu"), dtype, allow_pickle=True, trained=True)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    assert models.is_sharded(model) == (dtype == "bfloat16")
    assert all(torch.equal(state[k], v) for k, v in reference.items())
