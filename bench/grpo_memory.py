"""Peak memory of one GRPO step at a 152k-token vocabulary: full (N, V) logits in the update against HeadLogps' chunks.

    python bench/grpo_memory.py              # both, at 8 and 64 new tokens, 2 rounds, fresh process each
    python bench/grpo_memory.py --rounds 1

Workload: grpo.py on CPU in float32, one step, 2 prompts x 8 generations (one micro-batch of N = 16 x new tokens
scored tokens), --max_new_tokens 8 and 64, on a Llama with Qwen2's vocabulary size (152,064; hidden 64, 2 layers,
random weights, the toy tokenizer: ids past its words decode to nothing) and a reward that ignores the text.
A random model rarely samples EOS, so the responses are all but always 64 tokens long. Each run is a fresh
process; the figure is its peak RSS (VmHWM, MiB) after the step. What grows from 8 to 64 tokens is what scales with N:
the update's logits above all. One fp32 (N, V) logits tensor at 64 tokens is 16 x 64 x 152,064 x 4 B = 623 MB (594 MiB).

`full_logits` is the update as it was: logps_and_entropy built the (N, V) logits, divided them by T (a copy,
even at T = 1), took the log-probs with a gradient through them and the entropy from a full softmax.
`chunked` is this checkout's logprobs.logps_and_entropy (HeadLogps).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import workload

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VOCAB, PROMPTS, GENERATIONS = 152064, 2, 8


def constant_reward(completions, **kwargs):
    """The same reward for every response but the first: a non-zero advantage, whatever the text."""
    return [float(i == 0) for i in range(len(completions))]


def full_logits_logps_and_entropy(model, batch, temperature):
    """The update's log-probs and entropies as they were computed before HeadLogps served the update."""
    import torch

    import logprobs

    where = logprobs.scored_index(batch)
    logits = logprobs.completion_logits(model, batch, where).float() / temperature
    with torch.no_grad():
        entropy = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
    index = batch["labels"][where][:, None]
    logps = torch.cat([lg.gather(-1, ix).squeeze(-1) - lg.logsumexp(-1)  # 8 rows at a time, as gather_logps did
                       for lg, ix in zip(logits.split(8), index.split(8))])
    shape = batch["labels"].shape
    return logprobs.spread(logps, where, shape), logprobs.spread(entropy, where, shape)


def worker(impl, new_tokens, work, result):
    sys.path.insert(0, ROOT)
    import grpo
    import logprobs

    if impl == "full_logits":
        logprobs.logps_and_entropy = full_logits_logps_and_entropy
    grpo.main(["--model", os.path.join(work, "model"), "--data", os.path.join(work, "prompts.jsonl"),
               "--reward_fn", f"{os.path.abspath(__file__)}:constant_reward", "--batch_size", str(PROMPTS),
               "--num_generations", str(GENERATIONS), "--max_new_tokens", str(new_tokens), "--max_steps", "1",
               "--log_every", "1", "--num_sample_generations", "0", "--dtype", "float32", "--no-padding_free",
               "--output_dir", os.path.join(work, f"out-{impl}-{new_tokens}"), "--overwrite_output_dir"])
    with open(os.path.join(work, f"out-{impl}-{new_tokens}", "metrics.jsonl")) as f:
        tokens = json.loads(f.readline())["completions/mean_length"]
    with open(result, "w") as f:
        json.dump({"peak_mb": workload.memory_mb("VmHWM"), "mean_length": tokens}, f)


def build(work):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, ROOT)
    from toy.task import DATA_DIR, TINY_MODEL_DIR, build_tiny_model

    if not os.path.exists(TINY_MODEL_DIR):
        build_tiny_model(TINY_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(os.path.join(work, "model"))
    tokenizer.save_pretrained(os.path.join(work, "model"))
    with open(os.path.join(DATA_DIR, "prompts.jsonl")) as f, open(os.path.join(work, "prompts.jsonl"), "w") as out:
        out.writelines(f.readlines()[:PROMPTS])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, tokens, work, result = args.worker
        return worker(impl, int(tokens), work, result)
    work = tempfile.mkdtemp(prefix="grpo_memory_")
    build(work)
    runs = {}
    for _ in range(args.rounds):  # interleaved: a noisy neighbour hits both alike
        for impl in ("full_logits", "chunked"):
            for tokens in (8, 64):
                result = os.path.join(work, "result.json")
                run = subprocess.run([sys.executable, __file__, "--worker", impl, str(tokens), work, result],
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True)
                if run.returncode:
                    sys.exit(f"{impl} at {tokens} tokens failed:\n{run.stdout}{run.stderr}")
                with open(result) as f:
                    runs.setdefault((impl, tokens), []).append(json.load(f))
    tensor_mb = PROMPTS * GENERATIONS * 64 * VOCAB * 4 / 2**20
    print(f"peak RSS of one GRPO step, MiB (median of {args.rounds}); one fp32 (N, V) logits tensor at 64 tokens: "
          f"{tensor_mb:.0f} MiB")
    print(f"{'update':<12} {'8 tokens':>9} {'64 tokens':>10} {'growth':>8} {'/ tensor':>9} {'mean length':>12}")
    for impl in ("full_logits", "chunked"):
        low, high = (statistics.median(r["peak_mb"] for r in runs[impl, t]) for t in (8, 64))
        length = statistics.median(r["mean_length"] for r in runs[impl, 64])
        print(f"{impl:<12} {low:>9.0f} {high:>10.0f} {high - low:>+8.0f} {(high - low) / tensor_mb:>9.2f} "
              f"{length:>12.1f}")


if __name__ == "__main__":
    main()
