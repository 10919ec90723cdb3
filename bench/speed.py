"""Speed and memory of one training step, side by side: this project's sft.py / dpo.py / kto.py,
TRL's SFTTrainer / DPOTrainer / KTOTrainer, and a naive baseline (this project's script with
logprobs.token_logps swapped for full logits + log_softmax().gather()).

    python bench/speed.py                                  # everything, 2 rounds
    python bench/speed.py --cases dpo:ours,dpo:trl --rounds 1
    python bench/speed.py --workload realistic             # packed vs padded vs TRL, realistic lengths

Same model (bench/workload.py: Llama, 19.6M parameters, 32k vocabulary, random weights), same
data (prompt 64 + completion 128 tokens, no padding), same batch (8 sequences: 4 DPO pairs),
fp32 on CPU (bf16 on CUDA), AdamW, the same schedule, no gradient checkpointing. `dpo-pre` is
DPO with reference log-probs precomputed before training (--precompute_ref; TRL's
precompute_ref_log_probs). Every case runs in its own subprocess, so peaks never mix, and a
round runs every case once, so a shared machine's load hits them alike. Per case:
- tokens/s: non-padding tokens of the trained sequences over the median wall time of the
  steps after --warmup; `CPU` ratios use the median CPU time of the process instead, which the
  load of other processes on a shared machine disturbs much less;
- peak MB: max RSS over the measured steps (the high-water mark is reset after warm-up), or
  max allocated on CUDA;
- MFU: model FLOPs per CPU-second of the step over the fp32 matmul FLOPs per CPU-second
  measured in the same process (a 2048^3 matmul). Model FLOPs: 6*N per trained token,
  2*N per token of each other forward (reference, KTO's KL pass), N = parameters less the
  input embedding (a lookup).
The large-vocabulary case (vocab 128k, one sequence of 1024 tokens: prompt 64, completion 960)
measures the memory of sequence log-probs alone (a 1-layer model), peak RSS above the resident
model: logprobs.sequence_logps against the naive form, without grad and forward + backward.

`--workload realistic` trains on realistic lengths instead (bench/workload.py: lognormal, medians
90 prompt / 220 response tokens, long tails) and compares `ours` (packed: padding-free batches, as
by default) with `padded` (--no-padding_free) and TRL, for SFT, DPO and KTO. Steps then differ in
length: tokens/s is the median over steps of each step's own rate, and `padding` is the share of
padding positions in the batches the model ran on (for `ours`, as run: packed, or padded where packing
saves under logprobs.MIN_PACK_SAVING).

TRL is optional: without it the TRL cases are skipped (see README, "Speed and memory").
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import common  # noqa: E402
import batching
import formats
import logprobs
import models
from bench import workload  # noqa: E402

BENCH_DIR = os.path.join(ROOT, "out", "bench")
ROWS = 8  # sequences per step: 8 SFT examples, 4 DPO pairs, 8 KTO examples
LR = 1e-5
ALGOS = {  # script, data file, forwards per trained token besides the trained one (for MFU)
    "sft": ("sft", "sft.jsonl", 0),
    "dpo": ("dpo", "pairs.jsonl", 1),
    "dpo-pre": ("dpo", "pairs.jsonl", 0),
    "kto": ("kto", "unpaired.jsonl", 3),  # the reference on matched and mismatched rows, the policy on mismatched
}
CASES = ["sft:ours", "sft:naive", "sft:trl", "dpo:ours", "dpo:naive", "dpo:trl", "dpo-pre:ours", "dpo-pre:trl",
         "kto:ours", "kto:naive", "kto:trl", "logps:ours", "logps:naive"]
REALISTIC_CASES = [f"{algo}:{impl}" for algo in ("dpo", "kto", "sft") for impl in ("ours", "padded", "trl")]
IMPLEMENTATIONS = ("ours", "padded", "naive", "trl")


def data_dir(workload_name):
    return os.path.join(BENCH_DIR, "realistic") if workload_name == "realistic" else BENCH_DIR


class Finished(Exception):
    """Raised from the step hook once the measured steps are done: skips the final checkpoint save."""


def naive_token_logps(model, batch, temperature=1.0):
    """The naive baseline: full (B, T, V) logits, log_softmax, gather, then the completion columns."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits
    logits = logits[:, -labels.shape[1] - 1:-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(labels == -100, 0.0)


# ---------------------------------------------------------------- measurement

def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the max RSS
            f.write("5")


def peak_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def resident_mb():
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def matmul_rate():
    """GFLOP per CPU-second (and per wall second) of a 2048^3 matmul, fp32 (bf16 on CUDA); median of 5."""
    n, device = 2048, "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    wall, cpu = [], []
    for i in range(7):
        t, c = time.perf_counter(), time.process_time()
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {"matmul_gflops_cpu": 2 * n**3 / statistics.median(cpu) / 1e9,
            "matmul_gflops_wall": 2 * n**3 / statistics.median(wall) / 1e9}


class StepClock:
    """Wall and CPU time at the end of each optimizer step; resets the memory peak after warm-up.
    With PROFILE set, torch.profiler records the measured steps and prints its top operators."""
    PROFILE = False

    def __init__(self, steps, warmup):
        self.steps, self.warmup, self.wall, self.cpu = steps, warmup, [], []
        self.profiler = torch.profiler.profile() if self.PROFILE else None

    def tick(self):
        """Record a step's end; True once the last step is done."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if len(self.wall) == self.warmup:
            reset_peak()
            if self.profiler:
                self.profiler.start()
        done = len(self.wall) >= self.steps
        if done and self.profiler:
            self.profiler.stop()
            table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                                       max_name_column_width=45)
            print(table, file=sys.stderr)
        return done

    def result(self, tokens, positions):
        """Medians over the measured steps of tokens[step] / the step's time; `positions` sums the padded
        (or packed) positions of the measured steps as {name: per-step list}."""
        measured = slice(self.warmup, self.steps)

        def rate(stamps):
            times = [b - a for a, b in zip(stamps[self.warmup - 1:], stamps[self.warmup:])]
            return statistics.median(n / t for n, t in zip(tokens[measured], times))
        return {"tokens_per_s": rate(self.wall), "tokens_per_cpu_s": rate(self.cpu), "peak_mb": peak_mb(),
                "tokens": sum(tokens[measured]), **{k: sum(v[measured]) for k, v in positions.items()},
                **matmul_rate()}


# ---------------------------------------------------------------- the cases, each in a fresh process

def run_ours(algo, impl, steps, warmup, directory):
    """The script's own main(), timed by a hook on common.clip_and_step (once per optimizer step)."""
    import importlib

    script_name, data, _ = ALGOS[algo]
    script = importlib.import_module(script_name)
    if impl == "naive":
        logprobs.token_logps = naive_token_logps
    clock, clip_and_step, count = StepClock(steps, warmup), common.clip_and_step, common.Logger.count
    tokens, positions = [], {"padded_positions": [], "packed_positions": []}

    def timed_step(*args, **kwargs):
        norm = clip_and_step(*args, **kwargs)
        if clock.tick():
            raise Finished
        return norm

    def counted(logger, batch):  # the trained rows of the step (one micro-batch)
        tokens.append(int(batch["attention_mask"].sum()))
        positions["padded_positions"].append(batch["attention_mask"].numel())
        layout = batching.pack(batch, one_row=models.PACKED_SDPA,  # this Llama's attention in the scripts
                               min_saving=logprobs.MIN_PACK_SAVING)
        positions["packed_positions"].append((layout or batch)["input_ids"].numel())
        count(logger, batch)

    common.clip_and_step, common.Logger.count = timed_step, counted
    argv = ["--model", os.path.join(BENCH_DIR, "model"), "--data", os.path.join(directory, data),
            "--batch_size", str(ROWS // 2 if script_name == "dpo" else ROWS), "--max_steps", str(steps + 1),
            "--lr", str(LR), "--log_every", "1000", "--output_dir", tempfile.mkdtemp(),
            "--max_length", str(workload.MAX_LENGTH)] + ([] if impl == "ours" else ["--no-padding_free"])
    try:
        script.main(argv + (["--precompute_ref"] if algo == "dpo-pre" else []))
    except Finished:
        pass
    return clock.result(tokens, positions)


def run_trl(algo, steps, warmup, directory):
    """TRL's trainer on the same model, data, batch, dtype, optimizer and schedule."""
    import datasets
    import transformers
    import trl

    model_dir = os.path.join(BENCH_DIR, "model")
    rows = formats.read_jsonl(os.path.join(directory, ALGOS[algo][1]), [])
    dataset = datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "_where"} for r in rows])
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)

    shared = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=ROWS // 2 if algo.startswith("dpo") else ROWS,
                  max_steps=steps + 1, learning_rate=LR, lr_scheduler_type="cosine",
                  warmup_steps=0.1, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, logging_steps=10**6,
                  save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0,
                  gradient_checkpointing=False, bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available())
    if algo == "sft":
        trainer = trl.SFTTrainer(model=load(), args=trl.SFTConfig(**shared), train_dataset=dataset,
                                 processing_class=tokenizer)
    elif algo.startswith("dpo"):
        config = trl.DPOConfig(beta=0.1, precompute_ref_log_probs=algo == "dpo-pre", **shared)
        trainer = trl.DPOTrainer(model=load(), ref_model=load(), args=config, train_dataset=dataset,
                                 processing_class=tokenizer)
    else:
        trainer = trl.KTOTrainer(model=load(), ref_model=load(), args=trl.KTOConfig(beta=0.1, **shared),
                                 train_dataset=dataset, processing_class=tokenizer)
    clock, compute_loss, tokens, padded = StepClock(steps, warmup), trainer.compute_loss, [], []

    def counted(model, inputs, *args, **kwargs):
        tokens.append(int(inputs["attention_mask"].sum()))  # the trained rows (KTO's KL rows are separate)
        padded.append(inputs["attention_mask"].numel())
        return compute_loss(model, inputs, *args, **kwargs)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = clock.tick()

    trainer.compute_loss = counted
    trainer.add_callback(Clock())
    trainer.train()
    return clock.result(tokens, {"padded_positions": padded})


def run_large_vocab(naive):
    """Peak memory above the resident model of sequence log-probs, vocab 128k, one sequence of 1024 tokens."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(workload.model_config(vocab_size=128000, layers=1))
    prompt, completion = 64, 960
    ids = torch.randint(len(workload.SPECIALS), 128000, (1, prompt + completion))
    batch = batching.collate([ids[0, :prompt].tolist()], [ids[0, prompt:].tolist()], 0, torch.device("cpu"))
    logps = naive_token_logps if naive else logprobs.token_logps
    result = {}
    for name, grad in (("no_grad", False), ("fwd_bwd", True)):
        model.zero_grad(set_to_none=True)
        before = resident_mb()
        reset_peak()
        t = time.perf_counter()
        with torch.set_grad_enabled(grad):
            total = logps(model, batch).sum()
            if grad:
                total.backward()
        result[f"{name}_s"] = time.perf_counter() - t
        result[f"{name}_mb"] = peak_mb() - before
    return result


def child(case, steps, warmup, workload_name):
    algo, impl = case.split(":")
    if algo == "logps":
        return run_large_vocab(impl == "naive")
    if impl == "trl":
        return run_trl(algo, steps, warmup, data_dir(workload_name))
    return run_ours(algo, impl, steps, warmup, data_dir(workload_name))


# ---------------------------------------------------------------- the driver and the report

def spawn(case, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--workload", args.workload]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        print(f"{case} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def have_trl():
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def report(results, rounds):
    """The markdown tables, from {case: [result per round]}."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(workload.model_config())
    n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    matmul = [r for runs in results.values() for r in runs if "matmul_gflops_cpu" in r]
    matmul_rate = median_of(matmul, "matmul_gflops_cpu") if matmul else float("nan")
    lines = [f"N = {n_params / 1e6:.2f}M parameters less the input embedding; medians over {rounds} rounds", "",
             "| algo | implementation | tokens/s | vs padded | vs TRL | vs TRL (CPU time) | peak MB | vs TRL | "
             "padding | MFU |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def ratio(runs, other, key):
        return f"{median_of(runs, key) / median_of(other, key):.2f}x" if other else "-"
    for algo, (_, _, extra_forwards) in ALGOS.items():
        trl, padded = results.get(f"{algo}:trl"), results.get(f"{algo}:padded")
        for impl in IMPLEMENTATIONS:
            runs = results.get(f"{algo}:{impl}")
            if not runs:
                continue
            positions = "packed_positions" if impl == "ours" else "padded_positions"
            padding = 1 - sum(r["tokens"] for r in runs) / sum(r[positions] for r in runs)
            mfu = median_of(runs, "tokens_per_cpu_s") * (6 + 2 * extra_forwards) * n_params / 1e9 / matmul_rate
            lines.append(f"| {algo} | {impl} | {median_of(runs, 'tokens_per_s'):.0f} | "
                         f"{ratio(runs, padded, 'tokens_per_s')} | {ratio(runs, trl, 'tokens_per_s')} | "
                         f"{ratio(runs, trl, 'tokens_per_cpu_s')} | {median_of(runs, 'peak_mb'):.0f} | "
                         f"{ratio(runs, trl, 'peak_mb')} | {100 * padding:.0f}% | {100 * mfu:.0f}% |")
    if matmul:
        lines += ["", f"fp32 matmul (2048^3) in the same processes: {matmul_rate:.0f} GFLOP per CPU-second, "
                      f"{median_of(matmul, 'matmul_gflops_wall'):.0f} GFLOP/s wall (medians); MFU uses the former"]
    ours, naive = results.get("logps:ours"), results.get("logps:naive")
    if ours and naive:
        lines += ["", "| vocab 128k, T=1024: sequence log-probs | common MB | naive MB | common / naive |",
                  "| --- | ---: | ---: | ---: |"]
        for key, name in (("no_grad_mb", "without grad (a reference)"), ("fwd_bwd_mb", "forward + backward")):
            a, b = median_of(ours, key), median_of(naive, key)
            lines.append(f"| {name} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="fixed", choices=["fixed", "realistic"],
                   help="fixed lengths (the default cases), or realistic lengths (packed vs padded vs TRL)")
    p.add_argument("--cases", help="comma-separated algo:implementation (default: all of the workload's)")
    p.add_argument("--rounds", type=int, default=2, help="each case runs once per round; medians over rounds")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per case, warm-up included")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads per case; 1 gives steadier CPU times on a machine shared with other jobs")
    p.add_argument("--profile", metavar="CASE", help="run one case in this process under torch.profiler")
    p.add_argument("--report", action="store_true", help="print the tables of the last run's results.json again")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile:
        workload.build(BENCH_DIR)
    if args.child or args.profile:
        torch.set_num_threads(args.threads)
        StepClock.PROFILE = bool(args.profile)
        print("RESULT " + json.dumps(child(args.child or args.profile, args.steps, args.warmup, args.workload)),
              flush=True)
        return

    results_file = os.path.join(BENCH_DIR, f"results-{args.workload}.json")
    if args.report:
        with open(results_file) as f:
            results = json.load(f)
        print(report(results, max(len(runs) for runs in results.values())))
        return
    workload.build(BENCH_DIR)
    cases = (args.cases or ",".join(REALISTIC_CASES if args.workload == "realistic" else CASES)).split(",")
    for script in sorted({ALGOS[c.split(":")[0]][0] for c in cases if not c.startswith("logps")}):
        if not os.path.exists(os.path.join(ROOT, script + ".py")):
            print(f"{script}.py does not exist yet: its cases are skipped", file=sys.stderr)
            cases = [c for c in cases if c.startswith("logps") or ALGOS[c.split(":")[0]][0] != script]
    if not have_trl():
        print("TRL is not installed: its cases are skipped (see README, 'Speed and memory')", file=sys.stderr)
        cases = [c for c in cases if not c.endswith(":trl")]
    results = {}
    for r in range(args.rounds):
        for case in cases:
            res = spawn(case, args)
            if res:
                results.setdefault(case, []).append(res)
            print(f"round {r + 1}/{args.rounds} {case}: {res}", file=sys.stderr, flush=True)
            with open(results_file, "w") as f:
                json.dump(results, f, indent=1)
    print(report(results, args.rounds))


if __name__ == "__main__":
    main()
