"""The time of one PPO rollout (ppo.rollout: sampling, then the policy, reference, value and reward model
scoring every response) on 2 CPU ranks under FSDP2 (gloo), three ways, interleaved, rank 0's medians:

- `per forward`: FSDP2 as it is, every layer gathered and freed again at every forward, so at every decoded token;
- `generate gathered`: the policy kept gathered for generate() only (models.unsharded around
  common.generate_completions), the four scoring passes gathering per forward;
- `all gathered`: as ppo.rollout does now, also each scoring model gathered once for all its chunks.

Each way samples the same seeded tokens and scores them the same (checked). Model: bench/workload.py's Llama (19.6M parameters, 32k
vocabulary, random weights, so no response stops before --max_new_tokens), float32; the reward and value
models are its backbone with a zero value head. 16 prompts of 64 tokens per rank, scored 8 at a time.

    python bench/rollout.py --rounds 3 --max_new_tokens 64      # launches torchrun itself
"""
import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import common  # noqa: E402
import formats  # noqa: E402
import models  # noqa: E402
import ppo  # noqa: E402
import reward_models  # noqa: E402
from bench import workload  # noqa: E402

BENCH_DIR = os.path.join(ROOT, "out", "bench")
WAYS = ("per forward", "generate gathered", "all gathered")


def build_reward_model(model_dir, out_dir):
    """The bench model's backbone and a zero value head, as rm.py writes a reward model."""
    from transformers import AutoModel, AutoTokenizer

    if not os.path.exists(os.path.join(out_dir, reward_models.HEAD_FILE)):
        model = reward_models.RewardModel(AutoModel.from_pretrained(model_dir))
        torch.nn.init.zeros_(model.value_head.weight)
        reward_models.save_reward_model(model, AutoTokenizer.from_pretrained(model_dir), out_dir)
    return out_dir


@contextlib.contextmanager
def way(name):
    """models.unsharded as `name` has it (see the docstring)."""
    real, generate = models.unsharded, common.generate_completions

    def none(model):
        return contextlib.nullcontext()

    def generate_gathered(*args, **kwargs):
        models.unsharded = real
        try:
            return generate(*args, **kwargs)
        finally:
            models.unsharded = none
    if name != "all gathered":
        models.unsharded = none
    if name == "generate gathered":
        common.generate_completions = generate_gathered
    try:
        yield
    finally:
        models.unsharded, common.generate_completions = real, generate


def child(args):
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    model_dir = os.path.join(BENCH_DIR, "model")
    ppo_args = ppo.parse_args(["--model", model_dir, "--reward_model", os.path.join(BENCH_DIR, "rm"), "--data",
                               os.path.join(BENCH_DIR, "pairs.jsonl"), "--dtype", "float32", "--max_length", "512",
                               "--max_new_tokens", str(args.max_new_tokens),
                               "--local_rollout_forward_batch_size", "8"])
    device = common.setup(ppo_args)
    tokenizer, policy = models.load_policy(ppo_args, device)
    ref_model = models.load_reference(ppo_args, device)
    reward_model, value_model = (reward_models.load_reward_model(ppo_args.reward_model, device, "float32",
                                                                 trained=trained) for trained in (False, True))
    assert models.is_sharded(policy) and models.is_sharded(reward_model)
    common.set_sampling(policy, ppo_args, tokenizer)
    rows = formats.read_jsonl(os.path.join(BENCH_DIR, "pairs.jsonl"), ["prompt"])[16 * common.rank():16 * (common.rank() + 1)]
    prompts = [{"prompt": tokenizer(r["prompt"]).input_ids} for r in rows]
    gathers, gather = [0], _fsdp_param_group.foreach_all_gather

    def counted(*a, **k):
        gathers[0] += 1
        return gather(*a, **k)
    _fsdp_param_group.foreach_all_gather = counted
    times, counts, tokens = {}, {}, {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in WAYS:
            torch.manual_seed(common.rank())
            gathers[0] = 0
            torch.distributed.barrier()
            t = time.perf_counter()
            with way(name):
                sampled = ppo.rollout(policy, ref_model, reward_model, value_model, prompts, tokenizer, ppo_args,
                                      device)
            torch.distributed.barrier()
            if r:
                times.setdefault(name, []).append(time.perf_counter() - t)
            counts[name] = gathers[0]
            tokens.setdefault(name, [sampled.batch["input_ids"], *sampled[2:]])  # the tokens and their scores
            assert all(torch.equal(a, b) for a, b in zip(tokens[name], tokens[WAYS[0]])), name
    if common.rank() == 0:
        new = int((sampled.batch["labels"] != -100).sum())
        print(f"{new} new tokens per rank per rollout, {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}\n")
        print("| rollout | s (median) | vs per forward | all-gathers per rank |\n| --- | ---: | ---: | ---: |")
        base = statistics.median(times[WAYS[0]])
        for name in WAYS:
            t = statistics.median(times[name])
            print(f"| {name} | {t:.2f} | {t / base:.2f}x | {counts[name]} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    build_reward_model(workload.build(BENCH_DIR), os.path.join(BENCH_DIR, "rm"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--child",
           "--rounds", str(args.rounds), "--max_new_tokens", str(args.max_new_tokens)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
