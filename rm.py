"""Reward model: a scalar head on a causal-LM backbone, trained on preference pairs (Bradley-Terry).

    r(x, y) = w . h_last(x, y)          h_last: the backbone's hidden state at the last token of
                                        prompt + response (the EOS token)
    L = mean over pairs of -logsig(r_w - r_l - margin) + center_coef * mean over the 2B rewards of r^2

r_w, r_l are the rewards of the chosen and rejected responses. The centring term keeps rewards
near 0 (so PPO's value model, which starts from this one, starts near its targets).

Output: the backbone (no LM head) as a Hugging Face directory that AutoModel loads, and the head
as `value_head.safetensors` beside it; `reward_models.load_reward_model(path)` loads both, and also loads
the --save_every checkpoints (output_dir/checkpoint-N), written in the same layout.

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
import models
from reward_models import RewardModel, save_reward_model, sharded_like_backbone
from toy.task import DATA_DIR as TOY_DATA_DIR, SFT_MODEL_DIR, ensure_model

def reward_loss(chosen_rewards, rejected_rewards, margin=0.0, center_coef=0.0):
    """Per-pair losses -logsig(r_w - r_l - margin) + center_coef * (r_w^2 + r_l^2) / 2, whose mean over the
    pairs is align-anything's form: center_coef times the mean of r^2 over all 2B rewards."""
    return (-F.logsigmoid(chosen_rewards - rejected_rewards - margin)
            + center_coef * (chosen_rewards ** 2 + rejected_rewards ** 2) / 2)


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
