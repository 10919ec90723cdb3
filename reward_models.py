"""The reward model shared by rm.py (which trains it), ppo.py (its value model starts from one) and the scripts
that score responses with one (--reward_model): a scalar head on a decoder backbone, its loading and saving.

On disk: the backbone (no LM head) as a Hugging Face directory that AutoModel loads, and the head as
`value_head.safetensors` beside it; rm.py's --save_every checkpoints (output_dir/checkpoint-N) use the same layout.
"""
import os

import torch

import checkpoint
import common
import lora
import models

HEAD_FILE = "value_head.safetensors"


class RewardModel(torch.nn.Module):
    """A decoder backbone (AutoModel: no LM head) and a linear head giving one scalar per position."""

    def __init__(self, backbone, dtype=None):
        super().__init__()
        self.backbone = backbone
        self.value_head = torch.nn.Linear(backbone.config.hidden_size, 1, bias=False,
                                          device=backbone.device, dtype=dtype or backbone.dtype)
        self._no_split_modules = backbone._no_split_modules  # models.shard_model shards these layers

    def forward(self, input_ids, attention_mask, position_ids, **varlen):
        """(B, T) float32 values: the head applied to the hidden state at every position. `varlen`: a packed
        row's sequence boundaries (batching.pack)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False, **varlen).last_hidden_state
        hidden = hidden.to(self.value_head.weight.dtype)  # a float32 head on a LoRA backbone computing in bf16
        return self.value_head(hidden).squeeze(-1).float().clone()  # not a view: FSDP2 hooks want a fresh tensor


def sharded_like_backbone(model, device, dtype):
    """A RewardModel around a sharded backbone is sharded too, its head in the backbone's mixed precision."""
    return models.shard_model(model, device, common.resolve_dtype(dtype, device)) if models.is_sharded(model) else model


def load_reward_model(path, device, dtype="auto", trust_remote_code=False, allow_pickle=False, trained=False,
                      padding_free=None, adapter=None, seed=0, attn_implementation=None):
    """An rm.py output directory (backbone + value_head.safetensors) as a RewardModel (`trained`, `padding_free`,
    `attn_implementation`: see models.load_model). A trained one with `adapter` (a LoraConfig, lora.config) has
    the frozen backbone in `dtype` with a float32 LoRA adapter drawn from `seed`, and its head trained in full,
    in float32."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    head = os.path.join(path, HEAD_FILE)
    if not os.path.isfile(head):
        raise common.UserError(f"{path}: no {HEAD_FILE} there; run `python rm.py` first, or pass a directory it wrote")
    backbone = models.load_model(path, device, dtype, trust_remote_code, AutoModel, allow_pickle,
                                 trained and adapter is None, padding_free, attn_implementation)
    if trained and adapter is not None:
        backbone = lora.add_adapter(backbone, adapter, seed)
    model = RewardModel(backbone, torch.float32 if trained else None)
    model.value_head.load_state_dict(load_file(head, device=str(device)))
    return sharded_like_backbone(model, device, dtype)


def load_frozen(path, tokenizer, model, device, dtype, trust_remote_code, allow_pickle, padding_free,
                attn_implementation):
    """The frozen reward model at `path` that scores a policy's responses; a UserError if its tokenizer is not
    the policy's (--model `model`, `tokenizer`)."""
    reward_model = models.frozen(load_reward_model(path, device, dtype, trust_remote_code, allow_pickle,
                                                   padding_free=padding_free, attn_implementation=attn_implementation))
    if models.load_tokenizer(path, trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise common.UserError(f"--reward_model {path} has another tokenizer than --model {model}; train the reward "
                               "model from the same base")
    return reward_model


def save_reward_model(model, tokenizer, out_dir, dtype=None, merge=False):
    """The backbone as a HF directory (or its LoRA adapter, merged with `merge`) and the head as
    value_head.safetensors, in `dtype` (every rank must call this)."""
    checkpoint.save_model(model.backbone, tokenizer, out_dir, dtype, merge, value_head=model.value_head)
