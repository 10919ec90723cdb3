"""LoRA against full fine-tuning: dpo.py's peak memory and tokens/s with --lora_r 16 and without, side by side.

    python bench/lora_memory.py                      # 1 round: full, then LoRA
    python bench/lora_memory.py --rounds 3           # interleaved rounds, medians

Workload: dpo.py on CPU in float32 on bench/workload.py's 97M-parameter Llama (random weights, the toy tokenizer),
the first 64 toy pairs, batch 2, --max_length 64, a few steps. Full DPO holds the policy, its gradients, AdamW's two
moments and a frozen reference copy; LoRA DPO holds the frozen base once (the reference is the adapter off) and the
adapter with its gradients and moments. `peak` is the process's max RSS (VmHWM) at the end of the run, `beyond
imports` the same less its RSS before the first model is loaded (Python, torch, transformers, paid by any run).
tokens/s is dpo.py's own figure (padding excluded), the median of its logged steps after the first.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import workload

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(result, flags):
    """One dpo.py run in this process; its peak RSS and RSS before loading to `result` (JSON)."""
    sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p) != HERE]
    import dpo
    import models

    load_model, seen = models.load_model, {}

    def first_load(*args, **kwargs):
        seen.setdefault("imports_mb", workload.memory_mb("VmRSS"))
        return load_model(*args, **kwargs)

    models.load_model = first_load
    dpo.main(flags)
    with open(result, "w") as f:
        json.dump({"peak_mb": workload.memory_mb("VmHWM"), **seen}, f)


def run(name, extra, model_dir, work, steps):
    out, result = os.path.join(work, name), os.path.join(work, f"{name}.json")
    flags = ["--model", model_dir, "--data", os.path.join(work, "pairs.jsonl"), "--output_dir", out,
             "--overwrite_output_dir", "--batch_size", "2", "--max_length", "64", "--max_steps", str(steps),
             "--log_every", "1", "--lr", "1e-5", *extra]
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", result, "--", *flags], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"{name} failed\n{done.stderr[-3000:]}")
    with open(result) as f:
        measured = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rates = [json.loads(line)["tokens/s"] for line in f][1:]
    return {**measured, "tokens_s": statistics.median(rates)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return worker(args.worker, [a for a in rest if a != "--"])

    work = args.work or tempfile.mkdtemp(prefix="bench-lora-")
    model_dir, n_params = workload.build_97m(work, "float32")
    print(f"model: {n_params / 1e6:.1f}M parameters; uptime: {subprocess.getoutput('uptime').strip()}")
    variants = {"full": [], f"LoRA r={args.lora_r}": ["--lora_r", str(args.lora_r)]}
    runs = {name: [] for name in variants}
    for _ in range(args.rounds):
        for i, (name, extra) in enumerate(variants.items()):
            runs[name].append(run(f"v{i}", extra, model_dir, work, args.steps))
    print(f"uptime: {subprocess.getoutput('uptime').strip()}")

    def median(name, key):
        return statistics.median(r["peak_mb"] - r["imports_mb"] if key == "beyond" else r[key] for r in runs[name])

    print("| dpo.py | peak MB (/ full) | peak beyond imports MB (/ full) | tokens/s (/ full) |")
    print("| --- | ---: | ---: | ---: |")
    for name in runs:
        cells = [f"{median(name, k):.0f} ({median(name, k) / median('full', k):.2f}x)"
                 for k in ("peak_mb", "beyond", "tokens_s")]
        print(f"| {name} | {' | '.join(cells)} |")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
