"""What every script needs next to its loss: the shared flags, distributed setup and the FSDP2 wrap,
model loading (dropout off), the optimizer and the metrics logger.

The other support modules: formats.py (data files -> token ids), batching.py (token ids -> batches,
padded or packed), logprobs.py (a batch -> per-token log-probs), checkpoint.py (saves and resume).
"""
import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import random
import re
import socket
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

class UserError(Exception):
    """Bad input or flags: reported as one line on stderr with exit code 2, no traceback."""


def run(main):
    """Entry point of every script: turn a UserError into one clear line and exit code 2."""
    try:
        main()
    except UserError as e:
        if "--debug" in sys.argv:
            raise
        tqdm.write(f"error: {e}", file=sys.stderr)  # on a line of its own, even under a progress bar
        sys.exit(2)


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
    p.add_argument("--model", default=model, help="the model to train: a local Hugging Face directory or a hub id")
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
    p.set_defaults(default_eval_data=eval_file and os.path.join(os.path.dirname(data), eval_file))
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
    """The shared flags' ranges; the default held-out file as --eval_data beside its data; the --output_dir rule."""
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


def check_output_dir(args):
    """Refuse to train over a finished model (a config and weights in --output_dir) unless told to."""
    out = args.output_dir
    names = os.listdir(out) if os.path.isdir(out) else []
    finished = "config.json" in names and any(n.endswith(".safetensors") for n in names)
    resumable = args.resume and any(re.fullmatch(r"checkpoint-\d+", n) for n in names)
    if finished and not (args.overwrite_output_dir or resumable):
        raise UserError(f"{out} already holds a finished model: pass --overwrite_output_dir to replace it, or choose "
                        "another --output_dir (--resume continues an interrupted run from its checkpoint-N)")


# ---------------------------------------------------------------- distributed

def setup(args):
    """Init torch.distributed (nccl on CUDA, gloo on CPU) under torchrun, and as one rank where the compute dtype
    is not float32: FSDP2's mixed precision then keeps the float32 master weights (load_model). Returns the device."""
    global PADDING_FREE
    PADDING_FREE = getattr(args, "padding_free", None)
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


def all_sum(values, device):
    """Sum a list of floats over ranks in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shard_model(model, device, dtype):
    """FSDP2 over all ranks: each decoder layer not sharded yet, then the root. Forwards compute in `dtype` (float32
    parameters are cast for each forward: mixed precision), and gradients are reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = dict(mesh=init_device_mesh(device.type, (world(),)),
                  mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
    layer_classes = tuple(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_classes:  # a sharded layer's class is FSDP<Name>: not matched again
            fully_shard(module, **kwargs)
    return fully_shard(model, **kwargs)


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


# ---------------------------------------------------------------- models

def resolve_dtype(name, device):
    """The compute dtype --dtype names."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_model_path(path, allow_pickle=False):
    """Refuse missing, non-model or pickle-only directories clearly; a hub id must be reachable."""
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
            raise UserError(f"{path}: no such model directory (expected a local HF directory or a hub id)")
        check_hub_reachable(path)
        return
    files = os.listdir(path)
    if "config.json" not in files:
        raise UserError(f"{path}: no config.json, so not a Hugging Face model directory")
    if not any(f.endswith(".safetensors") for f in files):
        if not any(f.endswith(".bin") for f in files):
            raise UserError(f"{path}: no weights (*.safetensors) in the directory")
        if not allow_pickle:
            raise UserError(f"{path} has only pickle weights (.bin), which can run code when loaded; "
                            "convert them to safetensors, or pass --allow_pickle if you trust the source")


@functools.cache
def check_hub_reachable(model_id):
    """Fail at once where the hub cannot be reached, instead of transformers' retries (about 25 s)."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or "https" in getproxies():
        return  # offline: transformers reads the local cache at once; behind a proxy only a download can tell
    host = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=5).close()
    except OSError as e:
        raise UserError(f"{model_id}: cannot reach {host.hostname} to download it ({e}); set HF_HUB_OFFLINE=1 if it "
                        "is in your Hugging Face cache already, or pass a local model directory as --model") from e


def load_tokenizer(path, trust_remote_code=False):
    check_model_path(path, allow_pickle=True)  # the tokenizer has no weights; load_model checks them
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from e
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer at {path} has no EOS token; set one in its tokenizer_config.json")
    if tokenizer.pad_token is None:  # masks never rely on pad != eos, so eos is a safe pad
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, device, dtype="auto", trust_remote_code=False, auto_class=None, allow_pickle=False,
               trained=False):
    """A model ready to run, safetensors unless allow_pickle; `auto_class` replaces AutoModelForCausalLM.

    A `trained` model keeps float32 parameters (the master weights the optimizer updates) and computes in the
    compute dtype `dtype`; a frozen one is held in the compute dtype. Where FSDP2 is needed (under torchrun, or
    float32 parameters computing in bf16), the model is built without weights, sharded, and each rank then reads
    only its shards from the files (load_sharded)."""
    from transformers import AutoModelForCausalLM

    check_model_path(path, allow_pickle)
    auto_class, compute = auto_class or AutoModelForCausalLM, resolve_dtype(dtype, device)
    params = torch.float32 if trained else compute
    if world() == 1 and params == compute:
        model = pretrained(path, auto_class, params, trust_remote_code, allow_pickle).to(device)
    else:
        model = load_sharded(path, auto_class, device, params, compute, trust_remote_code, allow_pickle)
    return disable_dropout(model)


def pretrained(path, auto_class, dtype, trust_remote_code, allow_pickle):
    """from_pretrained on the CPU, with one-line errors."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its multi-line load report is replaced by the one-line errors below
    try:
        model, info = auto_class.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load {path!r} with {auto_class.__name__}: {str(e).splitlines()[0]}") from e
    finally:
        logging.set_verbosity(verbosity)
    if info["missing_keys"]:  # e.g. a backbone without its LM head: never train from random weights silently
        raise UserError(f"{path}: not loadable as {auto_class.__name__}, the checkpoint lacks "
                        f"{', '.join(sorted(info['missing_keys'])[:3])} (a backbone without its LM head?)")
    return model


def load_sharded(path, auto_class, device, params, compute, trust_remote_code, allow_pickle):
    """Parameters on the meta device, fully_shard, then memory for this rank's shards only, which DCP fills
    straight from the safetensors files (checkpoint.read_pretrained). Files whose names transformers converts
    on load (fused MoE experts, renamed layers) are loaded by rank 0 with from_pretrained instead and
    broadcast a tensor at a time: one full copy on one host."""
    import checkpoint
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {path!r} with {auto_class.__name__}: {str(e).splitlines()[0]}") from e
    with parameters_on_meta():
        model = auto_class.from_config(config, dtype=params, trust_remote_code=trust_remote_code)
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # real: computed by the modules (rope)
    shard_model(model, device, compute)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    if not checkpoint.read_pretrained(model, local_snapshot(path)):
        broadcast_pretrained(model, path, auto_class, params, trust_remote_code, allow_pickle)
    return model


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter created inside is on the meta device (no memory); buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:  # one already there stays itself: tied weights stay tied
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def local_snapshot(path):
    """A local directory for `path`: itself, or a hub id's safetensors and configs, downloaded by rank 0."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"]
    if rank() == 0:
        snapshot_download(path, allow_patterns=patterns)
    barrier()
    return snapshot_download(path, allow_patterns=patterns, local_files_only=True)


def broadcast_pretrained(model, path, auto_class, dtype, trust_remote_code, allow_pickle):
    """Rank 0's from_pretrained, copied into every rank's shards (set_model_state_dict broadcasts it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state, error = {}, [None]
    if rank() == 0:
        try:
            state = pretrained(path, auto_class, dtype, trust_remote_code, allow_pickle).state_dict()
        except UserError as e:
            error = [str(e)]
    dist.broadcast_object_list(error)  # every rank stops on rank 0's error, none waits for it
    if error[0]:
        raise UserError(error[0])
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def save_dtype(args):
    """--save_dtype, where auto is the dtype --model's config says its weights are stored in (float32 if unset)."""
    if args.save_dtype != "auto":
        return getattr(torch, args.save_dtype)
    from transformers import AutoConfig

    stored = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).dtype
    return getattr(torch, stored) if isinstance(stored, str) else stored or torch.float32


def disable_dropout(model):
    """Dropout off in training too, as TRL does: every nn.Dropout, and the float rates that attention code
    reads in train mode (Llama's attention_dropout, OPT's dropout and layerdrop). With it on, DPO's step-1
    loss (policy == reference) is not log 2 and PPO's first ratio is not 1. The saved config is unchanged."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "drop" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def load_policy(args, device):
    """The tokenizer and the trained model of --model (float32 weights, computing in --dtype)."""
    model = load_model(args.model, device, args.dtype, args.trust_remote_code, allow_pickle=args.allow_pickle,
                       trained=True)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return tokenizer, model


def set_sampling(policy, args, tokenizer):
    """Make generate() plain temperature sampling, the distribution that token_logps(logits / T) scores.
    The whole generation_config is replaced: a checkpoint's own defaults (top_k=50, a repetition
    penalty, ...) would otherwise still apply and change what is sampled. Returns the old one."""
    from transformers import GenerationConfig

    original = policy.generation_config
    policy.generation_config = GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return original


def completions_from(responses, eos_id):
    """Generated ids as lists, each cut after its first EOS. Never looks at pad: pad may equal eos."""
    rows = responses.tolist()
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


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


def frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model


def make_optimizer(model, args):
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    warmup = math.ceil(args.warmup_ratio * args.max_steps)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, args.max_steps)


def clip_and_step(model, optimizer, scheduler, max_grad_norm):
    """Clip (when max_grad_norm > 0), step, zero grads; return the pre-clip gradient norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# ---------------------------------------------------------------- log-probs


# ---------------------------------------------------------------- data


NOTES = []  # lines about the input (the detected data shapes), printed once every check has passed (Logger)


# ---------------------------------------------------------------- padding-free (packed) forwards

PADDING_FREE = None  # --padding_free / --no-padding_free, set by setup(); None: packing_check decides per model


def unwrapped_class(model):
    """The model's own class: fully_shard swaps in a subclass FSDP<Name>(FSDPModule, <Name>)."""
    return next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))


# ---------------------------------------------------------------- logging


class Logger:
    """metrics.jsonl (one row per step: metrics logged for the same step are merged), a progress bar, a
    tokens/s counter and the end-of-run summary; writes on rank 0 only, creating output_dir then.
    A run resumed after step `start` keeps the file's rows up to `start` and appends to them."""
    HEADLINE = ("loss", "objective/scores", "reward")  # with every eval/ metric, shown before -> after in the summary

    def __init__(self, args, start=0):
        self.args, self.path, self.start = args, os.path.join(args.output_dir, "metrics.jsonl"), start
        while NOTES:  # not earlier: a bad input or flag gets its one error line and nothing else
            print(NOTES.pop(0), file=sys.stderr)
        # no bar off a terminal (pytest, log files): tqdm's disable=None
        self.bar = tqdm(total=args.max_steps, initial=start, disable=True if rank() != 0 else None, dynamic_ncols=True)
        self.file, self.row, self.tokens, self.t0 = None, None, 0, time.perf_counter()
        self.first, self.last, self.total_tokens, self.began = {}, {}, 0, self.t0

    def count(self, batch):
        self.tokens += int(batch["attention_mask"].sum())

    def tokens_per_second(self, device):
        """Tokens (all ranks, padding excluded) per second since the last call."""
        (tokens,) = all_sum([self.tokens], device)
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
            if k in self.HEADLINE or k.startswith("eval/"):
                self.first.setdefault(k, v)
                self.last[k] = v
        shown = {k: f"{v:.4g}" for k, v in self.row.items() if k in ("loss", "eval/loss", "eval/gold_score")}
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

