"""Online DPO: DPO on pairs the current policy samples and a reward labels (Guo et al. 2024, "OAIF").

Models: the policy pi_theta (from --model, trained) and the reference pi_ref (a frozen copy of --model).
Rewards come from Python functions (--reward_fn, grpo.py's convention) and/or a reward model from rm.py
(--reward_model): R(x, y) = sum_k w_k R_k(x, y). One step, for each prompt x of the global batch:

1. Sample two responses y_1, y_2 ~ pi_theta(.|x) (no grad; temperature T, top_k=0, top_p=1, cut after the
   first EOS) and score each.
2. The one with the higher R is chosen y_w, the other rejected y_l. A tie (equal rewards, or a response no
   reward scored) is skipped: no pair, and it counts in tie_rate.
3. DPO's loss on the fresh pairs, against the frozen reference (dpo.py's dpo_loss; log-probs at T = 1):
       h = (logp_theta(y_w|x) - logp_ref(y_w|x)) - (logp_theta(y_l|x) - logp_ref(y_l|x))
       sigmoid: L = -logsig(beta*h)           ipo: L = (h - 1/(2*beta))^2        --loss_type
   L is the mean over the pairs of the global batch that are not ties.

logp(y|x) is the sum of the response-token log-probs (EOS included). Sizes per device: a micro-batch is
--batch_size prompts, so 2 * --batch_size responses; a step is --grad_accum micro-batches. The two responses
of a prompt are sampled and scored on one rank.

The defaults suit the toy task (a tiny model, lr 1e-3; the reward is the toy gold score,
toy/rewards.py:gold_reward). Real models want --lr ~5e-7 (TRL's default).

    python sft.py && python online_dpo.py                     # toy task, CPU: out/sft -> out/online_dpo
    torchrun --nproc_per_node=8 online_dpo.py --model my/sft --data prompts.jsonl --reward_model out/rm --lr 5e-7
"""
import math
import os

import torch

import batching
import checkpoint
import common
import formats
import logprobs
import models
import reward_functions
import reward_models
from dpo import dpo_loss, pair_logps
from toy.eval import evaluate, is_toy
from toy.task import DATA_DIR as TOY_DATA_DIR, ensure_model, HERE as TOY_DIR, SFT_MODEL_DIR

TOY_REWARD_FN = os.path.join(TOY_DIR, "rewards.py") + ":gold_reward"


def make_pairs(rewards):
    """rewards (2B,): prompt i's two responses at 2i and 2i + 1. Returns chosen, rejected (B,): indices into
    them (the higher reward chosen), and kept (B,): False for a tie, equal rewards or a NaN (unscored) one."""
    first, second = rewards.view(-1, 2).unbind(-1)
    chosen = 2 * torch.arange(len(first), device=rewards.device) + (second > first).long()
    kept = (first != second) & ~first.isnan() & ~second.isnan()
    return chosen, chosen ^ 1, kept


def online_dpo_step(policy_logps, ref_logps, mask, kept, n_pairs, args):
    """A micro-batch of sampled pairs -> (its share of the global batch's loss, named sums over its kept pairs).

    policy_logps, ref_logps: (2B, C) per-token log-probs, chosen rows then rejected; mask: their response
    tokens; kept (B,): 1 for a pair, 0 for a tie (in the batch with weight 0, so that every rank runs the same
    forwards); n_pairs: the global batch's kept pairs. Training and the held-out pass both call it."""
    chosen, rejected, ref_chosen, ref_rejected = pair_logps(policy_logps, ref_logps, mask)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta,
                                                        loss_type=args.loss_type)
    loss = (losses * kept).sum() / max(n_pairs, 1)
    margins = chosen_rewards - rejected_rewards
    return loss, {
        "loss": loss,
        "rewards/chosen": (chosen_rewards * kept).sum(),
        "rewards/rejected": (rejected_rewards * kept).sum(),
        "rewards/margins": (margins * kept).sum(),
        "rewards/accuracies": ((margins > 0) * kept).sum(),
        "logps/chosen": (chosen.detach() * kept).sum(),
        "logps/rejected": (rejected.detach() * kept).sum(),
    }


@torch.no_grad()
def sample_pairs(policy, reward_model, reward_fns, weights, prompts, tokenizer, args, device, reward_kwargs):
    """Two responses per prompt from the policy, scored, paired: (pair examples with prompt, chosen, rejected;
    kept (B,) as 0/1; named sums over the 2B responses: scores, contain_eos, and over the kept pairs: the
    scores' margin). The reward functions get grpo.py's keywords: the data columns, then reward_kwargs."""
    stop = common.stop_ids(policy.generation_config, tokenizer)
    expanded = [p for p in prompts for _ in range(2)]
    completions = common.generate_completions(policy, expanded, tokenizer, device, 2 * args.batch_size)
    scores = reward_functions.score(expanded, completions, tokenizer, reward_fns, reward_kwargs, reward_model, None,
                                    device, 2 * args.batch_size)
    rewards = reward_functions.total_rewards(scores, weights)
    chosen, rejected, kept = make_pairs(rewards)
    pairs = [{"prompt": p["prompt"], "chosen": completions[c], "rejected": completions[r]}
             for p, c, r in zip(prompts, chosen.tolist(), rejected.tolist())]
    margin = (rewards[chosen] - rewards[rejected]).nan_to_num()
    return pairs, kept.float(), {"objective/scores": rewards.nansum(), "scored": (~rewards.isnan()).sum(),
                                 "val/contain_eos_token": sum(c[-1] in stop for c in completions),
                                 "objective/scores_margin": (margin * kept).sum(), "ties": (~kept).sum(),
                                 "prompts": len(prompts)}


def parse_args(argv=None):
    p = common.base_parser(__doc__, data=os.path.join(TOY_DATA_DIR, "prompts.jsonl"), model=SFT_MODEL_DIR,
                           lr=1e-3, max_steps=100, batch_size=16, output_dir="out/online_dpo", real_lr="5e-7")
    reward_functions.add_flags(p)
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    p.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo"],
                   help="sigmoid: the DPO loss; ipo: IPO's squared loss, which stops at a finite margin")
    p.add_argument("--max_new_tokens", type=int, default=32,
                   help="response length limit when sampling; a response ends earlier at any EOS")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (TRL's default: 0.9)")
    args = p.parse_args(argv)
    for name in ("beta", "max_new_tokens", "temperature"):
        common.check_range(args, name, above=0)
    if args.max_new_tokens >= args.max_length:
        raise common.UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt in "
                               f"--max_length {args.max_length}")
    args.reward_fn = reward_functions.check_flags(args.reward_fn, args.reward_model, args.reward_weights, args.data,
                                                  TOY_REWARD_FN if is_toy(args) else None)
    return args


def pair_batches(pairs, kept, batch_size, pad_id, device):
    """The step's (or held-out chunk's) pairs as micro-batches: (collated batch, its kept (B,))."""
    for i in range(0, len(pairs), batch_size):
        yield batching.collate_pairs(pairs[i:i + batch_size], pad_id, device), kept[i:i + batch_size]


def rollout_means(sums, device):
    """sample_pairs' sums (all ranks) -> TRL's means: scores over the scored responses, contain_eos over the
    responses, the scores' margin over the kept pairs, and tie_rate, the share of prompts with no pair."""
    totals = sums.total(device)
    prompts = totals["prompts"]
    return {"objective/scores": totals["objective/scores"] / totals["scored"] if totals["scored"] else math.nan,
            "objective/scores_margin": totals["objective/scores_margin"] / (prompts - totals["ties"] or math.nan),
            "val/contain_eos_token": totals["val/contain_eos_token"] / (2 * prompts),
            "tie_rate": totals["ties"] / prompts}


def heldout_metrics(policy, ref_model, reward_model, reward_fns, weights, chunks, tokenizer, args, device):
    """online_dpo_step's metrics and the rollout's on two sampled responses per held-out prompt, as eval/...
    (seeded: the same draws at every evaluation, training RNG untouched)."""
    kwargs = reward_functions.reward_kwargs(0, args.max_steps, log_metric=lambda name, value: None)
    rollout, sampled = common.Sums(), []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + common.rank())
        for chunk in chunks:
            pairs, kept, stats = sample_pairs(policy, reward_model, reward_fns, weights, chunk, tokenizer, args,
                                              device, kwargs)
            sampled.append((pairs, kept))
            rollout.add(stats)
    (n_pairs,) = common.all_sum([sum(float(kept.sum()) for _, kept in sampled)], device)
    sums = common.Sums()
    with common.evaluating(policy):
        for pairs, kept in sampled:
            for batch, k in pair_batches(pairs, kept, args.batch_size, tokenizer.pad_token_id, device):
                sums.add(online_dpo_step(logprobs.token_logps(policy, batch), logprobs.token_logps(ref_model, batch),
                                         batch["labels"] != -100, k, n_pairs, args)[1])
    metrics = {**rollout_means(rollout, device), **common.means(sums.total(device), n_pairs or math.nan)}
    return {f"eval/{name}": value for name, value in metrics.items()}


def main(argv=None):
    args = parse_args(argv)
    common.check_args(args)
    ensure_model(args.model)
    device = common.setup(args)

    reward_fns = [reward_functions.load_reward_fn(spec) for spec in args.reward_fn]
    tokenizer, policy = models.load_policy(args, device)
    ref_model = models.load_reference(args, device, policy=policy)  # LoRA: the adapter off
    reward_model = None if args.reward_model is None else reward_models.load_frozen(
        args.reward_model, tokenizer, args.model, device, args.dtype, args.trust_remote_code, args.allow_pickle,
        args.padding_free, args.attn_implementation)
    n_rewards = len(reward_fns) + (reward_model is not None)
    weights = torch.tensor(args.reward_weights or [1.0] * n_rewards, device=device)
    generation_config = common.set_sampling(policy, args, tokenizer)
    optimizer, scheduler = common.make_optimizer(policy, args)
    notes = []

    def load(path):  # reward functions get each prompt's data row
        rows, note = formats.read_data(path, ())
        notes.append(note)
        return [{**ex, "row": row} for ex, row in zip(
            formats.tokenize(rows, tokenizer, args.max_length - args.max_new_tokens, ()), rows)]

    prompts = load(args.data)
    heldout = args.eval_data and batching.heldout_chunks(load(args.eval_data), args.batch_size)
    pad_id, toy = tokenizer.pad_token_id, is_toy(args)

    torch.manual_seed(args.seed + common.rank())  # every rank samples differently; before resume restores RNG
    state = checkpoint.TrainState(args, tokenizer, prompts, policy, optimizer, scheduler)
    start = state.resume()

    def evaluation():
        return {**(evaluate(policy, tokenizer, args, device) if toy else {}), **(heldout_metrics(
            policy, ref_model, reward_model, reward_fns, weights, heldout, tokenizer, args, device) if heldout else {})}

    logger = common.Logger(args, start, notes, headline=("loss", "objective/scores"))
    if (toy or heldout) and start == 0:
        logger.log(0, evaluation())
    logger.tokens_per_second(device)  # start the step clock
    policy.train()  # the update's mode, which sampling and evaluations restore
    for step in range(start + 1, args.max_steps + 1):
        step_prompts = [p for mb in batching.micro_batches(prompts, step - 1, args) for p in mb]
        kwargs = reward_functions.reward_kwargs(step - 1, args.max_steps, log_metric=lambda name, value: None)
        pairs, kept, stats = sample_pairs(policy, reward_model, reward_fns, weights, step_prompts, tokenizer, args,
                                          device, kwargs)
        rollout = common.Sums()
        rollout.add(stats)
        (n_pairs,) = common.all_sum([float(kept.sum())], device)  # the loss is a mean over the global batch's pairs
        sums = common.Sums()
        for batch, k in pair_batches(pairs, kept, args.batch_size, pad_id, device):
            policy_logps = logprobs.token_logps(policy, batch)
            with torch.no_grad():
                ref_logps = logprobs.token_logps(ref_model, batch)
            loss, metrics = online_dpo_step(policy_logps, ref_logps, batch["labels"] != -100, k, n_pairs, args)
            (loss * common.world()).backward()  # FSDP averages gradients over ranks
            sums.add(metrics)
            logger.count(batch)
        grad_norm = common.clip_and_step(policy, optimizer, scheduler, args.max_grad_norm)

        if step % args.log_every == 0 or step == args.max_steps:
            logger.log(step, {**rollout_means(rollout, device), **common.means(sums.total(device), n_pairs or math.nan),
                              "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                              "tokens/s": logger.tokens_per_second(device)})
        if (toy or heldout) and (step == args.max_steps or (args.eval_every and step % args.eval_every == 0)):
            logger.log(step, evaluation())
        logger.update()
        state.end_step(step, loss=sums.values["loss"], grad_norm=grad_norm)

    policy.generation_config = generation_config  # save the checkpoint's own generation defaults
    checkpoint.save_model(policy, tokenizer, args.output_dir, models.save_dtype(args))
    logger.close()


if __name__ == "__main__":
    common.run(main)
