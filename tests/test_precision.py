"""Mixed precision: bf16 compute on float32 master weights learns what float32 learns, and the bf16
paths save and load what they should. CPU bf16 is slow: the toy model, a step or three."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import dpo
from toy.task import DATA_DIR as TOY_DATA_DIR


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


@pytest.fixture(scope="module")
def dpo_runs(sft_model, tmp_path_factory):
    """Weights after 1 and 3 DPO steps at lr 5e-7 (no warmup), in float32 and with bf16 compute, saved in float32."""
    root = tmp_path_factory.mktemp("precision")
    data = str(root / "pairs.jsonl")  # outside toy/data: no toy evaluation, which would sample in bf16 for minutes
    shutil.copy(os.path.join(TOY_DATA_DIR, "pairs.jsonl"), data)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        for steps in (1, 3):
            out = str(root / f"{dtype}-{steps}")
            dpo.main(["--model", sft_model, "--data", data, "--output_dir", out, "--dtype", dtype, "--save_dtype",
                      "float32", "--lr", "5e-7", "--warmup_ratio", "0", "--max_steps", str(steps), "--batch_size", "8"])
            runs[dtype, steps] = weights(out)
    return weights(sft_model), runs


def test_one_bf16_step_moves_as_many_weights_as_float32(dpo_runs):
    start, runs = dpo_runs

    def moved(after, before):  # off the start and off its bf16 rounding, where pure bf16 weights would start
        return int(((after != before) & (after != before.to(torch.bfloat16).float())).sum())

    counts = {dtype: sum(moved(runs[dtype, 1][k], w) for k, w in start.items()) for dtype in ("float32", "bfloat16")}
    total = sum(w.numel() for w in start.values())
    assert counts["float32"] > 0.5 * total  # Adam moves every weight that has a gradient by about lr
    assert counts["bfloat16"] >= 0.95 * counts["float32"], (counts, total)  # pure bf16 weights: a few % move


def test_three_bf16_steps_point_where_float32_steps_point(dpo_runs):
    start, runs = dpo_runs

    def update(dtype):
        return torch.cat([(runs[dtype, 3][k] - w).flatten() for k, w in start.items()])

    cosine = torch.nn.functional.cosine_similarity(update("float32"), update("bfloat16"), dim=0)
    assert cosine > 0.95, cosine  # pure bf16 weights: about 0.1
