"""Reward model: a scalar head on a causal-LM backbone, trained on preference pairs (Bradley-Terry).

    r(x, y) = w . h_last(x, y)          h_last: the backbone's hidden state at the last token of
                                        prompt + response (the EOS token)
    L = mean over pairs of -logsig(r_w - r_l - margin) + center_coef * mean over the 2B rewards of r^2

r_w, r_l are the rewards of the chosen and rejected responses. The centring term keeps rewards
near 0 (so PPO's value model, which starts from this one, starts near its targets).

Output: the backbone (no LM head) as a Hugging Face directory that AutoModel loads, and the head
as `value_head.safetensors` beside it; `load_reward_model(path)` loads both, and also loads the
--save_every checkpoints (output_dir/checkpoint-N), written in the same layout.

Data: JSONL with `prompt`, `chosen`, `rejected`, or any pair shape (README, Bring your own data).
Default: the toy pairs. The held-out metrics on --eval_data (default: the toy eval pairs on toy data),
eval/accuracy and the others training logs, are logged at the start and the end, and every --eval_every steps.

    python sft.py && python rm.py                            # toy task: out/sft -> out/rm
    torchrun --nproc_per_node=8 rm.py --model my/sft --data pairs.jsonl --lr 1e-5 --output_dir out/rm
    python rm.py --save_every 100 --resume                  # pre-emptible: rerun the same command
"""
import os

import torch
import torch.nn.functional as F

import batching
import checkpoint
import common
import formats
import logprobs
import lora
import models
from toy.task import DATA_DIR as TOY_DATA_DIR, SFT_MODEL_DIR, ensure_model

HEAD_FILE = "value_head.safetensors"


def reward_loss(chosen_rewards, rejected_rewards, margin=0.0, center_coef=0.0):
    """Per-pair losses -logsig(r_w - r_l - margin) + center_coef * (r_w^2 + r_l^2) / 2, whose mean over the
    pairs is align-anything's form: center_coef times the mean of r^2 over all 2B rewards."""
    return (-F.logsigmoid(chosen_rewards - rejected_rewards - margin)
            + center_coef * (chosen_rewards ** 2 + rejected_rewards ** 2) / 2)


class RewardModel(torch.nn.Module):
    """A decoder backbone (AutoModel: no LM head) and a linear head giving one scalar per position."""

    def __init__(self, backbone, dtype=None):
        super().__init__()
        self.backbone = backbone
        self.value_head = torch.nn.Linear(backbone.config.hidden_size, 1, bias=False,
                                          device=backbone.device, dtype=dtype or backbone.dtype)
        self._no_split_modules = backbone._no_split_modules  # models.shard_model shards these layers

    def forward(self, input_ids, attention_mask, position_ids):
        """(B, T) float32 values: the head applied to the hidden state at every position."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        hidden = hidden.to(self.value_head.weight.dtype)  # a float32 head on a LoRA backbone computing in bf16
        return self.value_head(hidden).squeeze(-1).float().clone()  # not a view: FSDP2 hooks want a fresh tensor


def sharded_like_backbone(model, device, dtype):
    """A RewardModel around a sharded backbone is sharded too, its head in the backbone's mixed precision."""
    return models.shard_model(model, device, common.resolve_dtype(dtype, device)) if models.is_sharded(model) else model


def load_reward_model(path, device, dtype="auto", trust_remote_code=False, allow_pickle=False, trained=False,
                      padding_free=None, adapter=None, seed=0, attn_implementation=None):
    """An rm.py output directory (backbone + value_head.safetensors) as a RewardModel (`trained`, `padding_free`,
    `attn_implementation`: see models.load_model). A trained one with `adapter` (a LoraConfig, lora.config) has the frozen backbone
    in `dtype` with a float32 LoRA adapter drawn from `seed`, and its head trained in full, in float32."""
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


def rm_step(rewards, n_pairs, args):
    """A micro-batch of pairs -> (its share of the global batch's loss, named sums over its pairs).

    rewards: (2B,) last-token rewards, chosen rows then rejected; n_pairs: the global batch's pairs, which
    the loss averages over. Training and the held-out pass both call it, so eval/loss is the training loss."""
    chosen, rejected = rewards.chunk(2)
    loss = reward_loss(chosen, rejected, args.margin, args.center_coef).sum() / n_pairs
    return loss, {"loss": loss, "accuracy": (chosen > rejected).sum(), "rewards/chosen": chosen.sum(),
                  "rewards/rejected": rejected.sum(), "rewards/margins": (chosen - rejected).sum()}


def parse_args(argv=None):
    p = common.base_parser(__doc__, data=os.path.join(TOY_DATA_DIR, "pairs.jsonl"), model=SFT_MODEL_DIR,
                           lr=3e-4, max_steps=600, output_dir="out/rm", real_lr="1e-5", eval_file="eval_pairs.jsonl")
    p.add_argument("--margin", type=float, default=0.0,
                   help="reward gap m the chosen response must win by: the loss is -logsig(r_w - r_l - m)")
    p.add_argument("--center_coef", type=float, default=0.001,
                   help="weight of the mean r^2 over all rewards, which keeps rewards near 0 (0: off)")
    args = p.parse_args(argv)
    common.check_range(args, "center_coef", low=0)
    return args


def heldout_metrics(model, chunks, args, pad_id, device):
    """rm_step's metrics over the held-out pairs (this rank's chunks), as eval/..."""
    (n_pairs,) = common.all_sum([sum(map(len, chunks))], device)
    sums = common.Sums()
    with common.evaluating(model):
        for chunk in chunks:
            sums.add(rm_step(logprobs.last_token_outputs(model, batching.collate_pairs(chunk, pad_id, device)), n_pairs,
                             args)[1])
    return common.means(sums.total(device), n_pairs, prefix="eval/")


def main(argv=None):
    from transformers import AutoModel

    args = parse_args(argv)
    common.check_args(args)
    ensure_model(args.model)
    device = common.setup(args)

    tokenizer = models.load_tokenizer(args.model, args.trust_remote_code)
    fields = ("chosen", "rejected")
    notes = []

    def load(path):
        rows, note = formats.read_data(path, fields)
        notes.append(note)
        return formats.tokenize(rows, tokenizer, args.max_length, fields)

    examples = load(args.data)
    heldout = args.eval_data and batching.heldout_chunks(load(args.eval_data), args.batch_size)
    backbone = models.load_trained(args, device, AutoModel)  # with --lora_r: a LoRA backbone, the head trained in full
    if args.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = sharded_like_backbone(RewardModel(backbone, torch.float32), device, args.dtype)
    optimizer, scheduler = common.make_optimizer(model, args)
    pad_id = tokenizer.pad_token_id
    # checkpoint-N is rm's own format (backbone + value_head.safetensors): load_reward_model loads it
    state = checkpoint.TrainState(args, tokenizer, examples, model.backbone, optimizer, scheduler,
                                  value_head=model.value_head)
    start = state.resume()

    logger = common.Logger(args, start, notes)
    if heldout and start == 0:
        logger.log(0, heldout_metrics(model, heldout, args, pad_id, device))
    model.train()
    for step in range(start + 1, args.max_steps + 1):
        micro = batching.micro_batches(examples, step - 1, args)
        n_pairs = len(micro) * args.batch_size * common.world()  # the loss is a mean over the global batch
        sums = common.Sums()
        for mb in micro:
            batch = batching.collate_pairs(mb, pad_id, device)
            loss, metrics = rm_step(logprobs.last_token_outputs(model, batch), n_pairs, args)
            (loss * common.world()).backward()  # FSDP averages gradients over ranks
            sums.add(metrics)
            logger.count(batch)
        grad_norm = common.clip_and_step(model, optimizer, scheduler, args.max_grad_norm)

        if step % args.log_every == 0 or step == args.max_steps:
            logger.log(step, {**common.means(sums.total(device), n_pairs), "lr": scheduler.get_last_lr()[0],
                              "grad_norm": float(grad_norm), "tokens/s": logger.tokens_per_second(device)})
        if heldout and (step == args.max_steps or (args.eval_every and step % args.eval_every == 0)):
            logger.log(step, heldout_metrics(model, heldout, args, pad_id, device))
        logger.update()
        state.end_step(step, loss=sums.values["loss"], grad_norm=grad_norm)

    save_reward_model(model, tokenizer, args.output_dir, models.save_dtype(args), args.merge_lora)
    logger.close()


if __name__ == "__main__":
    common.run(main)
