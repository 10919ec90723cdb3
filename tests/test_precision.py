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
        return torch.cat([(runs[dtype, 3][k] - w).flatten() for k, w in start.items()]).double()  # float32 sums drift

    cosine = torch.nn.functional.cosine_similarity(update("float32"), update("bfloat16"), dim=0)
    assert cosine > 0.95, cosine  # pure bf16 weights: about 0.1


@pytest.mark.parametrize("chunked", [False, True])
def test_head_logps_backward_multiplies_in_bf16_and_matches_float64(chunked, monkeypatch):
    """Every GEMM of HeadLogps' backward (weight gradient included) runs in the compute dtype, bf16 here,
    and the gradients equal float64 autograd's within bf16 rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from logprobs import HeadLogps

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.dtypes.append(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    if chunked:  # 2 rows per chunk: the forward keeps only the logsumexp, the backward recomputes
        monkeypatch.setattr(HeadLogps, "KEEP_ELEMENTS", 0)
        monkeypatch.setattr(HeadLogps, "CHUNK_ELEMENTS", 2 * 50)
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 16), torch.randn(50, 16) / 4
    labels = torch.randint(50, (6,))
    bf16 = [t.to(torch.bfloat16).requires_grad_() for t in (hidden, weight)]
    logps, _ = HeadLogps.apply(*bf16[:1], bf16[1], None, labels, 0.7)
    with Matmuls() as matmuls:
        logps.sum().backward()
    assert len(matmuls.dtypes) >= 2 and set(matmuls.dtypes) == {torch.bfloat16}, matmuls.dtypes

    exact = [t.to(torch.bfloat16).double().requires_grad_() for t in (hidden, weight)]  # the same inputs
    (exact[0] @ exact[1].T / 0.7).log_softmax(-1).gather(-1, labels[:, None]).sum().backward()
    for got, want in zip(bf16, exact):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=2e-2, atol=2e-2)
