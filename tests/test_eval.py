"""Issue 11: --eval_data on every script (checked against naive log-probs at step 0), one metrics.jsonl
row per step, the end-of-run summary, the --output_dir rule, a fast failure on an unreachable hub,
--help, and no progress bars off a terminal. Every run: the tiny model, 2 steps, data outside toy/data."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import common
import dpo
import formats
import kto
import ld_dpo
import models
import orpo
import ppo
import rm
import sft
import simpo
from conftest import ROOT
from toy.task import DATA_DIR

FLAGS = ["--max_steps", "2", "--batch_size", "4", "--max_length", "64", "--log_every", "1", "--eval_every", "1"]


def lines(name, start, stop):
    with open(os.path.join(DATA_DIR, name)) as f:
        return f.readlines()[start:stop]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training files (16 rows) and held-out files (6 rows: two chunks of --batch_size 4 and 2)."""
    root = tmp_path_factory.mktemp("data")
    files = {"sft": ("sft.jsonl", 0), "pairs": ("pairs.jsonl", 0), "unpaired": ("unpaired.jsonl", 0),
             "prompts": ("prompts.jsonl", 0), "eval_sft": ("sft.jsonl", 500), "eval_pairs": ("eval_pairs.jsonl", 0),
             "eval_unpaired": ("unpaired.jsonl", 500), "eval_prompts": ("eval_prompts.jsonl", 0)}
    paths = {}
    for key, (name, start) in files.items():
        paths[key] = str(root / f"{key}.jsonl")
        with open(paths[key], "w") as f:
            f.writelines(lines(name, start, start + (6 if key.startswith("eval") else 16)))
    return paths


def rows_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train(script, out, *flags):
    script.main([*FLAGS, "--output_dir", str(out), *flags])
    return rows_of(out)


@pytest.fixture(scope="module")
def naive(tiny_model, data):
    """Per-response (summed log-prob, token count) of the held-out pairs under the untrained tiny model,
    each response scored alone through full logits and log_softmax().gather()."""
    tokenizer = models.load_tokenizer(tiny_model)
    model = models.load_model(tiny_model, torch.device("cpu")).eval()
    pairs = formats.tokenize(formats.read_jsonl(data["eval_pairs"], ["prompt", "chosen", "rejected"]), tokenizer, 64,
                            ("chosen", "rejected"))

    def score(prompt, completion):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
        return float(logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).sum()), len(completion)

    return [(score(p["prompt"], p["chosen"]), score(p["prompt"], p["rejected"])) for p in pairs]


def assert_evaluated_every_step(rows, names):
    assert [r["step"] for r in rows] == [0, 1, 2]  # one row per step: eval merged into the training row
    for r in rows:
        assert all(math.isfinite(r[name]) for name in names), r
    assert "lr" in rows[1] and "lr" in rows[2]


def test_sft_eval_loss_is_the_token_mean_nll(tiny_model, data, tmp_path, capsys):
    rows = train(sft, tmp_path / "out", "--model", tiny_model, "--data", data["sft"], "--eval_data", data["eval_sft"])
    assert_evaluated_every_step(rows, ["eval/loss"])
    tokenizer = models.load_tokenizer(tiny_model)
    model = models.load_model(tiny_model, torch.device("cpu")).eval()
    nll = n = 0
    for e in formats.tokenize(formats.read_jsonl(data["eval_sft"], ["prompt", "completion"]), tokenizer, 64,
                             ("completion",)):
        with torch.no_grad():
            logits = model(torch.tensor([e["prompt"] + e["completion"]])).logits[0, len(e["prompt"]) - 1:-1]
        nll -= float(logits.log_softmax(-1).gather(-1, torch.tensor(e["completion"])[:, None]).sum())
        n += len(e["completion"])
    assert rows[0]["eval/loss"] == pytest.approx(nll / n, abs=1e-4)
    assert rows[2]["eval/loss"] < rows[0]["eval/loss"]
    # the summary: one line, where the model went, before -> after as logged, the speed
    (summary,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    assert summary.startswith(f"done: saved to {tmp_path / 'out'};")
    assert f"eval/loss {rows[0]['eval/loss']:.4g} -> {rows[2]['eval/loss']:.4g}" in summary
    assert f"loss {rows[1]['loss']:.4g} -> {rows[2]['loss']:.4g}" in summary
    assert "2 steps in" in summary and "tokens/s" in summary


@pytest.mark.parametrize("script", [dpo, ld_dpo])
def test_dpo_eval_at_the_start_is_log2_plus_the_rpo_nll(script, tiny_model, data, naive, tmp_path):
    rows = train(script, tmp_path / "out", "--model", tiny_model, "--data", data["pairs"],
                 "--eval_data", data["eval_pairs"], "--rpo_alpha", "1")
    names = ["eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"]
    assert_evaluated_every_step(rows, names)
    # step 0: the policy is the reference, every reward is 0: -logsig(0) = log 2, plus the chosen token-mean NLL
    nll = -sum(c[0] for c, _ in naive) / sum(c[1] for c, _ in naive)
    assert rows[0]["eval/loss"] == pytest.approx(math.log(2) + nll, abs=1e-4)
    assert (rows[0]["eval/rewards/accuracies"], rows[0]["eval/rewards/margins"]) == (0.0, 0.0)
    assert rows[2]["eval/rewards/margins"] != 0.0


def test_simpo_and_orpo_eval_by_hand(tiny_model, data, naive, tmp_path):
    avg = [(c[0] / c[1], r[0] / r[1]) for c, r in naive]
    nll = -sum(c[0] for c, _ in naive) / sum(c[1] for c, _ in naive)
    accuracy = sum(w > l for w, l in avg) / 6
    simpo_rows = train(simpo, tmp_path / "simpo", "--model", tiny_model, "--data", data["pairs"],
                       "--eval_data", data["eval_pairs"])
    # SimPO defaults beta 2, gamma 1, no NLL: L = -logsig(2 * (avg_w - avg_l) - 1), reward 2 * avg
    expected = {"eval/loss": sum(-F.logsigmoid(torch.tensor(2 * (w - l) - 1.0)).item() for w, l in avg) / 6,
                "eval/rewards/accuracies": accuracy, "eval/rewards/margins": sum(2 * (w - l) for w, l in avg) / 6}
    assert {k: simpo_rows[0][k] for k in expected} == pytest.approx(expected, abs=1e-4)
    orpo_rows = train(orpo, tmp_path / "orpo", "--model", tiny_model, "--data", data["pairs"],
                      "--eval_data", data["eval_pairs"])

    def log_odds(a):
        return a - math.log(-math.expm1(a))

    # ORPO lam 0.1: L = NLL(y_w) - 0.1 * logsig(log_odds(avg_w) - log_odds(avg_l)), reward 0.1 * avg
    odds = sum(-0.1 * F.logsigmoid(torch.tensor(log_odds(w) - log_odds(l))).item() for w, l in avg) / 6
    expected = {"eval/loss": odds + nll, "eval/rewards/accuracies": accuracy,
                "eval/rewards/margins": sum(0.1 * (w - l) for w, l in avg) / 6}
    assert {k: orpo_rows[0][k] for k in expected} == pytest.approx(expected, abs=1e-4)
    assert_evaluated_every_step(orpo_rows, list(expected))


def test_kto_eval_on_unpaired_data(tiny_model, data, tmp_path):
    rows = train(kto, tmp_path / "out", "--model", tiny_model, "--data", data["unpaired"],
                 "--eval_data", data["eval_unpaired"])
    assert_evaluated_every_step(rows, ["eval/loss", "eval/kl", "eval/rewards/margins"])
    # step 0: policy = reference, r = 0 and z0 = 0, so every loss is 1 - sigmoid(0) = 0.5
    assert (rows[0]["eval/loss"], rows[0]["eval/kl"], rows[0]["eval/rewards/margins"]) == (0.5, 0.0, 0.0)
    assert rows[2]["eval/kl"] >= 0 and rows[2]["eval/loss"] != 0.5


@pytest.fixture(scope="module")
def reward_model(tiny_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "out"
    return train(rm, out, "--model", tiny_model, "--data", data["pairs"], "--eval_data", data["eval_pairs"]), str(out)


def test_rm_eval_accuracy(reward_model):
    rows, _ = reward_model
    assert_evaluated_every_step(rows, ["eval/accuracy", "eval/rewards/margins"])
    assert all(round(r["eval/accuracy"] * 6, 6) in range(7) for r in rows)  # a share of the 6 held-out pairs


def test_ppo_eval_scores(tiny_model, data, reward_model, tmp_path):
    rows = train(ppo, tmp_path / "out", "--model", tiny_model, "--reward_model", reward_model[1], "--data",
                 data["prompts"], "--eval_data", data["eval_prompts"], "--num_mini_batches", "1", "--ppo_epochs", "1",
                 "--max_new_tokens", "8", "--num_sample_generations", "0")
    assert_evaluated_every_step(rows, ["eval/scores"])
    assert "objective/scores" in rows[2]


def test_output_dir_with_a_finished_model_is_refused(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    flags = ["--model", tiny_model, "--data", data["sft"], "--max_steps", "1", "--batch_size", "4",
             "--output_dir", str(out)]
    sft.main(flags)
    before = (out / "metrics.jsonl").read_text()
    for extra in ([], ["--resume"]):  # --resume needs an interrupted run's checkpoint-N, not a finished model
        with pytest.raises(common.UserError, match="already holds a finished model: pass --overwrite_output_dir to "
                                                   "replace it, or choose another --output_dir \\(--resume continues"):
            sft.main(flags + extra)
    assert (out / "metrics.jsonl").read_text() == before
    sft.main(flags + ["--overwrite_output_dir", "--max_steps", "2"])
    assert [r["step"] for r in rows_of(out)] == [2]  # a new metrics.jsonl, not appended to the old run's


def test_unreachable_hub_fails_at_once(monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: as unreachable as no network
    models.check_hub_reachable.cache_clear()
    start = time.perf_counter()
    with pytest.raises(common.UserError, match="someorg/somemodel: cannot reach 127.0.0.1 .* set HF_HUB_OFFLINE=1 "
                                               ".* or pass a local model directory as --model"):
        models.check_model_path("someorg/somemodel")
    assert time.perf_counter() - start < 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the cache is read, nothing to probe
    models.check_hub_reachable.cache_clear()
    models.check_model_path("someorg/somemodel")
    models.check_hub_reachable.cache_clear()
    # the whole script: one line, exit code 2, nothing written, and no progress bar on a non-terminal stderr
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "https_proxy", "HTTPS_PROXY")}
    done = subprocess.run([sys.executable, "sft.py", "--model", "someorg/somemodel", "--output_dir", str(tmp_path / "o")],
                          cwd=ROOT, env={**env, "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "HF_HUB_OFFLINE=1" in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()


def test_no_progress_bar_off_a_terminal(tiny_model, data, tmp_path):
    done = subprocess.run([sys.executable, "sft.py", "--model", tiny_model, "--data", data["sft"], "--max_steps", "2",
                           "--batch_size", "4", "--output_dir", str(tmp_path / "o")],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "it/s" not in done.stderr, done.stderr
    assert done.stdout.startswith(f"done: saved to {tmp_path / 'o'};")


@pytest.mark.parametrize("script", [sft, dpo, ld_dpo, simpo, orpo, kto, rm, ppo])
def test_help_shows_defaults_and_explains_every_flag(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = capsys.readouterr().out
    words = " ".join(text.split())  # as wrapped at any terminal width
    assert "tuned for the bundled toy task" in words and "--lr (usually about" in words
    assert "(default: 0.1)" in words  # --warmup_ratio's, shown by the formatter
    if script is ppo:
        for flag, default in [("kl_coef", 0.05), ("cliprange", 0.2), ("vf_coef", 0.1), ("cliprange_value", 0.2),
                              ("gamma", 1.0), ("lam", 0.95)]:
            assert f"--{flag} {flag.upper()}" in words and f"(default: {default})" in words
        assert "--whiten_rewards scale the per-token rewards" in words
    # every flag has help in words
    options = text.split("options:")[1].split("\n  -")[1:]
    assert all(len(o.split(None, 2)) == 3 for o in options), [o for o in options if len(o.split(None, 2)) < 3]
