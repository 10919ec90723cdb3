"""Resumable checkpoints under torchrun: each rank's peak memory and the time to write one, side by side
for this checkout and another one (e.g. main before the sharded checkpoints).

    git archive main | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python bench/checkpoint.py --before /tmp/before            # both, interleaved, 1 round
    python bench/checkpoint.py                                 # this checkout only

Workload: sft.py under `torchrun --nproc_per_node=2` (gloo, CPU, fp32) on a 97M-parameter Llama
(bench/workload.py's config with hidden 768, 12 layers, 32k vocabulary, random weights, the toy
tokenizer), 2 sequences per rank of at most 32 tokens from the toy SFT data, --save_every 2 over
6 steps: 3 checkpoints (model + AdamW moments: 1.2 GB each), then the final model. Per rank:
- peak MB: the process's max RSS (VmHWM) over the whole run, loading and the final save included;
- during saves: the max RSS within the resumable saves (the high-water mark is reset before each),
  and its largest rise above the resident memory at the start of a save;
- before the first save: the max RSS of loading and training;
- save s: the median wall time of TrainState.save (from a barrier before it to the barrier it ends on).
Each run is its own torchrun, so peaks never mix; a round runs every checkout once, so a shared
machine's load hits them alike. `uptime` is printed before and after.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import workload

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(results, flags):
    """One rank of sft.py, run from the checkout under test (the working directory), with its saves timed."""
    sys.path[:] = [os.getcwd()] + [p for p in sys.path if os.path.abspath(p) != HERE]  # not this file's folder
    import common
    import sft

    if os.path.exists("checkpoint.py"):
        import checkpoint
        train_state = checkpoint.TrainState
    else:  # before the checkpoint module: TrainState lived in common.py
        train_state = common.TrainState
    real_save, seconds, peaks = train_state.save, [], {"train_peak_mb": 0.0, "save_peak_mb": 0.0, "save_rise_mb": 0.0}

    def timed_save(self, step):
        peaks["train_peak_mb"] = peaks["train_peak_mb"] or high_water_mb()  # loading and training, up to here
        reset_high_water()
        resident = high_water_mb()  # the reset sets the high-water mark to the resident memory
        common.barrier()
        start = time.perf_counter()
        real_save(self, step)  # ends on a barrier: every rank times the whole save
        seconds.append(time.perf_counter() - start)
        peaks["save_peak_mb"] = max(peaks["save_peak_mb"], high_water_mb())
        peaks["save_rise_mb"] = max(peaks["save_rise_mb"], high_water_mb() - resident)

    train_state.save = timed_save
    sft.main(flags)
    peak_mb = max(peaks["train_peak_mb"], peaks["save_peak_mb"], high_water_mb())
    with open(os.path.join(results, f"rank{common.rank()}.json"), "w") as f:
        json.dump({"peak_mb": peak_mb, "save_s": seconds, **peaks}, f)


def high_water_mb():
    """The process's peak RSS (VmHWM) since it started or since reset_high_water()."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10


def reset_high_water():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run(checkout, model_dir, data, work, args):
    results, out = tempfile.mkdtemp(dir=work), os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--model", model_dir, "--data", data, "--output_dir", out, "--max_steps", str(args.steps),
             "--save_every", str(args.save_every), "--batch_size", "2", "--max_length", "32", "--log_every", "1",
             "--lr", "1e-4"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(__file__), "--worker", results, "--", *flags]
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"{checkout}: torchrun failed\n{done.stderr[-3000:]}")
    ranks = []
    for r in range(2):
        with open(os.path.join(results, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    shutil.rmtree(out)
    return ranks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="another checkout to measure side by side (e.g. main)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save_every", type=int, default=2)
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return worker(args.worker, [a for a in rest if a != "--"])

    work = args.work or tempfile.mkdtemp(prefix="bench-checkpoint-")
    model_dir, n_params = workload.build_97m(work)
    checkouts = {"before": os.path.abspath(args.before)} if args.before else {}
    checkouts["this"] = ROOT
    print(f"model: {n_params / 1e6:.1f}M parameters; uptime: {subprocess.getoutput('uptime').strip()}")
    runs = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():
            runs[name].append(run(checkout, model_dir, os.path.join(work, "sft.jsonl"), work, args))
    print(f"uptime: {subprocess.getoutput('uptime').strip()}")
    print("| checkout | peak MB rank 0 / rank 1 (ratio) | during saves: MB rank 0 / rank 1 (ratio) "
          "| rise during a save: MB | before the first save: MB | save s (median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rounds in runs.items():
        cells = []
        for key in ("peak_mb", "save_peak_mb", "save_rise_mb", "train_peak_mb"):
            mb = [statistics.median(r[rank][key] for r in rounds) for rank in (0, 1)]
            cells.append(f"{mb[0]:.0f} / {mb[1]:.0f}" + (f" ({mb[0] / mb[1]:.3f})" if key in ("peak_mb", "save_peak_mb") else ""))
        save = statistics.median(s for r in rounds for s in r[0]["save_s"])
        print(f"| {name} ({checkouts[name]}) | {' | '.join(cells)} | {save:.2f} |")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
