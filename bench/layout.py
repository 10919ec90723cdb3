"""Packed against padded, per micro-batch, as a function of what packing saves: the measurement behind
logprobs.MIN_PACK_SAVING (a model that packs runs a batch padded unless packing saves that share of its positions).

One DPO micro-batch (4 pairs: 8 sequences, prompts up to 64 tokens, completions up to 128) on bench/workload.py's
Llama (19.6M parameters, 32k vocabulary), fp32, one thread: the policy's token_logps forward + backward and the
reference's forward without grad, as dpo.py runs them. Lengths are drawn uniformly in [64 - j, 64] (at least 1) and
[128 - j, 128] for growing j, so packing saves from nothing to about a third of the positions. Each layout is
timed in CPU seconds of this process, interleaved; packed / padded is the median of the per-batch ratios.

    python bench/layout.py --reps 5
"""
import argparse
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import batching  # noqa: E402
import logprobs  # noqa: E402
from bench import workload  # noqa: E402

JITTERS = (0, 8, 32, 64, 96, 127)


def pairs_batch(jitter, seed):
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(4, 32000) for _ in range(n)]
    prompts = [ids(64 - rng.randrange(min(jitter, 63) + 1)) for _ in range(4)]
    completions = [ids(128 - rng.randrange(jitter + 1)) for _ in range(8)]
    return batching.collate(prompts * 2, completions, 0, torch.device("cpu"))


def step_cpu_s(model, ref, batch, packed):
    model.padding_free = ref.padding_free = packed
    start = time.process_time()
    logprobs.token_logps(model, batch).sum().backward()
    with torch.no_grad():
        logprobs.token_logps(ref, batch)
    model.zero_grad(set_to_none=True)
    return time.process_time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    model_dir = workload.build(os.path.join(ROOT, "out", "bench"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
    logprobs.MIN_PACK_SAVING = 0.0  # pack whatever it saves: the rule is what this measures
    print(f"load average {os.getloadavg()[0]:.1f}; CPU s per micro-batch, medians of {args.reps}\n")
    print("| jitter | packing saves | padded s | packed s | packed / padded |\n| ---: | ---: | ---: | ---: | ---: |")
    for jitter in JITTERS:
        batches = [pairs_batch(jitter, seed) for seed in range(args.reps)]
        layouts = [batching.pack(b) for b in batches]
        saving = 1 - sum(x["input_ids"].numel() for x in layouts) / sum(b["input_ids"].numel() for b in batches)
        step_cpu_s(model, ref, batches[0], True)  # warm-up
        times = {True: [], False: []}
        for b in batches:
            for packed in (False, True):
                times[packed].append(step_cpu_s(model, ref, b, packed))
        padded, packed = statistics.median(times[False]), statistics.median(times[True])
        ratio = statistics.median(a / b for a, b in zip(times[True], times[False]))  # per batch, then the median
        print(f"| {jitter} | {100 * saving:.1f}% | {padded:.3f} | {packed:.3f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
