"""Resume, atomic checkpoints, pre-emption and the NaN guard, on sft.py and the tiny model;
exact resume also for dpo.py, rm.py and ppo.py.

metrics.jsonl rows are compared on every field except `tokens/s*`, the only ones that depend on time.
The data is a 64-row copy of the toy SFT data outside toy/data, so no run spends time on the toy eval.
"""
import glob
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import common
import dpo
import ppo
import reward_models
import rm
import sft
from conftest import ROOT
from toy.task import DATA_DIR, TINY_MODEL_DIR

FLAGS = ["--model", TINY_MODEL_DIR,
         "--max_steps", "6", "--batch_size", "4", "--max_length", "64", "--log_every", "1", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    with open(os.path.join(DATA_DIR, "sft.jsonl")) as f:
        path.write_text("".join(f.readlines()[:64]))
    return str(path)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory, tiny_model):
    """6 steps without a stop: the run every interrupted one must reproduce."""
    out = str(tmp_path_factory.mktemp("straight"))
    sft.main(FLAGS + ["--data", data, "--output_dir", out])
    return out


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("tokens/s")} for line in f]


def model_weights(directory):
    """The model's tensors: model.safetensors (one process) or model-0000k-of-0000n.safetensors (one per rank)."""
    files = [n for n in os.listdir(directory) if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", n)]
    assert files, f"no weights in {directory}"
    return {k: v for n in files for k, v in load_file(os.path.join(directory, n)).items()}


def same_weights(dir_a, dir_b):
    a, b = model_weights(dir_a), model_weights(dir_b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sigterm_during_step(monkeypatch, n):
    """Pre-empt this process: SIGTERM arrives while optimizer step n runs."""
    real, calls = common.clip_and_step, []

    def clip_and_step(*args):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(common, "clip_and_step", clip_and_step)


def test_exact_resume_after_preemption(data, straight, tmp_path, monkeypatch):
    out = str(tmp_path)
    sigterm_during_step(monkeypatch, 3)
    with pytest.raises(SystemExit) as stopped:
        sft.main(FLAGS + ["--data", data, "--output_dir", out])
    assert stopped.value.code == 0
    assert sorted(os.listdir(out)) == ["checkpoint-3", "metrics.jsonl"]  # stopped after step 3, no final model
    monkeypatch.undo()

    def refuse(*args, **kwargs):
        raise AssertionError("resuming unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)  # a checkpoint someone hands you cannot run code
    sft.main(FLAGS + ["--data", data, "--output_dir", out, "--resume"])
    monkeypatch.undo()
    assert same_weights(straight, out)  # bit for bit
    assert rows(out) == rows(straight)
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]  # appended, nothing twice


def assert_resumes_exactly(main, flags, tmp_path, monkeypatch):
    """A run pre-empted during step 3 and resumed ends where the straight run does: weights bit for bit, the
    same metrics rows, none twice."""
    straight_out, out = str(tmp_path / "straight"), str(tmp_path / "resumed")
    main(flags + ["--output_dir", straight_out])
    sigterm_during_step(monkeypatch, 3)
    with pytest.raises(SystemExit):
        main(flags + ["--output_dir", out])
    monkeypatch.undo()
    main(flags + ["--output_dir", out, "--resume"])
    assert same_weights(straight_out, out)
    assert rows(out) == rows(straight_out) and [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]


def test_dpo_exact_resume_after_preemption(tmp_path, monkeypatch, tiny_model):
    """The same for dpo.py, with SamPO on: its random token draws must also continue exactly."""
    data = tmp_path / "pairs.jsonl"
    with open(os.path.join(DATA_DIR, "pairs.jsonl")) as f:
        data.write_text("".join(f.readlines()[:32]))
    assert_resumes_exactly(dpo.main, FLAGS + ["--model", tiny_model, "--data", str(data), "--sampo"], tmp_path,
                           monkeypatch)


def test_bf16_exact_resume_after_preemption(data, tmp_path, monkeypatch):
    """bf16 compute on float32 masters: checkpoint-N holds the float32 weights and moments, so a resumed run
    ends bit for bit where the straight one does (saved in float32 here, to compare the masters themselves)."""
    assert_resumes_exactly(sft.main, FLAGS + ["--data", data, "--dtype", "bfloat16", "--save_dtype", "float32"],
                           tmp_path, monkeypatch)


def test_fresh_run_refuses_to_mix_with_an_earlier_runs_checkpoints(data, tmp_path, monkeypatch):
    sigterm_during_step(monkeypatch, 1)
    with pytest.raises(SystemExit):
        sft.main(FLAGS + ["--data", data, "--output_dir", str(tmp_path)])
    monkeypatch.undo()
    with pytest.raises(common.UserError, match="checkpoint-1 exists: pass --resume to continue that run"):
        sft.main(FLAGS + ["--data", data, "--output_dir", str(tmp_path)])
    shutil.rmtree(tmp_path / "checkpoint-1" / "optimizer")  # as main's layout had it: optimizer.safetensors
    with pytest.raises(common.UserError, match="checkpoint-1 has no optimizer/ folder of optimizer shards"):
        sft.main(FLAGS + ["--data", data, "--output_dir", str(tmp_path), "--resume"])


def test_resume_on_cuda_of_a_checkpoint_written_on_cpu(data, tmp_path, monkeypatch):
    """rng-RANK.json holds "cuda": null when written on CPU: resuming where CUDA is available keeps the CUDA
    stream setup seeded, and restores one that was saved."""
    flags = FLAGS + ["--data", data, "--output_dir", str(tmp_path), "--max_steps", "2", "--save_every", "2"]
    sft.main(flags)
    restored, resume = [], checkpoint.TrainState.resume

    def resume_on_cuda(self):  # only resume sees CUDA: setup and the model stay on the CPU
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            m.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(state.tolist()))
            return resume(self)

    monkeypatch.setattr(checkpoint.TrainState, "resume", resume_on_cuda)
    sft.main(flags + ["--resume"])
    assert restored == []
    rng_file = tmp_path / "checkpoint-2" / "rng-0.json"
    rng = json.loads(rng_file.read_text())
    rng_file.write_text(json.dumps({**rng, "cuda": [1, 2, 3]}))  # as written on CUDA
    sft.main(flags + ["--resume"])
    assert restored == [[1, 2, 3]]


KILLED_WHILE_SAVING = """
import os, signal, sys
import safetensors.torch

real_save = safetensors.torch.save  # what DCP's writer serializes each rank's shards with


def save(tensors, *args, **kwargs):
    if any(key.endswith("exp_avg") for key in tensors) and os.path.exists("{out}/checkpoint-2"):
        os.kill(os.getpid(), signal.SIGKILL)  # checkpoint-4's optimizer state: its model files are written
    return real_save(tensors, *args, **kwargs)


safetensors.torch.save = save
sys.argv[0] = "sft.py"
import common, sft
common.run(sft.main)
"""


def test_kill_during_save_keeps_the_previous_checkpoint(data, straight, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path)
    flags = FLAGS + ["--data", data, "--output_dir", out, "--save_every", "2"]
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING.replace("{out}", out), *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4.tmp", "metrics.jsonl"]
    assert "model.safetensors" in os.listdir(os.path.join(out, "checkpoint-4.tmp"))  # killed half-way
    AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-2"))  # the previous one still loads

    sft.main(flags + ["--resume"])  # from checkpoint-2: the half-written one is not a checkpoint
    assert same_weights(straight, out)
    assert rows(out) == rows(straight)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]


def test_sigterm_saves_a_resumable_checkpoint(data, tmp_path):
    out = str(tmp_path)
    flags = ["--model", TINY_MODEL_DIR, "--data", data, "--output_dir", out,
             "--batch_size", "4", "--max_length", "64", "--log_every", "1"]
    run = subprocess.Popen([sys.executable, "sft.py", *flags, "--max_steps", "100000"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    stderr = run.communicate(timeout=300)[1]
    assert run.returncode == 0, stderr
    (checkpoint,) = [n for n in os.listdir(out) if n.startswith("checkpoint-")]
    step = int(checkpoint.split("-")[1])
    assert f"SIGTERM: saved {checkpoint} in {out}; run again with --resume to continue" in stderr

    sft.main(flags + ["--max_steps", str(step + 2), "--resume"])
    assert [r["step"] for r in rows(out)][-3:] == [step, step + 1, step + 2]
    assert len({r["step"] for r in rows(out)}) == len(rows(out))


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path)
    real, calls = sft.sft_loss, []

    def nan_at_step_5(*args):
        calls.append(1)
        return real(*args) * (float("nan") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(sft, "sft_loss", nan_at_step_5)
    monkeypatch.setattr(sys, "argv", ["sft.py"])
    with pytest.raises(SystemExit) as stopped:
        common.run(lambda: sft.main(FLAGS + ["--data", data, "--output_dir", out, "--save_every", "2"]))
    assert stopped.value.code == 2
    # what a terminal shows: progress bars redraw with \r and cursor moves
    shown = [re.sub(r"\x1b\[\w", "", line.split("\r")[-1]) for line in capsys.readouterr().err.splitlines()]
    error = [line for line in shown if line.startswith("error:")]
    assert error == [f"error: step 5: loss is nan; stopped without saving (the last good checkpoint is "
                     f"{out}/checkpoint-4). Lower --lr or check the data"]
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]
    with open(os.path.join(out, "checkpoint-4", "trainer_state.json")) as f:
        assert json.load(f)["step"] == 4
    weights = load_file(os.path.join(out, "checkpoint-4", "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def torchrun(*flags):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py", *flags]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, "\n".join(line.split("\r")[-1] for line in done.stderr.splitlines()[-60:])
    return done


def test_distributed_resume(data, tmp_path):
    """Under torchrun with FSDP2 on 2 ranks: resuming from checkpoint-2 gives the uninterrupted run's weights."""
    out, reference = str(tmp_path / "out"), str(tmp_path / "reference")
    flags = ["--model", TINY_MODEL_DIR, "--data", data, "--output_dir", out,
             "--max_steps", "4", "--batch_size", "2", "--max_length", "64",
             "--log_every", "1", "--lr", "3e-3", "--save_every", "2", "--save_total_limit", "3"]
    torchrun(*flags)
    os.makedirs(reference)
    assert "model-00002-of-00002.safetensors" in os.listdir(os.path.join(out, "checkpoint-2"))  # one per rank
    assert "model.safetensors" in os.listdir(out)  # the final model: one file below 50 GB, as save_pretrained
    for name in os.listdir(out):
        if name.startswith("model") or name == "metrics.jsonl":
            shutil.copy(os.path.join(out, name), os.path.join(reference, name))
    with open(os.path.join(out, "checkpoint-2", "trainer_state.json")) as f:
        assert json.load(f)["args"]["world_size"] == 2
    os.rename(os.path.join(out, "checkpoint-4"), os.path.join(out, "checkpoint-4.tmp"))  # as if killed saving it

    resumed = torchrun(*flags, "--resume")
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    assert same_weights(reference, out)
    assert rows(out) == rows(reference)

    with pytest.raises(common.UserError, match=r"written with a global batch of 4 \(batch_size x grad_accum x ranks "
                                               r"= 2 x 1 x 2\), this run has 2 x 1 x 1 = 2; resume with the same"):
        sft.main(flags + ["--resume"])


NODE_LOCAL_DISK = """
import glob, os, sys
sys.path.insert(0, {root!r})
if os.environ["RANK"] == "1":  # rank 1 on another node: rank 0's shard files are on rank 0's disk only
    listdir, real_glob = os.listdir, glob.glob
    os.listdir = lambda path=".": [n for n in listdir(path) if not n.startswith("shard-00001-")]
    glob.glob = lambda *a, **k: [p for p in real_glob(*a, **k) if not os.path.basename(p).startswith("shard-00001-")]
sys.argv[0] = "sft.py"
import common, sft
common.run(sft.main)
"""


def test_output_dir_on_a_node_local_disk_is_refused(data, tmp_path):
    """Every rank rebuilds files from everybody's shards: a rank that cannot see some stops the save on all ranks
    with one line, instead of a checkpoint with zeros in it (or a hang)."""
    out, worker = tmp_path / "out", tmp_path / "worker.py"
    worker.write_text(NODE_LOCAL_DISK.format(root=ROOT))
    flags = ["--model", TINY_MODEL_DIR, "--data", data, "--output_dir", str(out),
             "--max_steps", "1", "--save_every", "1", "--batch_size", "2",
             "--max_length", "64"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(tmp_path / "logs"), "--redirects", "2", str(worker), *flags]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    # the first rank out exits 2 (torchrun then stops the other, which may already be exiting: its code varies)
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr, done.stderr
    logs = glob.glob(str(tmp_path / "logs" / "*" / "attempt_0" / "*" / "stderr.log"))  # each rank's stderr
    assert len(logs) == 2
    for log in logs:  # both ranks raised the error: neither went on to a collective the other never joins
        with open(log) as f:
            text = f.read()
        assert "Traceback" not in text and text.splitlines()[-1] == (
            f"error: rank 1 cannot see shard-00001-model-00001-of-00001.safetensors (1 of the 2 shard files the "
            f"ranks wrote to {out}/checkpoint-1.tmp/model.shards): --output_dir must be on a filesystem that every "
            "node shares, not a node-local disk"), text
    assert sorted(os.listdir(out)) == ["checkpoint-1.tmp", "metrics.jsonl"]  # no checkpoint-1


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory, tiny_model):
    """The tiny model with tie_word_embeddings=True, as save_pretrained writes it in one process."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("tied"))
    config = AutoConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return path


def max_difference(dir_a, dir_b):
    a, b = model_weights(dir_a), model_weights(dir_b)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_resume_on_another_number_of_ranks(data, tied_model, tmp_path):
    """2 ranks -> 1 process and 1 -> 2 with the same global batch (2 x 2 = 4 x 1) reach the straight runs' weights.
    The model ties its embeddings: every save, sharded or not, holds the keys save_pretrained writes."""
    from transformers import AutoModelForCausalLM

    flags = ["--model", tied_model, "--data", data, "--max_steps", "4", "--max_length", "64", "--log_every", "1",
             "--lr", "3e-3", "--save_every", "2"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    torchrun(*flags, "--batch_size", "2", "--output_dir", two)
    sft.main(flags + ["--batch_size", "4", "--output_dir", one])
    expected = set(load_file(os.path.join(tied_model, "model.safetensors")))
    assert "lm_head.weight" not in expected  # save_pretrained keeps a tied weight once
    for directory in (two, os.path.join(two, "checkpoint-2"), one, os.path.join(one, "checkpoint-2")):
        assert set(model_weights(directory)) == expected, directory

    two_to_one, one_to_two = str(tmp_path / "two_to_one"), str(tmp_path / "one_to_two")
    shutil.copytree(os.path.join(two, "checkpoint-2"), os.path.join(two_to_one, "checkpoint-2"))
    shutil.copytree(os.path.join(one, "checkpoint-2"), os.path.join(one_to_two, "checkpoint-2"))
    sft.main(flags + ["--batch_size", "4", "--output_dir", two_to_one, "--resume"])
    torchrun(*flags, "--batch_size", "2", "--output_dir", one_to_two, "--resume")
    for resumed in (two_to_one, one_to_two):
        assert [r["step"] for r in rows(resumed)] == [3, 4]
        assert max_difference(resumed, one) < 1e-6 and max_difference(resumed, two) < 1e-6
    model = AutoModelForCausalLM.from_pretrained(one_to_two)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---------------------------------------------------------------- rm.py and ppo.py

RM_FLAGS = ["--max_steps", "4", "--batch_size", "4", "--max_length", "64", "--log_every", "1", "--lr", "3e-3"]
PPO_FLAGS = ["--max_steps", "6", "--batch_size", "4", "--num_mini_batches", "2", "--ppo_epochs", "1",
             "--max_new_tokens", "8", "--max_length", "64", "--log_every", "1", "--num_sample_generations", "0",
             "--save_value_model"]


@pytest.fixture(scope="module")
def rm_flags(tmp_path_factory, tiny_model):
    """The tiny model as backbone, 64 toy pairs and 8 held-out ones, copied outside toy/data."""
    root = tmp_path_factory.mktemp("pairs")
    for name, n in (("pairs.jsonl", 64), ("eval_pairs.jsonl", 8)):
        with open(os.path.join(DATA_DIR, name)) as f:
            (root / name).write_text("".join(f.readlines()[:n]))
    return RM_FLAGS + ["--model", tiny_model, "--data", str(root / "pairs.jsonl"),
                       "--eval_data", str(root / "eval_pairs.jsonl")]


@pytest.fixture(scope="module")
def rm_straight(rm_flags, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rm_straight"))
    rm.main(rm_flags + ["--output_dir", out])
    return out


def same_files(dir_a, dir_b, names):
    for name in names:
        a, b = load_file(os.path.join(dir_a, name)), load_file(os.path.join(dir_b, name))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def test_rm_exact_resume_after_preemption(rm_flags, rm_straight, tmp_path, monkeypatch):
    out = str(tmp_path)
    sigterm_during_step(monkeypatch, 2)
    with pytest.raises(SystemExit) as stopped:
        rm.main(rm_flags + ["--output_dir", out])
    assert stopped.value.code == 0
    assert sorted(os.listdir(out)) == ["checkpoint-2", "metrics.jsonl"]
    monkeypatch.undo()
    # rm's own layout
    checkpoint = reward_models.load_reward_model(os.path.join(out, "checkpoint-2"), torch.device("cpu"))
    saved_head = load_file(os.path.join(out, "checkpoint-2", reward_models.HEAD_FILE))["weight"]
    assert torch.equal(checkpoint.value_head.weight, saved_head)

    rm.main(rm_flags + ["--output_dir", out, "--resume"])
    # backbone and head, bit for bit
    assert same_files(rm_straight, out, ["model.safetensors", reward_models.HEAD_FILE])
    assert rows(out) == rows(rm_straight)
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows(out) if "eval/accuracy" in r] == [0, 4]  # no second step-0 eval


@pytest.fixture(scope="module")
def ppo_flags(rm_straight, tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with open(os.path.join(DATA_DIR, "prompts.jsonl")) as f:
        path.write_text("".join(f.readlines()[:64]))
    return PPO_FLAGS + ["--model", tiny_model, "--reward_model", rm_straight, "--data", str(path)]


def test_ppo_exact_resume_after_preemption(ppo_flags, tmp_path, monkeypatch):
    straight, out = str(tmp_path / "straight"), str(tmp_path / "out")
    ppo.main(ppo_flags + ["--output_dir", straight])
    sigterm_during_step(monkeypatch, 9)  # 2 optimizer steps (policy, value) per minibatch, 2 minibatches a rollout
    with pytest.raises(SystemExit) as stopped:
        ppo.main(ppo_flags + ["--output_dir", out])
    assert stopped.value.code == 0
    assert sorted(os.listdir(out)) == ["checkpoint-3", "metrics.jsonl"]
    monkeypatch.undo()

    ppo.main(ppo_flags + ["--output_dir", out, "--resume"])
    assert same_weights(straight, out)  # the policy, bit for bit
    value = os.path.join("value_model", "model.safetensors"), os.path.join("value_model", reward_models.HEAD_FILE)
    assert same_files(straight, out, value)  # the value model was restored too, not restarted from the RM
    assert rows(out) == rows(straight)
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
