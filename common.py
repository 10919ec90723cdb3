"""What every script needs next to its loss: the shared flags, distributed setup, sampling settings,
the optimizer and the metrics logger.

The other support modules: models.py (--model -> a model: loading, precision, FSDP2), formats.py (data
files -> token ids), batching.py (token ids -> batches, padded or packed), logprobs.py (a batch ->
per-token log-probs), checkpoint.py (saves and resume).
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import random
import re
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

class UserError(Exception):
    """Bad input or flags: reported as one line on stderr with exit code 2, no traceback."""


def run(main):
    """Entry point of every script: turn a UserError into one clear line and exit code 2. A run that ends well
    ends torch.distributed too: gloo's threads, left to the interpreter's exit, can abort a finished rank."""
    try:
        main()
    except UserError as e:
        if "--debug" in sys.argv:
            raise
        tqdm.write(f"error: {e}", file=sys.stderr)  # on a line of its own, even under a progress bar
        sys.exit(2)
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- arguments

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows every default (a None default is explained in the help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def base_parser(doc, data, model, lr=1e-3, max_steps=1000, batch_size=16, output_dir="out/run", real_lr="1e-6",
                eval_file=None):
    """The flags every script shares; each script adds its own and picks its defaults. `real_lr`: the usual
    learning rate on a real model, for the help. `eval_file`: a held-out file beside the default --data, the
    --eval_data default while --data is in that directory (the toy task's)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, epilog=(
        "The defaults are tuned for the bundled toy task (a 1M-parameter model, learning fast). On a real model "
        f"set --model, --data, --lr (usually about {real_lr} here), --max_steps and --max_length."))
    p.add_argument("--model", default=None, help="the model to train: a local Hugging Face directory or a hub id "
                   "(default: the toy task's model, for the toy data only)")
    p.add_argument("--data", default=data, help="training data, JSONL")
    p.add_argument("--eval_data", default=None, help="held-out data in the same shape as --data, scored under eval/ "
                   "at the start, every --eval_every steps and at the end (default: none; the toy task's "
                   "held-out file when --data is toy data)")
    p.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: at the start and end only)")
    p.add_argument("--output_dir", default=output_dir, help="where the model, checkpoints and metrics.jsonl go")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="train into an --output_dir that holds a finished model (replaced at the end), "
                        "deleting its old checkpoints")
    p.add_argument("--max_steps", type=int, default=max_steps, help="optimizer steps to train for")
    p.add_argument("--batch_size", type=int, default=batch_size,
                   help="examples per process per micro-batch; lower it if memory runs out")
    p.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches per optimizer step: a larger batch without more memory")
    p.add_argument("--lr", type=float, default=lr,
                   help=f"peak learning rate; the default suits the toy model, real models want about {real_lr}")
    p.add_argument("--warmup_ratio", type=float, default=0.1,
                   help="share of --max_steps spent warming the learning rate up linearly; then it decays (cosine)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--max_length", type=int, default=512,
                   help="longest prompt + response in tokens; longer examples are cut, the prompt from the left first")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order, sampling and initialisation")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the compute dtype (auto: bfloat16 on CUDA, float32 on CPU); trained weights, their "
                        "gradients and optimizer state stay float32, frozen models load in this dtype")
    p.add_argument("--save_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the final model's weights (auto: the dtype --model is stored in); "
                        "checkpoint-N always holds the float32 weights")
    p.add_argument("--dist_timeout", type=float, default=60,
                   help="minutes a rank waits for the others at a collective (saves, deletes) before giving up")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, about 30%% slower")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run model code shipped with the model (only for models you trust)")
    p.add_argument("--log_every", type=int, default=10, help="write a metrics.jsonl row every N steps")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its latest checkpoint-N in --output_dir")
    p.add_argument("--save_every", type=int, default=0, help="write a checkpoint every N steps (0: only on SIGTERM)")
    p.add_argument("--save_total_limit", type=int, default=2, help="keep only the last N checkpoints")
    p.add_argument("--allow_pickle", action="store_true",
                   help="accept a --model with only .bin (pickle) weights, which can run code when loaded")
    p.add_argument("--padding_free", action=argparse.BooleanOptionalAction, default=None,
                   help="pack sequences into rows without padding (default: on where a start-up check shows the "
                        "model honours packed position_ids, else padded)")
    p.add_argument("--lora_r", type=int, default=0,
                   help="train a LoRA adapter of this rank on the frozen base instead of every weight (0: off; "
                        "needs peft); real models then want a larger --lr, about 10x")
    p.add_argument("--lora_alpha", type=float, default=32, help="LoRA's alpha: the adapter adds (alpha/r) * B @ A")
    p.add_argument("--lora_dropout", type=float, default=0.0,
                   help="dropout on the adapter's input in training (0: off, as every other dropout here)")
    p.add_argument("--lora_target_modules", default="all-linear",
                   help="the linear layers LoRA adapts, as comma-separated names (q_proj,v_proj) or all-linear "
                        "(every one but the LM head)")
    p.add_argument("--merge_lora", action="store_true",
                   help="save the model with the adapter merged in (a full model) instead of the adapter alone")
    p.add_argument("--attn_implementation", default=None,
                   help="the attention kernel, as transformers names it: sdpa, eager, flex_attention, "
                        "flash_attention_2 (packs each batch into one row), ... (default: transformers' choice, "
                        "with sdpa as packed_sdpa: one row, attention sequence by sequence)")
    p.set_defaults(default_eval_data=eval_file and os.path.join(os.path.dirname(data), eval_file), toy_model=model,
                   toy_data_dir=os.path.dirname(data))
    return p


def check_range(args, name, low=None, high=None, above=None):
    """UserError unless args.<name> is >= low, <= high and > above (each bound optional; NaN fails)."""
    value = getattr(args, name)
    rules = [(f"{op} {bound}", ok) for op, bound, ok in (
        (">", above, above is None or value > above), (">=", low, low is None or value >= low),
        ("<=", high, high is None or value <= high)) if bound is not None]
    if not all(ok for _, ok in rules):
        raise UserError(f"--{name} must be {' and '.join(rule for rule, _ in rules)}, got {value}")


def check_args(args):
    """The shared flags' ranges; the toy model as --model for the toy data only; the default held-out file as
    --eval_data beside its data; the --output_dir rule."""
    if args.model is None:
        if os.path.dirname(os.path.abspath(args.data)) != os.path.abspath(args.toy_data_dir):
            raise UserError(f"{args.data}: give --model, the model to train on this data (without it, only the toy "
                            "task's data trains the bundled toy model)")
        args.model = args.toy_model
    beside = getattr(args, "default_eval_data", None)
    if args.eval_data is None and beside and os.path.dirname(os.path.abspath(args.data)) == os.path.dirname(beside):
        args.eval_data = beside
    check_output_dir(args)
    for name in ("max_steps", "batch_size", "grad_accum", "max_length", "lr", "log_every", "save_total_limit",
                 "dist_timeout"):
        check_range(args, name, above=0)
    for name in ("weight_decay", "max_grad_norm", "eval_every", "save_every"):
        check_range(args, name, low=0)
    check_range(args, "warmup_ratio", low=0, high=1)
    check_range(args, "lora_r", low=0)
    check_range(args, "lora_alpha", above=0)
    check_range(args, "lora_dropout", low=0, high=1)
    if args.merge_lora and not args.lora_r:
        raise UserError("--merge_lora merges a LoRA adapter: pass --lora_r too")


def check_output_dir(args):
    """Refuse to train over a finished model (a config and weights in --output_dir) unless told to."""
    out = args.output_dir
    names = os.listdir(out) if os.path.isdir(out) else []
    finished = {"config.json", "adapter_config.json"} & set(names) and any(n.endswith(".safetensors") for n in names)
    resumable = args.resume and any(re.fullmatch(r"checkpoint-\d+", n) for n in names)
    if finished and not (args.overwrite_output_dir or resumable):
        raise UserError(f"{out} already holds a finished model: pass --overwrite_output_dir to replace it, or choose "
                        "another --output_dir (--resume continues an interrupted run from its checkpoint-N)")


# ---------------------------------------------------------------- distributed

def setup(args):
    """Init torch.distributed (nccl on CUDA, gloo on CPU) under torchrun, and as one rank where the compute dtype
    is not float32: FSDP2's mixed precision then keeps the float32 master weights (load_model). Returns the device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend, timeout = "nccl" if device.type == "cuda" else "gloo", datetime.timedelta(minutes=args.dist_timeout)
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        elif resolve_dtype(args.dtype, device) != torch.float32:  # in memory: no port, no launcher
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


class Sums:
    """Named sums over a step's micro-batches (or a held-out pass), kept on the device: no host sync per
    micro-batch. total() adds them over ranks in one collective; every rank must add the same names."""

    def __init__(self):
        self.values = {}

    def add(self, metrics):
        for name, value in metrics.items():
            self.values[name] = self.values.get(name, 0.0) + (value.detach() if torch.is_tensor(value) else value)

    def total(self, device):
        names = sorted(self.values)
        values = torch.stack([torch.as_tensor(self.values[n], device=device).double().reshape(()) for n in names])
        if dist.is_initialized():
            dist.all_reduce(values)
        return dict(zip(names, values.tolist()))


def means(sums, count, prefix="", shares=("loss",)):
    """Sums over examples -> their means (divided by count). The `shares` are means already: each micro-batch
    adds its share of the global batch's (the loss, a token-mean NLL). Keys get `prefix` (eval/ when held out)."""
    return {prefix + name: value if name in shares else value / count for name, value in sums.items()}


def all_sum(values, device):
    """Sum a list of floats over ranks in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def global_mean_std(values, device, mask=None):
    """Mean and standard deviation (Bessel's correction) of `values` over every rank, where `mask` is 1
    (default: all of them), in one collective."""
    mask = torch.ones_like(values) if mask is None else mask
    n, total, squares = all_sum(
        [float(mask.sum()), float((values * mask).sum()), float((values * values * mask).sum())], device)
    mean = total / n
    return mean, max((squares / n - mean ** 2) * n / max(n - 1, 1), 0.0) ** 0.5


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- models and training (loading: models.py)

def resolve_dtype(name, device):
    """The compute dtype --dtype names."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def stop_ids(generation_config, tokenizer):
    """The ids that end a completion: the tokenizer's EOS and every eos_token_id (one or a list) the generation
    config declares. Chat models end a turn with their own token (Gemma's <end_of_turn>, Llama-3's <|eot_id|>)."""
    declared = generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *declared] if i is not None))


def set_sampling(policy, args, tokenizer):
    """Make generate() plain temperature sampling, the distribution that token_logps(logits / T) scores,
    ending at any of stop_ids. The whole generation_config is replaced: a checkpoint's own defaults (top_k=50,
    a repetition penalty, ...) would otherwise still apply and change what is sampled. Returns the old one."""
    from transformers import GenerationConfig

    original = policy.generation_config
    policy.generation_config = GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(original, tokenizer),
    )
    return original


def completions_from(responses, stop):
    """Generated ids as lists, each cut after its first id in stop. Never looks at pad: pad may equal eos."""
    rows = responses.tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in rows]


def generate_completions(policy, prompts, tokenizer, device, batch_size):
    """Sample one response per prompt (examples with `prompt` ids) as set_sampling set generate(), batch_size
    prompts at a time, in eval mode, an FSDP2 policy gathered throughout (models.unsharded): lists of ids, each
    cut after its first stop id."""
    import batching  # imports common
    import models

    completions, stop = [], stop_ids(policy.generation_config, tokenizer)
    with evaluating(policy), models.unsharded(policy):
        for i in range(0, len(prompts), batch_size):
            query = batching.collate_prompts(prompts[i:i + batch_size], tokenizer.pad_token_id, device)
            out = policy.generate(input_ids=query["input_ids"], attention_mask=query["attention_mask"],
                                  synced_gpus=world() > 1, use_cache=True)  # synced: ranks stop at different lengths
            completions += completions_from(out[:, query["input_ids"].shape[1]:], stop)
    return completions


@contextlib.contextmanager
def evaluating(model):
    """A held-out pass: no grad, eval mode (no dropout), the model's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def make_optimizer(model, args, total_steps=None):
    """AdamW on the trained parameters and its schedule (linear warmup, then cosine) over `total_steps`
    optimizer steps (default --max_steps; PPO and GRPO take several per rollout)."""
    from transformers import get_cosine_schedule_with_warmup

    total_steps = total_steps or args.max_steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95),
                                  fused=True)  # one pass per tensor: on CPU 0.03 s a step instead of 0.19 (19.6M)
    warmup = math.ceil(args.warmup_ratio * total_steps)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def clip_and_step(model, optimizer, scheduler, max_grad_norm):
    """Clip (when max_grad_norm > 0), step, zero grads; return the pre-clip gradient norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def unwrapped_class(model):
    """The model's own class: fully_shard swaps in a subclass FSDP<Name>(FSDPModule, <Name>)."""
    return next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))


# ---------------------------------------------------------------- logging


class Logger:
    """metrics.jsonl (one row per step: metrics logged for the same step are merged), a progress bar, a
    tokens/s counter and the end-of-run summary; writes on rank 0 only, creating output_dir then.
    A run resumed after step `start` keeps the file's rows up to `start` and appends to them. `notes` (lines
    about the input) are printed now, once every check has passed: a bad input gets its one error line only.
    The summary shows the `headline` metrics and every eval/ one, before -> after."""

    def __init__(self, args, start=0, notes=(), headline=("loss",)):
        self.args, self.path, self.start = args, os.path.join(args.output_dir, "metrics.jsonl"), start
        self.headline = headline
        for note in notes if rank() == 0 else ():
            print(note, file=sys.stderr)
        # no bar off a terminal (pytest, log files): tqdm's disable=None
        self.bar = tqdm(total=args.max_steps, initial=start, disable=True if rank() != 0 else None, dynamic_ncols=True)
        self.file, self.row, self.tokens, self.t0 = None, None, 0, time.perf_counter()
        self.first, self.last, self.total_tokens, self.began = {}, {}, 0, self.t0

    def count(self, batch):
        self.tokens += int(batch["spans"][:, 1].sum())  # real tokens, counted on the host: no device sync

    def tokens_per_second(self, device):
        """Tokens (all ranks, padding excluded) per second since the last call."""
        (tokens,) = all_sum([float(self.tokens)], device)
        now = time.perf_counter()
        rate, self.tokens, self.t0 = tokens / max(now - self.t0, 1e-9), 0, now
        self.total_tokens += tokens
        return rate

    def log(self, step, metrics):
        """Add metrics to the row of `step`; the row is written when the step ends (update) or another step logs."""
        if rank() != 0:
            return
        if self.row is not None and self.row["step"] != step:
            self.write()
        self.row = {**(self.row or {"step": step}), **metrics}
        for k, v in metrics.items():
            if k in self.headline or k.startswith("eval/"):
                self.first.setdefault(k, v)
                self.last[k] = v
        shown = {k: f"{v:.4g}" for k, v in self.row.items() if k.removeprefix("eval/") in self.headline}
        self.bar.set_postfix(shown, refresh=False)

    def write(self):
        if self.row is None:
            return
        if self.file is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            kept = []
            if self.start and os.path.exists(self.path):  # rows logged after the checkpoint will be logged again
                with open(self.path) as f:
                    kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= self.start]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
            self.file = open(self.path, "a")
        self.file.write(json.dumps(self.row) + "\n")
        self.file.flush()
        self.row = None

    def update(self):
        """Call at the end of each step: writes the step's row, advances the bar."""
        self.write()
        self.bar.update()

    def close(self):
        """Write the last row and print the one-line summary of the run."""
        self.write()
        self.bar.close()
        if self.file:
            self.file.close()
        if rank() == 0:
            seconds = time.perf_counter() - self.began
            changes = ", ".join(f"{k} {self.first[k]:.4g} -> {v:.4g}" for k, v in self.last.items())
            print(f"done: saved to {self.args.output_dir}; {changes or 'no metrics logged'}; "
                  f"{self.args.max_steps - self.start} steps in {seconds:.0f} s, "
                  f"{self.total_tokens / max(seconds, 1e-9):.0f} tokens/s", flush=True)

