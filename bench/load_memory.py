"""Loading under torchrun: each rank's peak memory once dpo.py has loaded what it loads (policy + reference),
just before the first step, against one process loading the same; side by side for this checkout and
another one (e.g. main before sharded loading).

    git archive <commit> | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python bench/load_memory.py --before /tmp/before           # both, interleaved, 1 round
    python bench/load_memory.py                                # this checkout only

Workload: dpo.py on CPU in float32 (the policy trains, the reference is frozen), on bench/workload.py's
97M-parameter Llama (random weights, the toy tokenizer), 64 toy pairs. The files hold bf16 weights, as
released checkpoints do (--stored_dtype), so each model is 390 MB of float32 once loaded.
Per rank, when TrainState.resume is called (every model, the data and the optimizer are set up; the first
forward is next) and every weight has been read once (from_pretrained maps the files lazily: the first
forward would page them in): `peak` is the process's max RSS (VmHWM) so far, `resident` its RSS then,
and `imports` its RSS before the first model is loaded (Python, torch, transformers), which every process
pays. Then the run stops.
"""
import argparse
import importlib
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


def worker(results, flags):
    """One rank (or the one process) of dpo.py in the checkout under test (the working directory)."""
    sys.path[:] = [os.getcwd()] + [p for p in sys.path if os.path.abspath(p) != HERE]  # not this file's folder
    import checkpoint
    import common
    import dpo

    loader = importlib.import_module("models" if os.path.exists("models.py") else "common")  # where load_model is
    load_model, seen, loaded = loader.load_model, {}, []

    def first_load(*args, **kwargs):
        seen.setdefault("imports_mb", workload.memory_mb("VmRSS"))
        loaded.append(load_model(*args, **kwargs))
        return loaded[-1]

    def stop(self):
        for model in loaded:  # page in what from_pretrained maps lazily, as the first forward would
            for tensor in model.state_dict().values():
                float((tensor.to_local() if hasattr(tensor, "to_local") else tensor).float().sum())
        with open(os.path.join(results, f"rank{common.rank()}.json"), "w") as f:
            json.dump({"peak_mb": workload.memory_mb("VmHWM"), "resident_mb": workload.memory_mb("VmRSS"), **seen}, f)
        common.barrier()
        sys.exit(0)

    loader.load_model, checkpoint.TrainState.resume = first_load, stop
    dpo.main(flags)


def run(checkout, ranks, model_dir, work):
    results = tempfile.mkdtemp(dir=work)
    flags = ["--model", model_dir, "--data", os.path.join(work, "pairs.jsonl"), "--output_dir",
             os.path.join(work, "out"), "--batch_size", "2", "--max_length", "64"]
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                                 if ranks > 1 else [])
    done = subprocess.run([*launch, os.path.abspath(__file__), "--worker", results, "--", *flags], cwd=checkout,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"{checkout}: {ranks} rank(s) failed\n{done.stderr[-3000:]}")
    out = []
    for r in range(ranks):
        with open(os.path.join(results, f"rank{r}.json")) as f:
            out.append(json.load(f))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="another checkout to measure side by side (e.g. main)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--stored_dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="the dtype of the model's files")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return worker(args.worker, [a for a in rest if a != "--"])

    work = args.work or tempfile.mkdtemp(prefix="bench-load-")
    model_dir, n_params = workload.build_97m(work, args.stored_dtype)
    checkouts = {"before": os.path.abspath(args.before)} if args.before else {}
    checkouts["this"] = ROOT
    print(f"model: {n_params / 1e6:.1f}M parameters stored in {args.stored_dtype}; uptime: {subprocess.getoutput('uptime').strip()}")
    runs = {(name, ranks): [] for name in checkouts for ranks in (1, 2)}
    for _ in range(args.rounds):
        for name, ranks in runs:
            runs[name, ranks].append(run(checkouts[name], ranks, model_dir, work))
    print(f"uptime: {subprocess.getoutput('uptime').strip()}")
    print("| checkout | ranks | peak MB per rank (/ one process) | resident MB (/ one process) "
          "| resident beyond imports MB (/ one process) |")
    print("| --- | --- | --- | --- | --- |")

    def median(rounds, rank, key):
        return statistics.median(r[rank]["peak_mb" if key == "peak" else "resident_mb"]
                                 - (r[rank]["imports_mb"] if key == "beyond" else 0) for r in rounds)

    for (name, ranks), rounds in runs.items():
        cells = []
        for key in ("peak", "resident", "beyond"):
            mb, one = [median(rounds, k, key) for k in range(ranks)], median(runs[name, 1], 0, key)
            cells.append(" / ".join(f"{m:.0f}" for m in mb) + f" ({' / '.join(f'{m / one:.2f}' for m in mb)})")
        print(f"| {name} | {ranks} | {' | '.join(cells)} |")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
