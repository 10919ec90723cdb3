"""online_dpo.py: the pairs built from sampled responses by hand, the loss against dpo's formula by hand,
a bad input, and a few real steps on the toy SFT model."""
import math
import os
import random
import subprocess
import sys
import zlib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig

from conftest import ROOT, read_metrics  # first: puts the repository on sys.path under torchrun too
import common  # noqa: E402
import online_dpo  # noqa: E402
from toy.task import DATA_DIR, TOPIC_WORDS  # noqa: E402

GOLD = os.path.join(ROOT, "toy", "rewards.py") + ":gold_reward"


def test_make_pairs_by_hand():
    # four prompts, two responses each: (0.2, 0.7) the second wins; (0.9, 0.1) the first; (0.5, 0.5) a tie;
    # (nan, 0.3) one response unscored, also skipped
    rewards = torch.tensor([0.2, 0.7, 0.9, 0.1, 0.5, 0.5, math.nan, 0.3])
    chosen, rejected, kept = online_dpo.make_pairs(rewards)
    assert kept.tolist() == [True, True, False, False]
    assert chosen[:2].tolist() == [1, 2] and rejected[:2].tolist() == [0, 3]
    assert sorted(chosen[2:].tolist() + rejected[2:].tolist()) == [4, 5, 6, 7]  # the ties keep their own responses


def test_sample_pairs_by_hand(tiny_model, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eos = tokenizer.eos_token_id
    a, b, c, d = tokenizer.convert_tokens_to_ids(["cat", "dog", "red", "blue"])
    # the two 'samples' of each of three prompts; the reward is the number of tokens (EOS included)
    sampled = [[a, b, eos], [a, eos],          # 3 > 2: the first is chosen
               [c, eos], [c, d, a, b],         # 2 < 4: the second (cut off, no EOS) is chosen
               [a, eos], [b, eos]]             # 2 = 2: a tie, skipped and counted
    monkeypatch.setattr(common, "generate_completions", lambda policy, prompts, *rest: sampled[:len(prompts)])
    policy = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=eos))
    prompts = [{"prompt": [a], "row": {"prompt": "tell me about animals :"}} for _ in range(3)]

    def length(prompts, completions, completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    args = SimpleNamespace(batch_size=3)
    pairs, kept, stats = online_dpo.sample_pairs(policy, None, [("length", length)], torch.tensor([1.0]), prompts,
                                                 tokenizer, args, torch.device("cpu"), {})
    assert [(p["chosen"], p["rejected"]) for p in pairs[:2]] == [([a, b, eos], [a, eos]), ([c, d, a, b], [c, eos])]
    assert kept.tolist() == [1.0, 1.0, 0.0]
    sums = common.Sums()
    sums.add(stats)
    means = online_dpo.rollout_means(sums, torch.device("cpu"))
    assert means["objective/scores"] == pytest.approx((3 + 2 + 2 + 4 + 2 + 2) / 6)  # 15 / 6 = 2.5, every response
    assert means["objective/scores_margin"] == pytest.approx(((3 - 2) + (4 - 2)) / 2)  # kept pairs only: 1.5
    assert means["val/contain_eos_token"] == pytest.approx(5 / 6)  # one of six responses was cut off
    assert means["tie_rate"] == pytest.approx(1 / 3)  # one tie among three prompts


def test_step_loss_is_dpo_by_hand_and_ties_weigh_nothing():
    # two pairs, chosen rows then rejected rows, two tokens each (the second rejected has one, then padding 9)
    policy = torch.tensor([[-0.5, -0.5], [-1.0, -2.0],     # chosen:   logp_w = -1.0, -3.0
                           [-1.0, -1.0], [-0.5, 9.0]], requires_grad=True)  # rejected: logp_l = -2.0, -0.5
    ref = torch.tensor([[-0.75, -0.75], [-1.0, -1.0],      # ref_w = -1.5, -2.0
                        [-0.75, -0.75], [-0.5, 9.0]])      # ref_l = -1.5, -0.5
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]]).bool()
    kept = torch.tensor([1.0, 0.0])  # the second pair is a tie
    args = SimpleNamespace(beta=0.1, loss_type="sigmoid")
    loss, sums = online_dpo.online_dpo_step(policy, ref, mask, kept, 1, args)
    # pair 1: h = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1; L = -logsig(0.1) = log(1 + e^-0.1) = 0.644397
    # pair 2 (h = (-3 - -2) - 0 = -1, L = log(1 + e^0.1) = 0.744397) is a tie: weight 0; one pair in the batch
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    assert sums["rewards/chosen"].item() == pytest.approx(0.05, abs=1e-7)  # 0.1 * (-1 - -1.5)
    assert sums["rewards/rejected"].item() == pytest.approx(-0.05, abs=1e-7)  # 0.1 * (-2 - -1.5)
    assert sums["rewards/margins"].item() == pytest.approx(0.1, abs=1e-7) and sums["rewards/accuracies"] == 1
    assert sums["logps/chosen"].item() == pytest.approx(-1.0) and sums["logps/rejected"].item() == pytest.approx(-2.0)
    loss.backward()
    # d L / d logp_w = -beta * (1 - sigma(0.1)) = -0.1 * 0.475021 = -0.0475021 per chosen token, the opposite
    # per rejected token; the tie's tokens get no gradient
    g = 0.1 * (1 - 1 / (1 + math.exp(-0.1)))
    torch.testing.assert_close(policy.grad, torch.tensor([[-g, -g], [0, 0], [g, g], [0, 0]]), atol=1e-7, rtol=0)
    # IPO with beta 0.25: 1/(2*beta) = 2, pair 1: (1 - 2)^2 = 1; over 2 kept pairs (say, another micro-batch's)
    loss, _ = online_dpo.online_dpo_step(policy, ref, mask, kept, 2, SimpleNamespace(beta=0.25, loss_type="ipo"))
    assert loss.item() == pytest.approx(1 / 2, abs=1e-6)


def test_no_reward_on_own_data_is_one_line_exit_2(tiny_model, tmp_path, monkeypatch, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "tell me about music :"}\n' * 4)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["online_dpo.py"])
    with pytest.raises(SystemExit) as stopped:
        common.run(lambda: online_dpo.main(["--model", tiny_model, "--data", str(data), "--output_dir", str(out)]))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {data}: no reward given; pass --reward_fn path/to/file.py:function or --reward_model\n"
    assert not out.exists()


def test_a_few_steps_on_the_toy_sft_model(sft_model, tmp_path):
    data, heldout = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"  # outside toy/data: no toy eval
    with open(os.path.join(DATA_DIR, "prompts.jsonl")) as f:
        lines = f.readlines()
    data.write_text("".join(lines[:32]))
    heldout.write_text("".join(lines[32:48]))
    out = str(tmp_path / "out")
    online_dpo.main(["--model", sft_model, "--data", str(data), "--eval_data", str(heldout), "--reward_fn", GOLD,
                     "--output_dir", out, "--max_steps", "4", "--batch_size", "8", "--log_every", "1",
                     "--max_new_tokens", "16", "--max_length", "64", "--warmup_ratio", "0"])
    rows = read_metrics(out)
    train, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 4]
    assert {"objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/margins", "rewards/accuracies",
            "val/contain_eos_token", "tie_rate", "logps/chosen", "loss", "grad_norm"} <= set(train[0])
    for r in train:
        assert 0 <= r["tie_rate"] <= 1 and 0 <= r["val/contain_eos_token"] <= 1 and 0 <= r["objective/scores"] <= 1
        assert all(math.isfinite(v) for v in r.values())
    # the policy is the reference until the first update: h = 0, L = log 2, every implicit reward 0
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and train[0]["rewards/margins"] == 0
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)
    before, after = (load_file(os.path.join(d, "model.safetensors")) for d in (sft_model, out))
    assert max(float((before[n] - after[n]).abs().max()) for n in before) > 1e-3


# ---------------------------------------------------------------- the same run over micro-batches and ranks

def fixed_generate():
    """A stand-in for common.generate_completions whose 'samples' depend on the prompt, which of its two
    responses it is and the step only, so every split of a global batch gets the same ones; a quarter of the
    prompts get the same response twice: a tie."""
    words, calls = [w for ws in TOPIC_WORDS.values() for w in ws], []

    def generate(policy, prompts, tokenizer, device, batch_size):
        calls.append(1)
        out = []
        for i, p in enumerate(prompts):
            tie = zlib.crc32(str(p["prompt"]).encode()) % 4 == 0
            rng = random.Random(zlib.crc32(f"{p['prompt']}|{0 if tie else i % 2}|{len(calls)}".encode()))
            ids = tokenizer.convert_tokens_to_ids(rng.choices(words, k=rng.randint(1, 6)))
            out.append(ids + [tokenizer.eos_token_id])
        return out
    return generate


FLAGS = ["--max_steps", "2", "--log_every", "1", "--lr", "3e-3", "--warmup_ratio", "0", "--max_length", "64",
         "--max_new_tokens", "8", "--reward_fn", GOLD]


def run_fixed(flags):
    sample = common.generate_completions
    common.generate_completions = fixed_generate()
    try:
        online_dpo.main(flags)
    finally:
        common.generate_completions = sample


def test_grad_accum_and_two_ranks_match_one_process(tiny_model, tmp_path):
    data = tmp_path / "prompts.jsonl"  # outside toy/data: no toy eval
    with open(os.path.join(DATA_DIR, "prompts.jsonl")) as f:
        data.write_text("".join(f.readlines()[:32]))
    flags = FLAGS + ["--model", tiny_model, "--data", str(data)]
    two = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           *flags, "--batch_size", "4", "--output_dir", two]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one, accum = str(tmp_path / "one"), str(tmp_path / "accum")
    run_fixed(flags + ["--batch_size", "8", "--output_dir", one])
    run_fixed(flags + ["--batch_size", "4", "--grad_accum", "2", "--output_dir", accum])
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    assert 0 < read_metrics(one)[0]["tie_rate"] < 1  # ties in the batch, so the pair count matters
    for other in (accum, two):
        for a, b in zip(read_metrics(one), read_metrics(other), strict=True):
            for key in ("loss", "grad_norm", "tie_rate", "objective/scores", "rewards/margins", "logps/chosen"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (other, key)
        w1, w2 = (load_file(os.path.join(d, "model.safetensors")) for d in (one, other))
        for name in w1:
            torch.testing.assert_close(w1[name], w2[name], atol=3e-4, rtol=0)


if __name__ == "__main__":  # under torchrun, from test_grad_accum_and_two_ranks_match_one_process
    common.run(lambda: run_fixed(sys.argv[1:]))  # as the scripts end
