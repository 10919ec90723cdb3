"""A --model -> a model ready to train or score: loading (safetensors, dropout off), the precision rule
(trained weights float32, compute in --dtype) and the FSDP2 wrap, with sharded loading under torchrun; with
--lora_r, a LoRA adapter on the frozen base (lora.py)."""
import contextlib
import functools
import os
import socket

import torch
import torch.distributed as dist

import lora
from common import UserError, barrier, rank, resolve_dtype, world


def load_policy(args, device):
    """The tokenizer and the trained model of --model (load_trained)."""
    model = load_trained(args, device)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return tokenizer, model


def load_trained(args, device, auto_class=None):
    """--model to train: float32 weights computing in --dtype, or with --lora_r the frozen base in --dtype and a
    float32 LoRA adapter, the only weights trained (lora.py)."""
    adapter = lora.config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules, args.model)
    model = load_model(args.model, device, args.dtype, args.trust_remote_code, auto_class, args.allow_pickle,
                       trained=adapter is None, padding_free=args.padding_free,
                       attn_implementation=args.attn_implementation)
    return model if adapter is None else lora.add_adapter(model, adapter, args.seed)


def load_reference(args, device, path=None, policy=None):
    """The frozen reference model: `path` (default --model) in the compute dtype; without `path`, a LoRA
    `policy` with its adapter off (the base it adapts, no second copy)."""
    if path is None and policy is not None and lora.has_adapter(policy):
        return lora.AdapterOff(policy)
    return frozen(load_model(path or args.model, device, args.dtype, args.trust_remote_code,
                             allow_pickle=args.allow_pickle, padding_free=args.padding_free,
                             attn_implementation=args.attn_implementation))


def frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model


def load_model(path, device, dtype="auto", trust_remote_code=False, auto_class=None, allow_pickle=False,
               trained=False, padding_free=None, attn_implementation=None):
    """A model ready to run, safetensors unless allow_pickle; `auto_class` replaces AutoModelForCausalLM.
    `padding_free` (True, False, or None: a start-up check decides) picks its forwards' layout (logprobs.packs);
    `attn_implementation` (None: transformers' choice, with sdpa as packed_sdpa) its attention (sdpa,
    flash_attention_2, eager, ...).

    A `trained` model keeps float32 parameters (the master weights the optimizer updates) and computes in the
    compute dtype `dtype`; a frozen one is held in the compute dtype. Where FSDP2 is needed (under torchrun, or
    float32 parameters computing in bf16), the model is built without weights, sharded, and each rank then reads
    only its shards from the files (load_sharded). A saved LoRA adapter is loaded as its base with it merged in."""
    from transformers import AutoModelForCausalLM

    check_model_path(path, allow_pickle)
    if lora.is_adapter(path):
        return lora.merge(load_model(lora.base_of(path), device, dtype, trust_remote_code, auto_class, allow_pickle,
                                     trained, padding_free, attn_implementation), path)
    auto_class, compute = auto_class or AutoModelForCausalLM, resolve_dtype(dtype, device)
    params = torch.float32 if trained else compute
    if world() == 1 and params == compute:
        model = pretrained(path, auto_class, params, trust_remote_code, allow_pickle).to(device)
    else:
        model = load_sharded(path, auto_class, device, params, compute, trust_remote_code, allow_pickle)
    model.padding_free = padding_free
    register_packed_sdpa()
    chunked = getattr(model.config, "attention_chunk_size", None) is not None  # Llama 4: chunks live in its masks
    if attn_implementation is None and model.config._attn_implementation == "sdpa" and not chunked:
        attn_implementation = PACKED_SDPA  # the same attention, cheaper on packed rows
    if attn_implementation is not None:
        try:
            model.set_attn_implementation(attn_implementation)
        except (ImportError, ValueError) as e:
            raise UserError(f"--attn_implementation {attn_implementation}: {str(e).splitlines()[0]}") from e
    return disable_dropout(model)


PACKED_SDPA = "packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, sequence_bounds=None, sliding_window=None, **kwargs):
    """transformers' sdpa, except on rows without a mask or a cache (packed rows: batching.pack's one row, its
    sequences' boundaries `sequence_bounds`, ints): there it runs causal attention one sequence at a time,
    so a packed row builds no (T x T) block mask and a sequence of L tokens costs L^2 / 2, as padded. A
    sliding window masks only the sequences longer than it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    T, causal = query.shape[2], kwargs.get("is_causal", getattr(module, "is_causal", True))
    if attention_mask is not None or key.shape[2] != T or not causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, sliding_window=sliding_window,
                                      **kwargs)
    bounds = sequence_bounds or (0, T)
    outputs = []
    for start, end in zip(bounds, bounds[1:]):
        mask = None
        if sliding_window is not None and end - start > sliding_window:
            position = torch.arange(end - start, device=query.device)
            back = position[:, None] - position  # how far back each query looks
            mask = ((back >= 0) & (back < sliding_window))[None, None]
        outputs.append(sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                              value[:, :, start:end], mask, **kwargs)[0])
    return torch.cat(outputs, dim=1), None


def packed_sdpa_mask(attention_mask=None, q_length=None, kv_length=None, q_offset=0, **kwargs):
    """packed_sdpa's masks: none where it splits the rows itself (no padding mask, no cache), else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and q_offset == 0:
        return None
    return sdpa_mask(attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     **kwargs)


def register_packed_sdpa():
    """Make PACKED_SDPA an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


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


@contextlib.contextmanager
def unsharded(model):
    """An FSDP2 model's parameters gathered once for the block (a rollout) and resharded after: generate() would
    otherwise all-gather every layer and free it again at every decoded token. A model not sharded passes through."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_reshard_after_forward(False)  # the first forward gathers each layer; they stay gathered
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root keeps its own, as FSDP2 sets it
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def save_dtype(args):
    """--save_dtype, where auto is the dtype --model's config says its weights are stored in (float32 if unset)."""
    if args.save_dtype != "auto":
        return getattr(torch, args.save_dtype)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(lora.base_model_path(args.model), trust_remote_code=args.trust_remote_code)
    stored = config.dtype
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


def check_model_path(path, allow_pickle=False):
    """Refuse missing, non-model or pickle-only directories clearly; a hub id must be reachable."""
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
            raise UserError(f"{path}: no such model directory (expected a local HF directory or a hub id)")
        check_hub_reachable(path)
        return
    files = os.listdir(path)
    if "config.json" not in files and not lora.is_adapter(path):
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

    if lora.is_adapter(path) and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        path = lora.base_model_path(path)  # an adapter saved without its tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from e
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer at {path} has no EOS token; set one in its tokenizer_config.json")
    if tokenizer.pad_token is None:  # masks never rely on pad != eos, so eos is a safe pad
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
