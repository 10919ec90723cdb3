import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import common
import kto
from toy.task import DATA_DIR
from conftest import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# beta 0.1, r = -3.0 - (-3.5) = 0.5, z0 = 0.2:
#   desirable:   1 - sigmoid(0.1 * (0.5 - 0.2)) = 1 - sigmoid(0.03) = 1 - 1/(1 + exp(-0.03))
#                = 1 - 1/1.9704455335 = 1 - 0.5074994375 = 0.4925005625
#   undesirable: 1 - sigmoid(0.1 * (0.2 - 0.5)) = 1 - sigmoid(-0.03) = 1 - 0.4925005625 = 0.5074994375
POLICY = torch.tensor([-3.0, -3.0], dtype=torch.float64)
REF = torch.tensor([-3.5, -3.5], dtype=torch.float64)
LABELS = torch.tensor([True, False])


def test_loss_hand_computed():
    losses, rewards = kto.kto_loss(POLICY, REF, LABELS, torch.tensor(0.2, dtype=torch.float64), beta=0.1)
    assert losses.tolist() == pytest.approx([0.4925005625, 0.5074994375], abs=1e-9)
    assert rewards.tolist() == pytest.approx([0.05, 0.05], abs=1e-12)  # beta * r = 0.1 * 0.5


def test_loss_weights():
    # desirable_weight 2.0: 2.0 * 0.4925005625 = 0.985001125; undesirable_weight 0.5: 0.5 * 0.5074994375 = 0.25374971875
    losses, _ = kto.kto_loss(POLICY, REF, LABELS, 0.2, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    assert losses.tolist() == pytest.approx([0.985001125, 0.25374971875], abs=1e-9)


def test_loss_at_reference_is_one_half():
    # policy == reference and z0 = 0: 1 - sigmoid(0) = 0.5 for both labels
    losses, rewards = kto.kto_loss(REF, REF, LABELS, 0.0)
    assert losses.tolist() == [0.5, 0.5] and rewards.tolist() == [0.0, 0.0]


def test_loss_sign_pushes_desirable_up_undesirable_down():
    # d/dr of 1 - sigmoid(beta*(r - z0)) = -beta * s * (1 - s), s = sigmoid(0.03) = 0.5074994375:
    #   -0.1 * 0.5074994375 * 0.4925005625 = -0.0249943766; the undesirable term has the opposite sign
    policy = POLICY.clone().requires_grad_()
    losses, _ = kto.kto_loss(policy, REF, LABELS, 0.2)
    losses.sum().backward()
    assert policy.grad.tolist() == pytest.approx([-0.0249943766, 0.0249943766], abs=1e-9)


def test_step_sums_and_logged_means():
    """kto_step on the hand-computed pair above as a quarter of a global batch of 4, then kto_means."""
    args = SimpleNamespace(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    loss, sums = kto.kto_step(POLICY, REF, LABELS, torch.tensor(0.2, dtype=torch.float64), 4, args)
    assert float(loss) == pytest.approx((0.4925005625 + 0.5074994375) / 4, abs=1e-9)  # 0.25
    assert {k: float(v) for k, v in sums.items()} == pytest.approx(
        {"loss": 0.25, "n_desirable": 1, "n_undesirable": 1, "rewards/chosen": 0.05, "rewards/rejected": 0.05,
         "logps/chosen": -3.0, "logps/rejected": -3.0}, abs=1e-9)
    # 3 desirable, 1 undesirable: a `chosen` sum over 3, a `rejected` one over 1, any other name over all 4
    totals = {"loss": 0.5, "n_desirable": 3.0, "n_undesirable": 1.0, "rewards/chosen": 0.6, "rewards/rejected": -0.1,
              "logps/chosen": -9.0, "logps/rejected": -2.0, "length": 20.0}
    assert kto.kto_means(totals, 0.7, prefix="eval/") == pytest.approx(
        {"eval/loss": 0.5, "eval/kl": 0.7, "eval/rewards/chosen": 0.2, "eval/rewards/rejected": -0.1,
         "eval/logps/chosen": -3.0, "eval/logps/rejected": -2.0, "eval/length": 5.0,
         "eval/rewards/margins": 0.3}, abs=1e-12)


def test_a_class_absent_from_the_batch_is_left_out():
    args = SimpleNamespace(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    _, sums = kto.kto_step(POLICY, REF, torch.tensor([True, True]), 0.0, 2, args)
    logged = kto.kto_means({k: float(v) for k, v in sums.items()}, 0.0)
    assert sorted(logged) == ["kl", "logps/chosen", "loss", "rewards/chosen"]  # no NaN for the undesirable class
    assert logged["rewards/chosen"] == pytest.approx(0.05, abs=1e-9)


def test_reference_point_mean_and_clamp():
    # log-ratios [1, 0]: mean 0.5; log-ratios [-1, 0]: mean -0.5, clamped to 0
    assert float(kto.reference_point(torch.tensor([-3.0, -4.0]), torch.tensor([-4.0, -4.0]))) == 0.5
    assert float(kto.reference_point(torch.tensor([-5.0, -4.0]), torch.tensor([-4.0, -4.0]))) == 0.0


def test_no_gradient_through_reference_point():
    mismatched = torch.tensor([-2.0, -3.0], dtype=torch.float64, requires_grad=True)
    z0 = kto.reference_point(mismatched, torch.tensor([-4.0, -4.0], dtype=torch.float64))  # mean 1.5
    assert not z0.requires_grad
    policy = POLICY.clone().requires_grad_()
    losses, _ = kto.kto_loss(policy, REF, LABELS, z0)
    losses.sum().backward()
    assert mismatched.grad is None
    # with z0 = 1.5: beta*(r - z0) = -0.1, s = sigmoid(-0.1) = 0.4750208125, s*(1-s) = 0.2493760401
    assert policy.grad.tolist() == pytest.approx([-0.02493760401, 0.02493760401], abs=1e-9)


@pytest.mark.parametrize("n", range(2, 10))
def test_mismatched_order_never_pairs_an_example_with_itself(n):
    order = kto.mismatched_order(n)
    assert sorted(order) == list(range(n))
    assert all(j != i for i, j in enumerate(order))


def test_mismatched_batch_rows():
    examples = [{"prompt": [1, 10 + i], "completion": [20 + i, 2], "label": True} for i in range(5)]
    batch = kto.collate_with_mismatched(examples, 0, torch.device("cpu"))
    matched, mismatched = batch["labels"][:5, 0].tolist(), batch["labels"][5:, 0].tolist()
    assert matched == [20, 21, 22, 23, 24]
    assert mismatched == [21, 20, 24, 22, 23]  # blocks (0 1), then a roll by one over (2 3 4)
    assert batch["input_ids"][5:, :2].tolist() == batch["input_ids"][:5, :2].tolist()  # same prompts


def test_mismatched_pairing_is_the_same_split_over_ranks():
    # rank r takes the r-th contiguous slice: with an even per-rank batch, 2 ranks of 4 pair as 1 process of 8
    assert kto.mismatched_order(8) == kto.mismatched_order(4) + [4 + j for j in kto.mismatched_order(4)]


def test_weight_warning():
    assert kto.weight_warning(1026, 974, 1.0, 1.0) is None  # 1.053
    assert kto.weight_warning(100, 100, 4 / 3, 1.0) is None
    # 1*100 / (1*300) = 0.333 < 1: desirable_weight 7/6 * 300/100 = 3.5 gives 7/6
    assert "try --desirable_weight 3.5" in kto.weight_warning(100, 300, 1.0, 1.0)
    # 1*300 / (1*100) = 3 > 4/3: undesirable_weight 300 / (7/6 * 100) = 2.571
    assert "try --undesirable_weight 2.57" in kto.weight_warning(300, 100, 1.0, 1.0)
    assert "0 undesirable" in kto.weight_warning(10, 0, 1.0, 1.0)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_pairwise_file_becomes_two_examples(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                  {"prompt": "q", "chosen": "c", "rejected": "d"}])
    rows = [{k: r[k] for k in ("prompt", "completion", "label")} for r in kto.read_feedback(path)[0]]
    assert rows == [{"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "b", "label": False},
                    {"prompt": "q", "completion": "c", "label": True}, {"prompt": "q", "completion": "d", "label": False}]


def test_bad_label_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "a", "label": True},
                                                {"prompt": "p", "completion": "a", "label": "yes"}])
    with pytest.raises(common.UserError, match=r"bad.jsonl:2: field 'label' must be true or false"):
        kto.read_feedback(path)
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                  {"prompt": "p", "completion": "a", "label": True}])
    with pytest.raises(common.UserError, match=r"mixed.jsonl:2: missing field 'chosen'"):
        kto.read_feedback(path)


@pytest.mark.parametrize("label", [True, False])
def test_single_label_data(label, tiny_model, tmp_path, capsys):
    rows = [r for r in map(json.loads, open(os.path.join(DATA_DIR, "unpaired.jsonl"))) if r["label"] == label][:16]
    data = write_jsonl(tmp_path / "one_label.jsonl", rows)
    out = str(tmp_path / "out")
    kto.main(["--model", tiny_model, "--data", data, "--output_dir", out, "--max_steps", "3", "--batch_size", "4",
              "--log_every", "1"])
    assert "KTO learns best from both" in capsys.readouterr().err
    metrics = read_metrics(out)
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference at step 1: 1 - sigmoid(0)
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values())
        assert ("rewards/chosen" in m) == label and ("rewards/rejected" in m) != label
        assert "rewards/margins" not in m


def test_heldout_margin_rises(sft_model, tmp_path):
    out = str(tmp_path / "out")
    kto.main(["--model", sft_model, "--output_dir", out, "--max_steps", "30", "--log_every", "10"])
    margins = [m["eval/rewards/margins"] for m in read_metrics(out) if "eval/rewards/margins" in m]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert margins[-1] > 0.1  # about 0.25 measured


def test_torchrun_matches_one_process(tiny_model, tmp_path):
    data = shutil.copy(os.path.join(DATA_DIR, "unpaired.jsonl"), tmp_path / "data.jsonl")  # not toy: no eval
    # desirable_weight 2 pushes the mismatched log-ratios above 0 within 4 steps, so z0 leaves its clamp
    flags = ["--model", tiny_model, "--data", str(data), "--max_steps", "4", "--log_every", "1",
             "--lr", "1e-3", "--desirable_weight", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "kto.py", *flags, "--batch_size", "4",
         "--output_dir", str(tmp_path / "two")], cwd=ROOT, env=env, check=True,
        timeout=300,
    )
    kto.main([*flags, "--batch_size", "8", "--output_dir", str(tmp_path / "one")])
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert len(two) == len(one) == 4
    for a, b in zip(two, one, strict=True):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert one[-1]["kl"] > 0  # the comparison covers an unclamped z0
