"""The alignment results table: every algorithm on the toy task, from one SFT checkpoint, with defaults.

    python bench/toy_results.py                 # ~30 min on 2 CPU cores; writes bench/toy_results.md (+ .png)
    python bench/toy_results.py --only "DPO (LoRA r 8)" "RM + PPO (LoRA r 8)"   # some rows (SFT always runs)

Trains the toy SFT policy once, then runs each script with its default settings from it and
reads the toy evaluation each run logs (gold score and mean length, start and end), its
held-out reward metric, steps and wall time. The plot (mean length against gold score, one
point per algorithm) needs matplotlib, an optional install for this command only.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "bench")

LORA = ["--lora_r", "8"]  # with 3x each script's default --lr (LoRA wants a larger one; 10x diverged here)
# (name, script, extra flags); every run but SFT's starts from the same SFT checkpoint
RUNS = [
    ("SFT (LoRA r 8, on the random-init base)", "sft.py", LORA + ["--lr", "3e-3"]),
    ("DPO", "dpo.py", []),
    ("DPO+RPO (rpo_alpha 1)", "dpo.py", ["--rpo_alpha", "1.0"]),
    ("R-DPO (rdpo_alpha 0.05)", "dpo.py", ["--rdpo_alpha", "0.05"]),
    ("SamPO", "dpo.py", ["--sampo"]),
    ("Online DPO", "online_dpo.py", []),
    ("LD-DPO (alpha 0.25)", "ld_dpo.py", ["--ld_alpha", "0.25"]),
    ("LD-DPO (alpha 0.5, default)", "ld_dpo.py", []),
    ("LD-DPO (alpha 0.75)", "ld_dpo.py", ["--ld_alpha", "0.75"]),
    ("SimPO", "simpo.py", []),
    ("CPO", "simpo.py", ["--loss", "cpo"]),
    ("ORPO", "orpo.py", []),
    ("KTO", "kto.py", []),
    ("GRPO (dapo loss, default)", "grpo.py", []),
    ("GRPO (grpo loss)", "grpo.py", ["--loss_type", "grpo"]),
    ("GRPO (dr_grpo loss)", "grpo.py", ["--loss_type", "dr_grpo"]),
    ("GSPO (grpo loss, eps 3e-4/4e-4, 2 iterations)", "grpo.py", [
        "--importance_sampling_level", "sequence", "--loss_type", "grpo", "--epsilon", "3e-4", "--epsilon_high", "4e-4",
        "--num_iterations", "2"]),
    ("CISPO (2 iterations)", "grpo.py", ["--loss_type", "cispo", "--num_iterations", "2"]),
    ("RLOO (scale_rewards none)", "grpo.py", ["--advantage", "rloo", "--scale_rewards", "none"]),
    ("REINFORCE++-baseline", "grpo.py", ["--scale_rewards", "centered_batch"]),
    ("GRPO + dynamic sampling", "grpo.py", ["--dynamic_sampling"]),
    ("GRPO + overlong (buffer 8, masked truncation)", "grpo.py",
     ["--overlong_buffer", "8", "--mask_truncated_completions"]),
    ("DPO (LoRA r 8)", "dpo.py", LORA + ["--lr", "3e-3"]),
    ("KTO (LoRA r 8)", "kto.py", LORA + ["--lr", "1.5e-3"]),
    ("GRPO (LoRA r 8)", "grpo.py", LORA + ["--lr", "3e-3"]),
]
PPO_RUNS = [("RM + PPO", []), ("RM + PPO (LoRA r 8)", LORA + ["--lr", "1e-3"])]  # one reward model, trained in full
HELD_OUT = ["eval/rewards/accuracies", "eval/rewards/margins"]  # pairwise scripts, KTO


def run(name, script, flags, out, log):
    """Run one script; return its metrics rows and wall time."""
    cmd = [sys.executable, script, "--output_dir", out, "--overwrite_output_dir", *flags]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=log)
    wall = time.perf_counter() - start
    with open(os.path.join(ROOT, out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], wall


def summarise(name, rows, wall):
    evals = [r for r in rows if "eval/gold_score" in r]
    held = next(([k, r[k]] for r in reversed(rows) for k in HELD_OUT if k in r), ["", float("nan")])
    return {
        "name": name, "gold_before": evals[0]["eval/gold_score"], "gold_after": evals[-1]["eval/gold_score"],
        "len_before": evals[0]["eval/mean_length"], "len_after": evals[-1]["eval/mean_length"],
        "held_out_metric": held[0], "held_out": held[1], "steps": max(r["step"] for r in rows), "wall_s": wall,
    }


def table(results):
    lines = ["| algorithm | gold before → after | mean length before → after | held-out | steps | wall time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        held = f"{r['held_out']:.3f} ({r['held_out_metric'].removeprefix('eval/')})" if r["held_out_metric"] else "—"
        lines.append(f"| {r['name']} | {r['gold_before']:.3f} → {r['gold_after']:.3f} | "
                     f"{r['len_before']:.1f} → {r['len_after']:.1f} | {held} | {r['steps']} | {r['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    sft = results[0]
    ax.scatter([sft["len_before"]], [sft["gold_before"]], marker="*", s=150, color="black", label="SFT start")
    for r in results:
        ax.scatter([r["len_after"]], [r["gold_after"]])
        ax.annotate(r["name"], (r["len_after"], r["gold_after"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean response length (tokens)")
    ax.set_ylabel("gold score")
    ax.set_title("Toy task: length against quality after each algorithm")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/toy_results", help="where the runs write their checkpoints")
    p.add_argument("--only", nargs="*", help="run only these algorithm names (the SFT run always happens)")
    args = p.parse_args()
    os.makedirs(os.path.join(ROOT, args.out), exist_ok=True)
    log = open(os.path.join(ROOT, args.out, "runs.log"), "w")
    sft_dir = os.path.join(args.out, "sft")
    results = [summarise("SFT", *run("SFT", "sft.py", [], sft_dir, log))]
    start = ["--model", sft_dir]
    runs = [r for r in RUNS if not args.only or r[0] in args.only]
    for name, script, flags in runs:
        out = os.path.join(args.out, name.split()[0].lower().replace("+", "_").replace("-", "_"))
        model = [] if script == "sft.py" else start
        results.append(summarise(name, *run(name, script, model + flags, out + "_" + str(len(results)), log)))
    ppo_runs = [r for r in PPO_RUNS if not args.only or r[0] in args.only]
    if ppo_runs:
        rm_dir = os.path.join(args.out, "rm")
        rm_rows, rm_wall = run("RM", "rm.py", start, rm_dir, log)
        rm_accuracy = [r["eval/accuracy"] for r in rm_rows if "eval/accuracy" in r][-1]
    for name, flags in ppo_runs:
        ppo_rows, ppo_wall = run(name, "ppo.py", start + ["--reward_model", rm_dir] + flags,
                                 os.path.join(args.out, "ppo_" + str(len(results))), log)
        results.append(summarise(name, ppo_rows, ppo_wall + rm_wall))
        results[-1].update(held_out_metric="eval/accuracy of the RM", held_out=rm_accuracy)
    text = table(results)
    with open(os.path.join(HERE, "toy_results.md"), "w") as f:
        f.write(text)
    print(text)
    plot(results, os.path.join(HERE, "toy_results.png"))


if __name__ == "__main__":
    main()
