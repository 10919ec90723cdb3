"""What every script needs and none of them is about: log-probs, data, models, FSDP2 (checkpoints: checkpoint.py).

Batch layout (all collators): each row is [left padding | prompt | completion | right padding],
with every completion starting at the same column P. `labels` holds only the completion
columns: labels[:, j] is token P + j, or -100 on padding. So the model projects to the
vocabulary only at the C + 1 positions that score a completion token, never on the prompt.
"""
import argparse
import json
import math
import os
import random
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

def base_parser(doc, data, model=TINY_MODEL_DIR, lr=1e-3, max_steps=1000, batch_size=16, output_dir="out/run"):
    """The flags every script shares; each script adds its own and picks its defaults."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model, help="HF model directory or hub id (default: %(default)s)")
    p.add_argument("--data", default=data, help="JSONL training file (default: the bundled toy task)")
    p.add_argument("--output_dir", default=output_dir, help="where the checkpoint and metrics.jsonl go")
    p.add_argument("--max_steps", type=int, default=max_steps, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=batch_size, help="examples per device per micro-batch")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (the default suits the toy model)")
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="linear warmup share of max_steps, then cosine")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 turns it off)")
    p.add_argument("--max_length", type=int, default=512, help="prompt+completion tokens; see truncate()")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--eval_every", type=int, default=0, help="toy-task eval every N steps (0: start and end only)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output_dir")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only on SIGTERM)")
    p.add_argument("--save_total_limit", type=int, default=2, help="keep the last N checkpoints")
    p.add_argument("--allow_pickle", action="store_true", help="accept a --model with only .bin (pickle) weights")
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
    for name in ("max_steps", "batch_size", "grad_accum", "max_length", "lr", "log_every", "save_total_limit"):
        check_range(args, name, above=0)
    for name in ("weight_decay", "max_grad_norm", "eval_every", "save_every"):
        check_range(args, name, low=0)
    check_range(args, "warmup_ratio", low=0, high=1)


# ---------------------------------------------------------------- distributed

def setup(args):
    """Init torch.distributed under torchrun (nccl on CUDA, gloo on CPU); return the device."""
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
    return model.to(device)


def load_policy(args, device):
    model = load_model(args.model, device, args.dtype, args.trust_remote_code, allow_pickle=args.allow_pickle)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return tokenizer, model


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
    """Per-token log-probs (B, C) of the completion columns, 0.0 on padding.

    For this one forward the LM head scores the labels itself (HeadLogps) instead of returning
    logits: it projects only the positions that predict a completion token (no prompt, no
    padding), and its float32 logits stay within HeadLogps' memory budget, forward and backward.
    """
    labels = batch["labels"]
    mask = labels != -100
    head = model.get_output_embeddings()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], logits_to_keep=labels.shape[1] + 1, use_cache=False)
    scored = []

    def score(hidden):  # (B, C + 1, H): position P-1+j predicts completion token j, the last one nothing
        scored.append(HeadLogps.apply(hidden[:, :-1][mask], head.weight, head.bias, labels[mask], temperature))
        return scored[-1]

    own_forward = vars(head).pop("forward", None)  # an instance attribute shadows the class's forward
    head.forward = score
    try:
        out = model(**inputs)
    finally:
        del head.forward
        if own_forward is not None:
            head.forward = own_forward
    if not scored or out.logits is not scored[-1]:  # the model changes its head's output (Gemma-2's soft-capping)
        logits = model(**inputs).logits[:, :-1]
        return gather_logps(logits / temperature if temperature != 1.0 else logits, labels)
    return torch.zeros(labels.shape, dtype=out.logits.dtype, device=labels.device).masked_scatter(mask, out.logits)


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
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
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


def encode_prompt(tokenizer, prompt):
    """A plain prompt as the tokenizer encodes text (with BOS if it adds one); messages via the chat template."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def encode_completion(tokenizer, prompt, completion):
    """Completion ids ending in exactly one EOS. Messages: the assistant turn as the chat template renders it."""
    if isinstance(completion, list):
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(head):
            raise UserError("the chat template renders the prompt differently inside the full conversation")
        ids = tokenizer(full[len(head):], add_special_tokens=False).input_ids
    else:
        ids = tokenizer(completion, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    if eos in ids:  # the template closed the turn with EOS: end there
        return ids[: len(ids) - ids[::-1].index(eos)]
    return ids + [eos]


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
    """Tokenize each row into {"prompt": ids, field: ids for field in fields, "label"?}.

    `fields` are the completion fields: ("completion",), ("chosen", "rejected"), or () for prompts.
    The prompt is tokenized once and shared by a pair's two completions.
    """
    examples, cut_at = [], []
    for row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"])
        completions = [encode_completion(tokenizer, row["prompt"], row[f]) for f in fields]
        prompt, budget, cut = truncate(prompt, [len(c) for c in completions] or [0], max_length)
        cut_at += [row.get("_where", "?")] * cut
        ex = {"prompt": prompt, **{f: c[:budget] for f, c in zip(fields, completions)}}
        if "label" in row:
            ex["label"] = row["label"]
        examples.append(ex)
    if cut_at and rank() == 0:
        print(f"warning: {len(cut_at)} of {len(rows)} examples (the first at {cut_at[0]}) are longer than "
              f"--max_length {max_length} and were truncated, not dropped (prompt from the left first, then the "
              "completion); raise --max_length to keep them whole", file=sys.stderr)
    return examples


def collate(prompts, completions, pad_id, device):
    """Left-pad prompts, right-pad completions, so every completion starts at the same column."""
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)  # 0 for prompt-only batches
    input_ids = torch.full((len(prompts), P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(prompts), C), -100, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p): P + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, P - len(p): P + len(c)] = 1
        labels[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    return {k: v.to(device) for k, v in batch.items()}


def collate_single(examples, pad_id, device):
    return collate([e["prompt"] for e in examples], [e["completion"] for e in examples], pad_id, device)


def collate_pairs(examples, pad_id, device):
    """Chosen rows, then rejected rows: one forward serves both halves."""
    prompts = [e["prompt"] for e in examples] * 2
    completions = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    return collate(prompts, completions, pad_id, device)


def collate_prompts(examples, pad_id, device):
    """Left-padded prompts for generation (a batch with empty completions)."""
    return collate([e["prompt"] for e in examples], [[] for _ in examples], pad_id, device)


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

class Logger:
    """metrics.jsonl, a tqdm bar and a tokens/s counter; writes on rank 0 only, creating output_dir then.
    A run resumed after step `start` keeps the file's rows up to `start` and appends to them."""

    def __init__(self, args, start=0):
        self.path, self.start = os.path.join(args.output_dir, "metrics.jsonl"), start
        self.bar = tqdm(total=args.max_steps, initial=start, disable=rank() != 0, dynamic_ncols=True)
        self.file, self.tokens, self.t0 = None, 0, time.perf_counter()

    def count(self, batch):
        self.tokens += int(batch["attention_mask"].sum())

    def tokens_per_second(self, device):
        """Tokens (all ranks, padding excluded) per second since the last call."""
        (tokens,) = all_sum([self.tokens], device)
        now = time.perf_counter()
        rate, self.tokens, self.t0 = tokens / max(now - self.t0, 1e-9), 0, now
        return rate

    def log(self, step, metrics):
        if rank() != 0:
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
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "tokens/s", "eval/gold_score")}
        self.bar.set_postfix(shown, refresh=False)

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()
