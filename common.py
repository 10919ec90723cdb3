"""What every script needs and none of them is about: log-probs, data, models, FSDP2 (checkpoints: checkpoint.py).

Batch layout (all collators): each row is [left padding | prompt | completion | right padding],
with every completion starting at the same column P. `labels` holds only the completion
columns: labels[:, j] is token P + j, or -100 on padding and on the unscored turns inside a
multi-turn chat's completion (an example's "completion_mask"). So the model projects to the
vocabulary only at the C + 1 positions that score a completion token, never on the prompt.

This padded batch is what scripts see. The model may run on its packed (padding-free) form instead:
pack() puts each sequence's real tokens whole into rows of at most P + C tokens, position_ids
restarting at 0 per sequence and no attention_mask, so attention stays inside each sequence.
token_logps, completion_logits and position_outputs map results back to the padded columns;
packs() decides per model (--padding_free, else packing_check once).

    padded (B=3, P=3, C=4)      packed (R=2 rows, T=7)    position_ids
     5  6  7 | 11 12  .  .       9 10 14 15 16 17  .       0 1 2 3 4 5 0    (. = padding; the packed
     .  .  8 | 13  .  .  .       5  6  7 11 12  8 13       0 1 2 3 4 0 1     row's filler is never scored)
     .  9 10 | 14 15 16 17
"""
import argparse
import contextlib
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
import torch.nn.functional as F
from tqdm import tqdm

from toy.task import DATA_DIR as TOY_DATA_DIR, TINY_MODEL_DIR, build_tiny_model

SFT_MODEL_DIR = "out/sft"  # where `python sft.py` leaves the toy SFT policy the other scripts start from


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


def base_parser(doc, data, model=TINY_MODEL_DIR, lr=1e-3, max_steps=1000, batch_size=16, output_dir="out/run",
                real_lr="1e-6", toy_eval_data=None):
    """The flags every script shares; each script adds its own and picks its defaults. `real_lr`: the usual
    learning rate on a real model, for the help. `toy_eval_data`: the --eval_data default on toy data."""
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
                   help="auto: bfloat16 on CUDA, float32 on CPU")
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
    p.set_defaults(toy_eval_data=toy_eval_data and os.path.join(TOY_DATA_DIR, toy_eval_data))
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
    """The shared flags' ranges; the toy held-out file as --eval_data on toy data; the --output_dir rule."""
    from toy.eval import is_toy

    if args.eval_data is None and getattr(args, "toy_eval_data", None) and is_toy(args):
        args.eval_data = args.toy_eval_data
    check_output_dir(args)
    for name in ("max_steps", "batch_size", "grad_accum", "max_length", "lr", "log_every", "save_total_limit"):
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
    """Init torch.distributed under torchrun (nccl on CUDA, gloo on CPU); return the device."""
    global PADDING_FREE
    PADDING_FREE = getattr(args, "padding_free", None)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
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


def shard_model(model, device):
    """FSDP2: fully_shard each decoder layer, then the root; bf16 compute with fp32 reductions on CUDA."""
    if not dist.is_initialized():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kwargs = dict(mesh=mesh, **({"mp_policy": mp} if mp else {}))
    layer_classes = tuple(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, **kwargs)
    return fully_shard(model, **kwargs)


# ---------------------------------------------------------------- models

def resolve_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_model_path(path, allow_pickle=False):
    """Build the bundled tiny model on first use; refuse missing, non-model or pickle-only directories clearly."""
    if path == TINY_MODEL_DIR and not os.path.exists(path):
        build_tiny_model(path)
    if path == SFT_MODEL_DIR and not os.path.exists(path):
        raise UserError(f"{path} does not exist: run `python sft.py` first, or pass --model")
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


def load_model(path, device, dtype="auto", trust_remote_code=False, auto_class=None, allow_pickle=False):
    """from_pretrained, safetensors unless allow_pickle. `auto_class` replaces AutoModelForCausalLM."""
    check_model_path(path, allow_pickle)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    auto_class = auto_class or AutoModelForCausalLM
    logging.disable_progress_bar()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its multi-line load report is replaced by the one-line errors below
    try:
        model, info = auto_class.from_pretrained(
            path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load {path!r} with {auto_class.__name__}: {str(e).splitlines()[0]}") from e
    finally:
        logging.set_verbosity(verbosity)
    if info["missing_keys"]:  # e.g. a backbone without its LM head: never train from random weights silently
        raise UserError(f"{path}: not loadable as {auto_class.__name__}, the checkpoint lacks "
                        f"{', '.join(sorted(info['missing_keys'])[:3])} (a backbone without its LM head?)")
    return disable_dropout(model).to(device)


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
    model = load_model(args.model, device, args.dtype, args.trust_remote_code, allow_pickle=args.allow_pickle)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return tokenizer, model


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

def gather_logps(logits, labels, chunk_rows=8):
    """log softmax(logits)[labels] per position (already aligned), 0.0 where labels == -100. As logit[label] -
    logsumexp a few rows at a time in float32: no float32 copy of the full (B, T, V) log-softmax exists."""
    mask = labels != -100
    index = labels.masked_fill(~mask, 0).unsqueeze(-1)
    out = []
    for lg, ix in zip(logits.split(chunk_rows), index.split(chunk_rows)):
        lg = lg.float()
        out.append(lg.gather(-1, ix).squeeze(-1) - lg.logsumexp(-1))
    return torch.cat(out).masked_fill(~mask, 0.0)


def token_logps(model, batch, temperature=1.0):
    """Per-token log-probs (B, C) of the completion columns, 0.0 on padding (packed or padded forward: see pack).

    For this one forward the LM head scores the labels itself (HeadLogps) instead of returning
    logits: it projects only the positions that predict a completion token (no prompt, no
    padding), and its float32 logits stay within HeadLogps' memory budget, forward and backward.
    """
    labels = batch["labels"]
    mask = labels != -100
    head = model.get_output_embeddings()
    scored = []

    def score(hidden):
        scored.append(HeadLogps.apply(hidden, head.weight, head.bias, labels[mask], temperature))
        return scored[-1]

    logps = completion_logits(model, batch, score)
    if not scored or logps is not scored[-1]:  # the model changes its head's output (Gemma-2's soft-capping)
        logits = completion_logits(model, batch)
        logps = gather_logps(logits.float() / temperature if temperature != 1.0 else logits, labels[mask])  # float32 / T
    return spread(logps, mask)


def completion_logits(model, batch, score=None):
    """One forward in which the LM head sees only the (N, H) hidden states that predict the N completion
    tokens labels[labels != -100] (row-major), packed or padded (see pack). Returns the logits there (N, V),
    after any change the model makes to its head's output, or, with `score`, score(hidden) in the head's place."""
    labels = batch["labels"]
    mask = labels != -100
    if packs(model):
        packed = pack(batch)
        P = batch["input_ids"].shape[1] - labels.shape[1]
        where = packed["index"][:, P - 1:P - 1 + labels.shape[1]][mask]  # the token before each completion token
        inputs = dict(input_ids=packed["input_ids"], position_ids=packed["position_ids"])

        def select(hidden):
            return hidden.flatten(0, 1)[where]
    else:
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], logits_to_keep=labels.shape[1] + 1)

        def select(hidden):  # (B, C + 1, H): position P-1+j predicts completion token j, the last one nothing
            return hidden[:, :-1][mask]
    head = model.get_output_embeddings()
    project, called = score or head.forward, []

    def head_forward(hidden):
        called.append(True)
        return project(select(hidden))

    own_forward = vars(head).pop("forward", None)  # an instance attribute shadows the class's forward
    head.forward = head_forward
    try:
        out = model(**inputs, use_cache=False)
    finally:
        del head.forward
        if own_forward is not None:
            head.forward = own_forward
    return out.logits if called else select(out.logits)  # a model that never calls its head: full logits


def logps_and_entropy(model, batch, temperature):
    """token_logps with a gradient through full logits (N, V), plus the entropy of pi(.|state) at each
    response position (no grad): PPO's and GRPO's update. logits / T in float32, as the rollout's scoring."""
    mask = batch["labels"] != -100
    logits = completion_logits(model, batch).float() / temperature
    with torch.no_grad():
        entropy = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
    return spread(gather_logps(logits, batch["labels"][mask]), mask), spread(entropy, mask)


def spread(values, mask):
    """(N,) values back to the completion columns (B, C) where mask is True, 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


class HeadLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias) / temperature)[labels] for N scored rows: (N, H) -> (N,).

    d logp / d logits = (onehot(label) - softmax) / temperature. When the N x V softmax is small
    (KEEP_ELEMENTS) and a gradient is needed, it is computed at once and kept for the backward.
    Otherwise the float32 logits exist one chunk of rows (CHUNK_ELEMENTS) at a time: the forward
    keeps each row's logsumexp only, the backward recomputes a chunk's logits and turns them in
    place into their gradient. Chunks stay large for efficient matmuls (each re-reads the weight).
    """
    CHUNK_ELEMENTS = 2**24  # 64 MB of float32 logits
    KEEP_ELEMENTS = 2**25  # 128 MB: a DPO batch at a 32k vocabulary keeps it; 1k tokens at 128k recompute

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature):
        keep = any(ctx.needs_input_grad) and hidden.shape[0] * weight.shape[0] <= HeadLogps.KEEP_ELEMENTS
        rows = hidden.shape[0] if keep else max(1, HeadLogps.CHUNK_ELEMENTS // weight.shape[0])
        chunks = [HeadLogps.chunk_forward(h, y, weight, bias, temperature, keep)
                  for h, y in zip(hidden.split(rows), labels.split(rows))]
        logps, lse, probs = zip(*chunks)
        logps, lse = torch.cat(logps), torch.cat(lse)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, probs[0] if keep else None)
        ctx.rows, ctx.temperature = rows, temperature
        return logps

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse, probs = ctx.saved_tensors
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        grad_hidden = torch.cat([
            HeadLogps.chunk_backward(h, y, lz, g, weight, bias, ctx.temperature, grad_weight, grad_bias, probs)
            for h, y, lz, g in zip(*(t.split(ctx.rows) for t in (hidden, labels, lse, grad)))])
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)

    @staticmethod
    def chunk_logits(h, weight, bias, temperature):
        logits = F.linear(h, weight, bias).float()
        return logits.div_(temperature) if temperature != 1.0 else logits

    @staticmethod
    def chunk_forward(h, y, weight, bias, temperature, keep):
        """(log-probs, logsumexp, softmax if keep) of a chunk's rows, in place in one (rows, V) buffer."""
        logits = HeadLogps.chunk_logits(h, weight, bias, temperature)
        target = logits.gather(-1, y[:, None]).squeeze(-1)
        top = logits.amax(-1, keepdim=True)
        total = logits.sub_(top).exp_().sum(-1, keepdim=True)
        lse = (total.log() + top).squeeze(-1)
        return target - lse, lse, logits.div_(total) if keep else None

    @staticmethod
    def chunk_backward(h, y, lse, g, weight, bias, temperature, grad_weight, grad_bias, probs):
        """The chunk's hidden gradient; adds its weight and bias gradients (float32) in place."""
        if probs is None:
            probs = HeadLogps.chunk_logits(h, weight, bias, temperature).sub_(lse[:, None]).exp_()
        grad_logits = probs.mul(-g[:, None]).scatter_add_(1, y[:, None], g[:, None])
        if temperature != 1.0:
            grad_logits.div_(temperature)
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T, h.float())
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
        return grad_logits.to(weight.dtype) @ weight


def sequence_logps(model, batch, temperature=1.0):
    """(sum of completion log-probs, number of completion tokens), each of shape (B,)."""
    return token_logps(model, batch, temperature).sum(-1), (batch["labels"] != -100).sum(-1)


# ---------------------------------------------------------------- data

def read_jsonl(path, required):
    """Rows of a JSONL file, each with the `required` fields; errors name the file and line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such data file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UserError(f"{path}:{n}: not valid UTF-8; re-encode the file as UTF-8") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if not rows and not line.startswith("{"):
                    raise UserError(f"{path}:{n}: expected JSONL, one object per line; {not_jsonl(line)}") from None
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                if not rows:
                    raise UserError(f"{path}:{n}: expected JSONL, one object per line; {not_jsonl(line)}")
                raise UserError(f"{path}:{n}: expected a JSON object with fields {', '.join(required)}")
            for field in required:
                if field not in row:
                    raise UserError(f"{path}:{n}: missing field {field!r}; each line needs {', '.join(required)}")
                check_field(row[field], f"{path}:{n}: field {field!r}", field)
            row["_where"] = f"{path}:{n}"
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no examples; the file is empty")
    return rows


def not_jsonl(first_line):
    if first_line.startswith("["):
        return "this is a JSON array: write one object per line (e.g. jq -c '.[]' data.json > data.jsonl)"
    return "this looks like CSV or plain text: convert it to one JSON object per line"


def check_field(value, where, field):
    if field == "label":
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {json.dumps(value)}")
        return
    if isinstance(value, list):
        if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                and isinstance(m.get("content"), str) for m in value):
            raise UserError(f"{where} must be a list of {{'role': str, 'content': str}} messages")
        value = "".join(m["content"] for m in value)
    elif not isinstance(value, str):
        raise UserError(f"{where} must be a string or a list of messages, got {json.dumps(value)}")
    if not value.strip() and field != "prompt":
        raise UserError(f"{where} is empty; remove the line or fill it in")


def row_shape(row, fields):
    """The shape of a data row, from its fields (and, for pairs with a prompt, whether the lists repeat it)."""
    def repeats_prompt(value):  # H4 style: the conversation starts with the prompt's turns
        return isinstance(value, list) and any(isinstance(m, dict) and m.get("role") != "assistant" for m in value)

    if fields == ("completion",) and "messages" in row and "completion" not in row:
        return "messages"
    if fields == ("chosen", "rejected") and "prompt" not in row and "chosen" in row:
        return "implicit prompt"
    if fields == ("chosen", "rejected") and repeats_prompt(row.get("chosen")) and repeats_prompt(row.get("rejected")):
        return "H4"
    chat = any(isinstance(row[f], list) for f in ("prompt", *fields) if f in row and f != "label")
    return "/".join(["prompt", *fields]) + (" chat" if chat else " text")


NOTES = []  # lines about the input (the detected data shapes), printed once every check has passed (Logger)
SHAPES = {  # what the one stderr line says about each detected shape
    "messages": "conversations, loss on every assistant turn and nothing else",
    "implicit prompt": "chosen/rejected conversations; the prompt is the messages they share",
    "H4": "a prompt plus chosen/rejected conversations that repeat it; the conversations are used",
    "text": "plain text, no chat template",
    "chat": "chat messages, rendered with the tokenizer's chat template",
}


def read_data(path, fields):
    """A data file in any accepted shape, as rows {"prompt", *fields, "_where"} that tokenize() takes.

    fields: ("completion",) for SFT, ("chosen", "rejected") for pairs, ("completion", "label") for
    unpaired feedback, () for prompts. The first row's fields pick the shape (one stderr line says
    which, in NOTES); every later row must have it. Chat rows come out as a list of prompt messages and
    completions that start with an assistant turn; only SFT completions may hold later user turns,
    which are never scored. A string beside messages is a user prompt or an assistant reply.
    """
    rows = read_jsonl(path, [])
    shape = row_shape(rows[0], fields)
    for row in rows:
        where = row["_where"]
        if row_shape(row, fields) != shape:
            raise UserError(f"{where}: a {row_shape(row, fields)} row, but the first row is {shape}; "
                            "every row must have the same shape")
        required = {"messages": ["messages"], "implicit prompt": ["chosen", "rejected"]}.get(shape, ["prompt", *fields])
        for field in required:
            if field not in row:
                other = {("completion",): " (or one 'messages' conversation)",
                         ("chosen", "rejected"): " (or chosen and rejected conversations)"}.get(fields, "")
                raise UserError(f"{where}: missing field {field!r}; each line needs {', '.join(required)}{other}")
            check_field(row[field], f"{where}: field {field!r}", field)
        if shape == "messages":
            row.update(split_conversation(row.pop("messages"), where))
        elif shape in ("implicit prompt", "H4"):
            row.update(extract_prompt(row, where))
        elif shape.endswith(" chat"):
            if isinstance(row["prompt"], str):
                row["prompt"] = [{"role": "user", "content": row["prompt"]}]
            for f in fields:
                if isinstance(row[f], str) and f != "label":
                    row[f] = [{"role": "assistant", "content": row[f]}]
        for f in fields if shape.endswith(" chat") or shape in ("implicit prompt", "H4") else ():
            if f != "label":
                check_reply(row[f], f, fields, where)
    if rank() == 0:
        NOTES.append(f"{path}: {shape} rows ({SHAPES[shape] if shape in SHAPES else SHAPES[shape.split()[-1]]})")
    return rows


def split_conversation(messages, where):
    """A `messages` conversation as prompt (before the first assistant turn) and completion (through the last)."""
    scored = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not scored:
        raise UserError(f"{where}: field 'messages' has no assistant turn, so nothing to train on")
    if scored[0] == 0:
        raise UserError(f"{where}: field 'messages' starts with an assistant turn; put the user turn it answers first")
    return {"prompt": messages[: scored[0]], "completion": messages[scored[0]: scored[-1] + 1]}


def extract_prompt(row, where):
    """Implicit and H4 pairs: the prompt is the longest run of messages chosen and rejected start with."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise UserError(f"{where}: without a 'prompt' field, 'chosen' and 'rejected' must both be lists of messages "
                        "that start with the same prompt turns; for plain text, add a 'prompt' field")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise UserError(f"{where}: 'chosen' and 'rejected' do not start with the same message, so they share no prompt")
    prompt = row.get("prompt")
    ambiguous = (prompt != chosen[: len(prompt)] or len(prompt) > n if isinstance(prompt, list)
                 else prompt is not None and prompt.strip() not in [m["content"].strip() for m in chosen[:n]])
    if ambiguous:
        raise UserError(f"{where}: field 'prompt' is not among the turns 'chosen' and 'rejected' share, so "
                        "which prompt to train on is ambiguous; drop 'prompt' or make it the shared user turn")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def check_reply(messages, field, fields, where):
    """A chat completion starts with an assistant turn; outside SFT it is exactly one assistant turn."""
    roles = [m["role"] for m in messages]
    if not roles:
        raise UserError(f"{where}: field {field!r} has no reply after the prompt that 'chosen' and 'rejected' share")
    if roles[0] != "assistant" or (fields != ("completion",) and roles != ["assistant"]):
        need = "start with the assistant's reply" if fields == ("completion",) else "be one assistant reply"
        raise UserError(f"{where}: field {field!r} must {need} (its roles: {', '.join(roles)}); give whole "
                        "conversations as " + ("'messages'" if fields == ("completion",) else
                                               "'chosen' and 'rejected' lists that both repeat the prompt"))


def encode_prompt(tokenizer, prompt):
    """A plain prompt as the tokenizer encodes text (with BOS if it adds one); messages via the chat template."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def chat_pieces(tokenizer, prompt, completion, where):
    """The text after the prompt through the last assistant turn, as (text, scored) pieces.

    Each assistant turn of `completion` is scored from where the template starts generating it
    (the render of the messages before it with add_generation_prompt) to the end of the render
    through it; user turns and role headers between are not. No template syntax is assumed, but
    each render must be the start of the whole conversation's.
    """
    chat = prompt + completion

    def render(n, generation=False):
        return tokenizer.apply_chat_template(chat[:n], add_generation_prompt=generation, tokenize=False)

    full, pos, pieces = render(len(chat)), len(render(len(prompt), True)), []
    for i in range(len(prompt), len(chat)):
        if chat[i]["role"] != "assistant":
            continue
        head, end = render(i, True), render(i + 1)
        if not (full.startswith(head) and full.startswith(end) and pos <= len(head) <= len(end)):
            raise UserError(f"{where}: the chat template renders messages 1-{i + 1} differently from the start of the "
                            "whole conversation (it rewrites earlier turns), so the assistant turns cannot be "
                            "located; use a template that renders each turn the same way, or one reply per row")
        pieces += [(full[pos: len(head)], False), (full[len(head): len(end)], True)]
        pos = len(end)
    return [(text, scored) for text, scored in pieces if text]


def encode_completion(tokenizer, prompt, completion, where="?"):
    """(ids, mask): completion ids ending in exactly one EOS, and None when every id is scored, else a
    0/1 list over the ids (a chat whose completion holds later user turns: 1 on assistant tokens only).

    An assistant turn is scored through the last EOS the template writes in it (all of it if none);
    what follows (the template's newline, the next turn) is not. The completion ends after its last
    scored token, with an EOS appended if the template wrote none.
    """
    eos = tokenizer.eos_token_id
    pieces = chat_pieces(tokenizer, prompt, completion, where) if isinstance(completion, list) else [(completion, True)]
    ids, mask = [], []
    for text, scored in pieces:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        n = (len(piece) - piece[::-1].index(eos) if eos in piece else len(piece)) if scored else 0
        ids, mask = ids + piece, mask + [1] * n + [0] * (len(piece) - n)
    end = len(mask) - mask[::-1].index(1) if 1 in mask else 0
    ids, mask = ids[:end], mask[:end]
    if not ids or ids[-1] != eos:
        ids, mask = ids + [eos], mask + [1]
    return ids, None if all(mask) else mask


def truncate(prompt_ids, completion_lens, max_length):
    """The --max_length rule: cut the prompt from the left first, keeping at least half of max_length
    for it (if it has that many); completions are then cut from the right to fit. Returns
    (prompt_ids, completion budget, whether anything was cut)."""
    longest = max(completion_lens)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, max_length - len(prompt_ids), False
    keep = min(len(prompt_ids), max(max_length - longest, max_length // 2))
    return prompt_ids[len(prompt_ids) - keep:], max_length - keep, True


def tokenize(rows, tokenizer, max_length, fields):
    """Tokenize each row into {"prompt": ids, field: ids for field in fields, "label"?, "completion_mask"?}.

    `fields` are the completion fields: ("completion",), ("chosen", "rejected"), or () for prompts.
    The prompt is tokenized once and shared by a pair's two completions. A multi-turn chat (SFT) also
    gets "completion_mask", 0/1 over the completion ids: its user turns and role headers sit in the
    completion but are never scored (collate's `masks`).
    The first completion token is
    always predicted from a prompt token (BOS, for an empty prompt), never from padding: a prompt of zero
    tokens is an error, and so is a max_length that cannot keep one prompt token and a whole completion.
    """
    examples, cut_at, unfit = [], [], []
    for row in rows:
        where, prompt = row.get("_where", "?"), encode_prompt(tokenizer, row["prompt"])
        if not prompt:
            raise UserError(f"{where}: the prompt is empty after tokenization and this tokenizer adds no BOS "
                            "token, so no token would predict the completion's first token; give it a prompt")
        encoded = [encode_completion(tokenizer, row["prompt"], row[f], where) for f in fields]
        need = 1 + max((len(ids) for ids, _ in encoded), default=0)  # one prompt token and the longest whole completion
        unfit += [(where, need)] * (need > max_length)
        prompt, budget, cut = truncate(prompt, [len(ids) for ids, _ in encoded] or [0], max_length)
        cut_at += [where] * cut
        ex = {"prompt": prompt, **{f: ids[:budget] for f, (ids, _) in zip(fields, encoded)}}
        ex.update({f"{f}_mask": mask[:budget] for f, (_, mask) in zip(fields, encoded) if mask})
        if "label" in row:
            ex["label"] = row["label"]
        examples.append(ex)
    if unfit:
        raise UserError(f"{unfit[0][0]}: --max_length {max_length} cannot hold one prompt token and the whole "
                        f"completion, EOS included ({len(unfit)} of {len(rows)} examples); use --max_length "
                        f"{max(need for _, need in unfit)} or more")
    if cut_at and rank() == 0:
        print(f"warning: {len(cut_at)} of {len(rows)} examples (the first at {cut_at[0]}) are longer than "
              f"--max_length {max_length} and were truncated, not dropped (prompt from the left first, then the "
              "completion); raise --max_length to keep them whole", file=sys.stderr)
    return examples


def collate(prompts, completions, pad_id, device, masks=None):
    """Left-pad prompts, right-pad completions, so every completion starts at the same column.
    `masks`: per row None or a 0/1 list over its completion; a 0 leaves that token unscored (label -100)."""
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)  # 0 for prompt-only batches
    input_ids = torch.full((len(prompts), P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(prompts), C), -100, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p): P + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, P - len(p): P + len(c)] = 1
        labels[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        if masks and masks[i] is not None:
            labels[i, : len(c)].masked_fill_(torch.tensor(masks[i]) == 0, -100)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    return {k: v.to(device) for k, v in batch.items()}


def collate_single(examples, pad_id, device):
    return collate([e["prompt"] for e in examples], [e["completion"] for e in examples], pad_id, device,
                   [e.get("completion_mask") for e in examples])


def collate_pairs(examples, pad_id, device):
    """Chosen rows, then rejected rows: one forward serves both halves."""
    prompts = [e["prompt"] for e in examples] * 2
    completions = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    return collate(prompts, completions, pad_id, device)


def collate_prompts(examples, pad_id, device):
    """Left-padded prompts for generation (a batch with empty completions)."""
    return collate([e["prompt"] for e in examples], [[] for _ in examples], pad_id, device)


# ---------------------------------------------------------------- padding-free (packed) forwards

PADDING_FREE = None  # --padding_free / --no-padding_free, set by setup(); None: packing_check decides per model


def pack(batch):
    """The packed layout of a collated batch, for a forward with no attention_mask.

    Each sequence's real tokens (prompt + completion) go whole into one row, first-fit by decreasing
    length, into rows of at most W tokens (W: the padded width): at most B rows of at most W tokens,
    so no activation and no (T x T) attention mask is larger than the padded batch's. position_ids
    restart at 0 at each sequence, which transformers reads as a sequence boundary (masking_utils.
    find_packed_sequence_indices); the filler ending a short row counts from 0 too and is never scored.
    Returns input_ids and position_ids (R, T), and index (B, W): where each padded position's token
    sits in the flattened rows, -1 on padding.
    """
    real = batch["attention_mask"].bool().cpu()
    B, W = real.shape
    lengths, starts = real.sum(-1).tolist(), real.int().argmax(-1).tolist()
    rows, free = [], []
    for b in sorted(range(B), key=lambda b: -lengths[b]):
        r = next((r for r, room in enumerate(free) if room >= lengths[b]), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(W)
        rows[r].append(b)
        free[r] -= lengths[b]
    T = W - min(free)
    source = torch.zeros(len(rows), T, dtype=torch.long)  # each packed token's index in the flattened padded batch
    position_ids = torch.zeros_like(source)
    filled = torch.zeros_like(source, dtype=torch.bool)
    for r, row in enumerate(rows):
        t = 0
        for b in row:
            source[r, t:t + lengths[b]] = b * W + starts[b] + torch.arange(lengths[b])
            position_ids[r, t:t + lengths[b]] = torch.arange(lengths[b])
            t += lengths[b]
        filled[r, :t] = True
        position_ids[r, t:] = torch.arange(T - t)
    index = torch.full((B * W,), -1, dtype=torch.long)
    index[source[filled]] = torch.arange(source.numel())[filled.flatten()]
    device = batch["input_ids"].device
    input_ids = batch["input_ids"].flatten()[source.to(device)].masked_fill(~filled.to(device), 0)  # filler: id 0
    return dict(input_ids=input_ids, position_ids=position_ids.to(device), index=index.view(B, W).to(device))


def unpack(outputs, index):
    """Per-position outputs of packed rows (R, T, ...) in the padded layout (B, W, ...), 0 on padding."""
    flat = outputs.flatten(0, 1)[index.clamp(min=0)]
    return flat.masked_fill((index < 0).view(*index.shape, *[1] * (flat.dim() - 2)), 0)


def forward_outputs(model, input_ids, attention_mask, position_ids):
    """A causal LM's logits, or what another model (rm.RewardModel) returns, per position."""
    from transformers import PreTrainedModel

    cache = {"use_cache": False} if isinstance(model, PreTrainedModel) else {}  # a cache turns packing off
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **cache)
    return getattr(out, "logits", out)


def position_outputs(model, batch):
    """forward_outputs in the padded layout (B, W, ...), from a packed forward when the model packs."""
    if not packs(model):
        return forward_outputs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    packed = pack(batch)
    return unpack(forward_outputs(model, packed["input_ids"], None, packed["position_ids"]), packed["index"])


def unwrapped_class(model):
    """The model's own class: fully_shard swaps in a subclass FSDP<Name>(FSDPModule, <Name>)."""
    return next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))


def packs(model):
    """Whether `model`'s forwards use the packed layout: as forced by --(no-)padding_free, else its packing_check."""
    if PADDING_FREE is not None:
        return PADDING_FREE
    if getattr(model, "padding_free", None) is None:
        model.padding_free = packing_check(model)
    return model.padding_free


@torch.no_grad()
def packing_check(model):
    """Once per model: do a few sequences (lengths 1 to 8) give the same outputs packed as padded? Only if its
    attention keeps packed sequences apart. If not, or for hub code, a one-line notice and False (padding)."""
    name = unwrapped_class(model).__name__
    if any(type(m).__module__.startswith("transformers_modules") for m in model.modules()):
        reason = "its code comes from the hub (--trust_remote_code)"
    else:
        vocab = next(m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding))
        ids = torch.randint(vocab, (24,), generator=torch.Generator().manual_seed(0)).tolist()
        prompts, completions = [ids[:5], ids[5:6], ids[6:8], ids[8:15]], [ids[15:18], ids[18:19], ids[19:24], []]
        batch = collate(prompts, completions, 0, next(model.parameters()).device)
        training = model.training
        model.eval()  # no dropout: both forwards must be deterministic
        try:
            padded = forward_outputs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            layout = pack(batch)
            packed = unpack(forward_outputs(model, layout["input_ids"], None, layout["position_ids"]), layout["index"])
        finally:
            model.train(training)
        real = batch["attention_mask"].bool()
        tolerance = 1e-4 if padded.dtype == torch.float32 else 3e-2  # relative to the outputs' scale
        padded, packed = padded[real].float(), packed[real].float()
        tolerance *= max(1.0, float(padded.abs().max()))
        gap = float((packed - padded).abs().max())
        if gap <= tolerance:
            return True
        reason = f"its outputs for packed sequences differ from padded ones by {gap:.2g}"
    if rank() == 0:
        print(f"padding-free: {name} pads its batches, as {reason}; --padding_free forces packing", file=sys.stderr)
    return False


def micro_batches(examples, step, args):
    """This rank's grad_accum micro-batches (lists of examples) for optimizer step `step` (counting from 0).

    A pure function of (step, seed): each epoch is a seeded shuffle, each step takes the next global
    batch and rank r takes the r-th contiguous slice of every micro-batch. So one process with
    batch_size B*W sees exactly what W processes with batch_size B see, and resuming needs no loader state.
    """
    W, R, B = world(), rank(), args.batch_size
    per_step = B * W * args.grad_accum
    steps_per_epoch = len(examples) // per_step
    if steps_per_epoch == 0:
        raise UserError(f"{args.data}: {len(examples)} examples is fewer than one global batch ({per_step} = "
                        "batch_size x grad_accum x ranks); lower --batch_size or --grad_accum, or add data")
    epoch, i = divmod(step, steps_per_epoch)
    order = list(range(len(examples)))
    random.Random(args.seed + epoch).shuffle(order)
    start = i * per_step
    return [[examples[j] for j in order[start + (m * W + R) * B: start + (m * W + R + 1) * B]]
            for m in range(args.grad_accum)]


# ---------------------------------------------------------------- logging

def heldout_chunks(examples, batch_size):
    """This rank's share of held-out examples in chunks of up to batch_size, the same number of chunks on
    every rank (FSDP runs every forward on all ranks): up to world - 1 examples are left out. A last chunk
    of one example joins the one before (KTO pairs each example with another)."""
    usable = examples[: len(examples) - len(examples) % world()]
    if not usable:
        raise UserError(f"{len(examples)} held-out examples for {world()} processes; add --eval_data examples")
    mine = usable[rank()::world()]
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] += chunks.pop()
    return chunks


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

