"""Checkpoints: the final Hugging Face save, and the resumable state around a training loop (--resume,
--save_every, SIGTERM, the NaN guard).

Every rank writes only its own shards, in parallel, with torch.distributed.checkpoint (DCP) and its
Hugging Face storage writer; nothing is gathered on one rank. output_dir/checkpoint-N holds

    config.json, generation_config.json, tokenizer files      as the final model has them
    model.safetensors, or model-0000k-of-0000W.safetensors     the model, which from_pretrained loads:
        and model.safetensors.index.json                       under W ranks, rank k-1 rebuilds file k
                                                               from all the shards, a tensor at a time
    (with LoRA: adapter_config.json, adapter_model*.safetensors   the adapter alone, in peft's layout)
    NAME.safetensors (or NAME-0000k-of-0000W...)               each extra module (rm's value head, ppo's value model)
    NAME/shard-0000r-model-00001-of-00001.safetensors          each optimizer's state: rank r-1's shards
    trainer_state.json                                         step, flags, world size, schedules, optimizer settings
    rng-RANK.json                                              each rank's RNG states

The final model (save_model) is written the same way, in save_pretrained's files: one model.safetensors
up to 50 GB, rebuilt by rank 0 from the shards.

Nothing is pickled: tensors are safetensors, whose headers and DCP's offsets in them are JSON, and DCP's
HF reader builds its metadata from those headers, so a checkpoint someone hands you cannot run code.
That reader also cuts each rank's shard out of whatever files hold it, so a run may resume on another
number of ranks when the global batch (batch_size x grad_accum x ranks) is the same.
"""
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint._consolidate_hf_safetensors import _consolidate_safetensors_files
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

from batching import micro_batches
import lora
from common import UserError, all_sum, barrier, rank, unwrapped_class, world

# DCP says so at every save and load of a run without torchrun; one process is a supported setup here
warnings.filterwarnings("ignore", "torch.distributed is (disabled, )?unavailable or uninitialized", UserWarning)


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def fsync_dir(path, files=True):
    """fsync the files in `path` (if `files`), then `path` itself: a rename after this is durable."""
    for p in [os.path.join(path, n) for n in os.listdir(path) if files] + [path]:
        fsync(p)


def weights(module, merge=False):
    """This rank's part of `module`'s state dict (its DTensor shards under FSDP2), with the keys save_pretrained
    writes: a tied weight (tie_word_embeddings) once, under the name transformers keeps. With a LoRA adapter: the
    adapter alone, under peft's names, or (merge) the model with the adapter merged into its weights."""
    from transformers import PreTrainedModel
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = get_model_state_dict(module)
    if isinstance(module, PreTrainedModel):  # ties are the same Parameter under two names; shards never are
        stand_in = {}
        named = {k: stand_in.setdefault(id(p), torch.empty(1)) for k, p in module.state_dict(keep_vars=True).items()}
        state = {k: state[k] for k in remove_tied_weights_from_state_dict(named, module)}
    return lora.saved_state(module, state, merge)


def file_names(state, name, n):
    """Key -> file: the keys in order, cut into n files of about equal bytes (NAME.safetensors if one)."""
    n = max(1, min(n, len(state)))
    sizes = [t.numel() * t.element_size() for t in state.values()]  # a DTensor's numel is the full tensor's
    total, done, files = max(sum(sizes), 1), 0, {}
    for key, size in zip(state, sizes):
        k = min(n - 1, (done + size // 2) * n // total)
        files[key] = f"{name}.safetensors" if n == 1 else f"{name}-{k + 1:05d}-of-{n:05d}.safetensors"
        done += size
    return files


def check_shared(shards):
    """UserError on every rank at once unless each rank sees every shard file the ranks wrote in `shards`: a
    file rebuilt from shards a rank cannot see (an --output_dir on a node's own disk) holds zeros, silently."""
    if world() == 1:
        return
    seen = [None] * world()
    dist.all_gather_object(seen, {n for n in os.listdir(shards) if n.endswith(".safetensors")})
    written = set().union(*seen)  # every rank sees its own files; all ranks hold the same lists, so all agree
    for r, files in enumerate(seen):
        if files != written:
            raise UserError(f"rank {r} cannot see {min(written - files)} ({len(written) - len(files)} of the "
                            f"{len(written)} shard files the ranks wrote to {shards}): --output_dir must be on a "
                            "filesystem that every node shares, not a node-local disk")


def write_weights(state, directory, name, per_rank, dtype=None):
    """The full weights of `state` (weights(module)) as directory/NAME*.safetensors (every rank must call this):
    one file per rank (per_rank: a checkpoint, written in parallel) or save_pretrained's files of at most 50 GB.
    Each rank writes its shards with DCP, then rebuilds its files from everybody's shards, one full tensor in
    memory at a time; the shards are then deleted. `dtype`: cast floating-point weights to it."""
    shards = os.path.join(directory, f"{name}.shards")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    writer = HuggingFaceStorageWriter(shards, save_distributed=True)
    writer.sync_files = False  # deleted once rebuilt, likely before they reach the disk: the rebuilt files are fsynced
    dcp.save(state, storage_writer=writer)
    check_shared(shards)
    total = sum(t.numel() * t.element_size() for t in state.values())
    files = file_names(state, name, world() if per_rank else math.ceil(total / 50e9))
    names = sorted(set(files.values()))
    mine = names[rank()::world()]
    if mine:
        _consolidate_safetensors_files(shards, directory, {k: f for k, f in files.items() if f in mine}, 1)
        for file in mine:
            fsync(os.path.join(directory, file))
    if rank() == 0 and len(names) > 1:
        with open(os.path.join(directory, f"{name}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": files}, f, indent=2)
    barrier()
    if rank() == 0:
        shutil.rmtree(shards)


def weights_reader(directory, name):
    """DCP's reader of NAME*.safetensors in `directory`: safetensors headers and slices, no pickle, no torch.load."""
    reader = HuggingFaceStorageReader(directory)
    pattern, ls = re.compile(rf"{re.escape(name)}(-\d{{5}}-of-\d{{5}})?\.safetensors"), reader.fs.ls
    reader.fs.ls = lambda path: [p for p in ls(path) if pattern.fullmatch(os.path.basename(p))]  # NAME's files only
    return reader


def read_weights(module, directory, name):
    """Load NAME*.safetensors from `directory` into `module` in place: each rank reads just its shard."""
    dcp.load(weights(module), storage_reader=weights_reader(directory, name))


def read_pretrained(model, directory):
    """Fill a sharded model from a Hugging Face directory's model*.safetensors, each rank reading only its shards
    (cast to the parameters' dtype). The files may name tensors as the model does, or with its base model's prefix
    added or removed (AutoModel from a causal LM's files). False, with nothing read, if they name them otherwise."""
    reader = weights_reader(directory, "model")
    try:
        stored = reader.read_metadata().state_dict_metadata
    except (FileNotFoundError, ValueError):  # no safetensors: from_pretrained decides (--allow_pickle)
        return False
    state, prefix = weights(model), model.base_model_prefix + "."
    for rename in (lambda k: k, lambda k: prefix + k, lambda k: k.removeprefix(prefix)):
        if all(rename(k) in stored for k in state):
            for key, tensor in state.items():  # every rank sees the same shapes: all stop, or none
                if list(stored[rename(key)].size) != list(tensor.shape):
                    raise UserError(f"{directory}: {rename(key)} is stored as {list(stored[rename(key)].size)}, "
                                    f"but its config.json makes it {list(tensor.shape)}; the files do not match it")
            dcp.load({rename(k): v for k, v in state.items()}, storage_reader=reader)
            return True
    return False


def write_pretrained(model, tokenizer, directory, per_rank, dtype=None, merge=False, **modules):
    """config, generation config and tokenizer (rank 0), the weights of `model` and of each of `modules`
    as NAME.safetensors (every rank) into `directory`, in `dtype` (default: the parameters'); see write_weights
    for `per_rank`. A LoRA model writes its adapter (peft's files), or with `merge` the merged model."""
    if rank() == 0:
        os.makedirs(directory, exist_ok=True)
        tokenizer.save_pretrained(directory)
    if rank() == 0 and lora.weights_name(model, merge) != "model":
        model.peft_config[lora.ADAPTER].save_pretrained(directory)
    elif rank() == 0:
        model.config.architectures = [unwrapped_class(model).__name__]
        model.config.dtype = str(dtype or model.dtype).split(".")[1]  # as save_pretrained does
        model.config.save_pretrained(directory)
        if model.can_generate():
            model.generation_config.save_pretrained(directory)
    write_weights(weights(model, merge), directory, lora.weights_name(model, merge), per_rank, dtype)
    for name, module in modules.items():
        write_weights(weights(module), directory, name, per_rank, dtype)


def save_model(model, tokenizer, out_dir, dtype=None, merge=False, **modules):
    """A HF directory (config, weights in `dtype`, tokenizer) that never looks complete half-written (every rank
    must call this). `modules` are saved beside the model as NAME.safetensors (e.g. rm.py's value head). A LoRA
    model saves its adapter in peft's layout, or with `merge` (--merge_lora) the full merged model.

    Files go to `out_dir.tmp`, are fsynced, then moved in weights last, after any old weights are removed:
    a crash mid-save leaves no weights, so loading fails loudly instead of mixing old and new.
    """
    tmp = out_dir.rstrip("/") + ".tmp"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    write_pretrained(model, tokenizer, tmp, False, dtype, merge, **modules)
    if rank() == 0:
        fsync_dir(tmp)
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):
            if name.endswith((".safetensors", ".safetensors.index.json")) or name in ("config.json", lora.CONFIG):
                os.remove(os.path.join(out_dir, name))
        for name in sorted(os.listdir(tmp), key=lambda n: n.endswith(".safetensors")):  # weights last
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        os.rmdir(tmp)
    barrier()


class TrainState:
    """Checkpoints around one training loop: --resume, --save_every, SIGTERM and the NaN guard.

    `extra` names more to save and restore: modules (saved like the model, as NAME.safetensors), optimizers
    (of the model or of those modules), anything else with a JSON-able state_dict() (schedulers).
    """

    def __init__(self, args, tokenizer, examples, model, optimizer, scheduler, grad_accum=None, **extra):
        micro_batches(examples, 0, args, grad_accum)  # too little data fails now, before anything is written
        self.args, self.tokenizer, self.model, self.stop = args, tokenizer, model, False
        self.grad_accum = grad_accum or args.grad_accum  # with batch_size and ranks, it fixes the data order
        self.parts = {"optimizer": optimizer, "scheduler": scheduler, **extra}
        self.modules = {n: p for n, p in self.parts.items() if isinstance(p, torch.nn.Module)}
        self.owner = torch.nn.ModuleDict({"model": model, **self.modules})  # names every optimized parameter

    def checkpoints(self):
        """This run's checkpoints in --output_dir, oldest first (a half-written one ends in .tmp)."""
        out = self.args.output_dir
        steps = sorted(int(n.split("-")[1]) for n in (os.listdir(out) if os.path.isdir(out) else [])
                       if re.fullmatch(r"checkpoint-\d+", n) and os.path.exists(f"{out}/{n}/trainer_state.json"))
        return [os.path.join(out, f"checkpoint-{s}") for s in steps]

    def resume(self):
        """Restore the latest checkpoint under --resume; return the last step done (0: start afresh)."""
        args, found = self.args, self.checkpoints()
        if found and not args.resume:
            if not args.overwrite_output_dir:
                raise UserError(f"{found[-1]} exists: pass --resume to continue that run, --overwrite_output_dir to "
                                "start afresh, or use another --output_dir")
            if rank() == 0:  # a fresh run: the old run's checkpoints must never be resumed or rotated with its own
                for old in found:
                    shutil.rmtree(old)
            barrier()
            found = []
        self.previous_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop", True))
        if not found:
            if args.resume and rank() == 0:
                print(f"--resume: no checkpoint in {args.output_dir}; starting from step 0", file=sys.stderr)
            return 0
        path = found[-1]
        with open(f"{path}/trainer_state.json") as f:
            saved = json.load(f)
        self.check(path, saved["args"])
        for name, module in {lora.weights_name(self.model): self.model, **self.modules}.items():
            read_weights(module, path, name)
        for name, part in self.parts.items():
            if isinstance(part, torch.optim.Optimizer):
                state = get_optimizer_state_dict(self.owner, part)["state"]  # allocated here, sharded like the params
                dcp.load(state, storage_reader=HuggingFaceStorageReader(f"{path}/{name}"))
                set_optimizer_state_dict(self.owner, part, {"state": state, "param_groups": saved["state"][name]})
            elif not isinstance(part, torch.nn.Module):
                part.load_state_dict(saved["state"][name])
        if saved["args"]["world_size"] == world():
            with open(f"{path}/rng-{rank()}.json") as f:
                rng = json.load(f)
            random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
            torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
            if rng["cuda"] is not None and torch.cuda.is_available():  # None: written on CPU; setup seeded CUDA
                torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
        else:  # no saved stream belongs to this rank: a new one, a function of (seed, step, rank)
            random.seed(f"{args.seed}-{saved['step']}-{rank()}")
            torch.manual_seed(random.getrandbits(63))
        if rank() == 0:
            print(f"resuming from {path}", file=sys.stderr)
        return saved["step"]

    def check(self, path, saved):
        """Refuse a checkpoint of another layout, or a change of the seed or the global batch: with the step,
        they fix the data order."""
        for name, part in self.parts.items():
            if isinstance(part, torch.optim.Optimizer) and not os.path.isdir(f"{path}/{name}"):
                raise UserError(f"{path} has no {name}/ folder of optimizer shards (an older layout?); resume it with "
                                "the version that wrote it, or start afresh in another --output_dir")
        if saved["seed"] != self.args.seed:
            raise UserError(f"{path} was written with seed={saved['seed']}, this run has seed={self.args.seed}; "
                            "resume with the same value")
        then = (saved["batch_size"], saved["grad_accum"], saved["world_size"])
        now = (self.args.batch_size, self.grad_accum, world())
        if math.prod(then) != math.prod(now):
            raise UserError(f"{path} was written with a global batch of {math.prod(then)} (batch_size x grad_accum x "
                            f"ranks = {' x '.join(map(str, then))}), this run has {' x '.join(map(str, now))} = "
                            f"{math.prod(now)}; resume with the same global batch")

    def end_step(self, step, **values):
        """Call last in each step: stop on a NaN/inf value, checkpoint every --save_every steps or on SIGTERM."""
        *totals, stop = all_sum([float(v) for v in values.values()] + [self.stop], next(self.model.parameters()).device)
        for name, total in zip(values, totals):
            if not math.isfinite(total):
                signal.signal(signal.SIGTERM, self.previous_handler)
                last = (self.checkpoints() or ["none (see --save_every)"])[-1]
                raise UserError(f"step {step}: {name} is {total}; stopped without saving (the last good "
                                f"checkpoint is {last}). Lower --lr or check the data")
        if stop or (self.args.save_every and step % self.args.save_every == 0):
            self.save(step)
        if stop or step == self.args.max_steps:
            signal.signal(signal.SIGTERM, self.previous_handler)
        if stop:
            if rank() == 0:
                tqdm.write(f"SIGTERM: saved checkpoint-{step} in {self.args.output_dir}; run again with --resume to "
                           "continue", file=sys.stderr)
            sys.exit(0)

    def save(self, step):
        """Write checkpoint-{step}.tmp, fsync, rename it to checkpoint-{step}; then drop the oldest beyond the limit."""
        final = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        tmp = final + ".tmp"
        saved = {"step": step, "args": {**vars(self.args), "grad_accum": self.grad_accum, "world_size": world()},
                 "state": {}}
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        barrier()
        write_pretrained(self.model, self.tokenizer, tmp, True, **self.modules)
        for name, part in self.parts.items():
            if isinstance(part, torch.optim.Optimizer):  # each rank its own shards of the moments
                state = get_optimizer_state_dict(self.owner, part)
                writer = HuggingFaceStorageWriter(f"{tmp}/{name}", save_distributed=True)
                dcp.save(state["state"], storage_writer=writer)
                saved["state"][name] = state["param_groups"]
            elif not isinstance(part, torch.nn.Module):
                saved["state"][name] = part.state_dict()
        if rank() == 0:
            with open(f"{tmp}/trainer_state.json", "w") as f:
                json.dump(saved, f)
        with open(f"{tmp}/rng-{rank()}.json", "w") as f:
            json.dump({"python": random.getstate(), "torch": torch.get_rng_state().tolist(),
                       "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}, f)
        fsync(f"{tmp}/rng-{rank()}.json")
        barrier()
        if rank() == 0:
            fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            fsync_dir(self.args.output_dir, files=False)
            for old in self.checkpoints()[:-self.args.save_total_limit]:
                os.rename(old, old + ".tmp")  # never a half-deleted checkpoint under a checkpoint's name
                shutil.rmtree(old + ".tmp")
        barrier()
