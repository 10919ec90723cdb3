"""LoRA (Hu et al. 2021) with peft: W' = W + (alpha/r) * B @ A on the frozen base's linear layers.

--lora_r > 0 trains only A (r x d_in, random) and B (d_out x r, zero at first, so that the first step's policy
is the base), in float32; the base stays frozen in the compute dtype (--dtype). The reference of DPO, LD-DPO,
KTO, PPO and GRPO is the policy with its adapter off (AdapterOff): the base, without a second copy in memory.
Under torchrun the base is sharded by FSDP2 as any frozen model; each layer's adapter weights are one more FSDP
group, of float32 parameters (fully_shard wants one dtype in a group).

A run saves peft's layout: adapter_config.json, adapter_model.safetensors and the tokenizer, which
peft.PeftModel.from_pretrained (and transformers' from_pretrained, with peft installed) loads onto the base;
--merge_lora saves the full model, W + (alpha/r) B@A, instead. A saved adapter given as --model is loaded as its
base with the adapter merged in (models.load_model), so LoRA DPO on a LoRA SFT adapter trains a new adapter on
base + SFT adapter, which is then its reference. peft is imported only when a run uses LoRA.
"""
import contextlib
import json
import os

import torch

from common import UserError

ADAPTER = "default"  # peft's name for a model's one adapter
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def config(r, alpha, dropout, targets, model):
    """peft's LoraConfig for --lora_r, --lora_alpha, --lora_dropout and --lora_target_modules on the base
    `model` (--model); None without --lora_r."""
    if not r:
        return None
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise UserError("--lora_r needs peft, which is not installed: pip install peft") from e
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=targets if targets == "all-linear" else targets.split(","),
                      base_model_name_or_path=os.path.abspath(model) if os.path.isdir(model) else model)


def add_adapter(model, lora_config, seed):
    """peft's LoRA layers injected into `model` in place, A drawn from `seed` (the same on every rank and number
    of ranks); their weights, float32, are the only ones trained. Sharded where the base is (see shard)."""
    from peft import inject_adapter_in_model
    from torch.distributed.tensor import DTensor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(lora_config, model, ADAPTER)
        except ValueError as e:  # no module matches --lora_target_modules
            raise UserError(f"--lora_target_modules: {str(e).splitlines()[0]}") from e
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "lora_A"):  # its adapter would be silently skipped, never trained
        raise UserError("--lora_target_modules: the LM head cannot take an adapter here, since the log-probs are "
                        "computed from its weight (logprobs.HeadLogps); leave it out, as all-linear does")
    model.requires_grad_(False)
    for _, layer in layers(model):
        for part in (layer.lora_A, layer.lora_B):
            part.float().requires_grad_(True)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        shard(model)
    return model


def shard(model):
    """One FSDP2 group per sharded module (each decoder layer, the root) of the adapter weights inside it, on the
    base's mesh. They stay float32 in the forward, as peft computes the adapter in its weights' dtype."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    owners = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    groups = {}
    for name, layer in layers(model):
        owner = max((o for o in owners if not o or name.startswith(o + ".")), key=len)
        groups.setdefault(owner, []).extend([layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]])
    mesh = next(p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh"))
    for group in groups.values():
        fully_shard(group, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32,
                                                                     reduce_dtype=torch.float32))


def layers(model):
    """(name, module) of each peft LoRA layer in `model`."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A")]


def has_adapter(model):
    return hasattr(model, "peft_config")  # set by peft's inject_adapter_in_model


class AdapterOff:
    """The policy with its adapter off, i.e. the frozen base: the reference model. Called like a model (without
    grad); every attribute is the policy's."""

    def __init__(self, model):
        vars(self)["model"] = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __setattr__(self, name, value):
        setattr(self.model, name, value)

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), disabled(self.model):
            return self.model(*args, **kwargs)


@contextlib.contextmanager
def disabled(model):
    """peft's layers off. Not peft's enable_adapters(False): it also clears requires_grad, which FSDP2 reads
    once, at the first forward (the reference's, with --precompute_ref or --eval_data). So this sets the private
    flag behind the disable_adapters property each layer's forward reads; a peft that renames it fails
    test_reference_is_the_base_and_both_saves_load_back (the adapter off must give the base's log-probs)."""
    found = [layer for _, layer in layers(model)]
    for layer in found:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in found:
            layer._disable_adapters = False


def weights_name(model, merge=False):
    """What a model's weights files are called: adapter_model for an adapter saved alone, as peft names it."""
    return WEIGHTS.removesuffix(".safetensors") if has_adapter(model) and not merge else "model"


def is_adapter(path):
    """Whether `path` is a saved adapter (peft's layout) rather than a model."""
    return os.path.isfile(os.path.join(path, CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


def read_config(path):
    """A saved adapter's adapter_config.json, refused unless a plain LoRA this module can merge."""
    with open(os.path.join(path, CONFIG)) as f:
        saved = json.load(f)
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out")
                   if saved.get(k)]
    if saved.get("peft_type") != "LORA" or unsupported:
        raise UserError(f"{path}/{CONFIG}: only plain LoRA adapters load here, not peft_type "
                        f"{saved.get('peft_type')} with {', '.join(unsupported) or 'no options'}; merge it into its "
                        "base with peft's merge_and_unload and pass that directory")
    if not saved.get("base_model_name_or_path"):
        raise UserError(f"{path}/{CONFIG} names no base_model_name_or_path; set it to the base model's directory")
    return saved


def base_of(path):
    """The model a saved adapter adapts, itself a model or another adapter."""
    return read_config(path)["base_model_name_or_path"]


def base_model_path(path):
    """`path`, or where a chain of adapters starts: the model directory or hub id at its root."""
    while os.path.isdir(path) and is_adapter(path):
        path = base_of(path)
    return path


def like(delta, weight):
    """A full tensor as `weight` holds it: the same device, and this rank's shard where `weight` is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    delta = delta.to(weight.device)
    if isinstance(weight, DTensor):
        return distribute_tensor(delta, weight.device_mesh, weight.placements, src_data_rank=None)
    return delta


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@torch.no_grad()
def merge(model, path):
    """Add the adapter saved in `path`, (alpha/r) B@A, to the weights of `model` it adapts, in float32 before
    rounding to their dtype. Its names may carry the model's base_model_prefix or lack it (AutoModel)."""
    from safetensors.torch import load_file

    saved = read_config(path)
    scale = saved["lora_alpha"] / (saved["r"] ** 0.5 if saved.get("use_rslora") else saved["r"])
    state, modules = load_file(os.path.join(path, WEIGHTS)), dict(model.named_modules())
    prefix = model.base_model_prefix + "."
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        found = [n for n in (name, prefix + name, name.removeprefix(prefix)) if n in modules]
        if not found:
            raise UserError(f"{path}: the adapter adapts {name}, which {type(model).__name__} does not have")
        weight = modules[found[0]].weight
        delta = scale * state[key.replace(".lora_A.", ".lora_B.")].float() @ state[key].float()
        weight.copy_((weight.float() + like(delta, weight)).to(weight.dtype))
    return model


def saved_state(model, state, merge=False):
    """What a model's state dict is saved as: itself; with an adapter, the adapter alone under peft's names, or
    with `merge` the merged model (then every rank must call this)."""
    if not has_adapter(model):
        return state
    return merged_state(model, state) if merge else adapter_state(state)


def adapter_state(state):
    """The adapter's entries of a model's state dict, under the names peft saves them with."""
    return {"base_model.model." + k.replace(f".{ADAPTER}.", "."): v for k, v in state.items() if ".lora_" in k}


@torch.no_grad()
def merged_state(model, state):
    """A model's state dict with each adapted weight W + (alpha/r) B@A (float32) under W's own name, no adapter
    (every rank must call this: each gathers the full A and B)."""
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for name, layer in layers(model):
        a, b = (full(getattr(layer, part)[ADAPTER].weight).float() for part in ("lora_A", "lora_B"))
        weight = merged[name + ".weight"]
        merged[name + ".weight"] = weight.float() + like(layer.scaling[ADAPTER] * b @ a, weight)
    return merged
