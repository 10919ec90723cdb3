"""Does bf16 training learn what float32 learns? dpo.py at a real model's learning rate (5e-7, no warmup),
from the same weights, in three precisions:

    float32                      --dtype float32
    bf16 compute, fp32 weights   --dtype bfloat16: FSDP2 mixed precision on float32 master weights
    pure bf16 weights            the policy loaded in bf16 and AdamW on bf16 weights: what CUDA did before

Reported: the share of weights one step moves (off the start and off the start's bf16 rounding, where a
pure bf16 run starts), and the cosine of the --steps update (final - start) with the float32 run's.
A bf16 weight moves only when the step is at least half its rounding spacing, |w| < ~2^8 x lr.

    python bench/precision.py                           # bench/workload.py's 20M model, toy pairs, CPU
    python bench/precision.py --model DIR --data pairs.jsonl
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

import workload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo  # noqa: E402
import models  # noqa: E402
from toy.task import DATA_DIR  # noqa: E402

RUNS = {"float32": "float32", "bf16 compute, fp32 weights": "bfloat16", "pure bf16 weights (before)": "bfloat16"}


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def train(name, steps, args, out):
    """The run's weights after `steps` DPO steps, saved in float32."""
    flags = ["--model", args.model, "--data", args.data, "--output_dir", out, "--dtype", RUNS[name],
             "--save_dtype", "float32", "--lr", str(args.lr), "--warmup_ratio", "0", "--max_steps", str(steps),
             "--batch_size", str(args.batch_size), "--max_length", str(args.max_length), "--log_every", str(steps)]
    load_model = models.load_model
    if name.startswith("pure"):  # the trained policy held in the compute dtype, as every model was before
        models.load_model = lambda *args, **kwargs: load_model(*args, **{**kwargs, "trained": False})
    try:
        dpo.main(flags)
    finally:
        models.load_model = load_model
    trained = weights(out)
    shutil.rmtree(out)
    return trained


def moved(after, before):
    return int(((after != before) & (after != before.to(torch.bfloat16).float())).sum())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a float32 model directory (default: bench/workload.py's 20M model)")
    p.add_argument("--data", default=None, help="pairs JSONL (default: the toy pairs; outside toy/data, so no toy eval)")
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=128)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-precision-")
    args.model = args.model or workload.build(os.path.join(ROOT, "out", "bench"))
    if args.data is None:
        args.data = os.path.join(work, "pairs.jsonl")
        with open(os.path.join(DATA_DIR, "pairs.jsonl")) as f, open(args.data, "w") as out:
            out.write(f.read())
    start = weights(args.model)
    total = sum(w.numel() for w in start.values())
    print(f"model: {args.model}, {total / 1e6:.1f}M weights; lr {args.lr}; uptime: "
          f"{subprocess.getoutput('uptime').strip()}", flush=True)
    results = {}
    for name in RUNS:
        one, many = (train(name, steps, args, os.path.join(work, f"{RUNS[name]}-{len(results)}-{steps}"))
                     for steps in (1, args.steps))
        update = torch.cat([(many[k] - w).flatten() for k, w in start.items()]).double()  # float32 sums drift
        results[name] = sum(moved(one[k], w) for k, w in start.items()) / total, update
    print(f"| run | weights moved by 1 step | cosine of the {args.steps}-step update with float32's |")
    print("| --- | --- | --- |")
    for name, (share, update) in results.items():
        cosine = torch.nn.functional.cosine_similarity(update, results["float32"][1], dim=0)
        print(f"| {name} | {100 * share:.2f}% | {float(cosine):.3f} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
