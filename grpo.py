"""GRPO: RL with verifiable rewards, a group of samples per prompt as the baseline (no value model).

Models: the policy pi (from --model, trained), and with --beta > 0 the reference pi_ref (a frozen
copy of --model). Rewards come from Python functions (--reward_fn) and/or a reward model from
rm.py (--reward_model). One step:

1. Rollout, no grad: sample G = --num_generations responses o_1..o_G ~ pi_old(.|q) for each prompt
   q at temperature T (top_k=0, top_p=1), cut after the first EOS; score each, R_i = sum_k w_k R_k(q, o_i).
2. Advantage of o_i, the same for each of its tokens (--scale_rewards):
       group:  A_i = (R_i - mean_group(R)) / (std_group(R) + 1e-4)      std with Bessel's correction
       batch:  the same with the std over the whole batch
       none:   A_i = R_i - mean_group(R)                                 (Dr. GRPO)
3. --num_iterations optimizer steps on the rollout (with 1, pi_old is pi_theta detached: ratio 1 in value):
       ratio_t = pi_theta(o_t|q, o_<t) / pi_old(o_t|q, o_<t)          (log-probs of logits / T, float32)
       L_t  = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_t
       KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1               (k3, in the loss, not the reward)
   aggregated over the global batch (all micro-batches and ranks) by --loss_type:
       grpo:    mean over sequences of (token mean within the sequence)    (DeepSeekMath)
       dr_grpo: token sum / (number of sequences * --max_new_tokens)    (Dr. GRPO)
       dapo:    token sum / number of response tokens                    (DAPO; TRL's default)

Sizes per device: a micro-batch is --batch_size prompts, so --batch_size * G sampled responses; a
rollout is --grad_accum micro-batches. The G responses of a prompt stay on one rank, so the group
statistics need no collective. --max_steps counts rollouts.

The defaults (--lr 1e-3, --batch_size 8, --max_steps 100) are tuned for the toy task: from out/sft,
`python grpo.py` raises the toy gold score 0.50 -> 0.91 in about a minute on one CPU core. For real
models set e.g. --lr 1e-6. The reward on the toy data is the gold score (toy/rewards.py:gold_reward).

    python sft.py && python grpo.py                          # the toy task on CPU: out/sft -> out/grpo
    torchrun --nproc_per_node=8 grpo.py --model my/sft --data math.jsonl --reward_fn verify.py:accuracy --lr 1e-6
    python grpo.py --loss_type dr_grpo --scale_rewards none  # Dr. GRPO;  --epsilon_high 0.28: DAPO's clip-higher
"""
import math
import os
import warnings
from typing import NamedTuple

import torch

import batching
import checkpoint
import common
import formats
import logprobs
import models
import reward_functions
import rm
from toy.eval import evaluate, is_toy
from toy.task import DATA_DIR as TOY_DATA_DIR, ensure_model, HERE as TOY_DIR, SFT_MODEL_DIR

TOY_REWARD_FN = os.path.join(TOY_DIR, "rewards.py") + ":gold_reward"


def group_advantages(rewards, num_generations, scale_rewards):
    """A_i (N,) for rewards (N,) laid out as N / G groups of G consecutive responses:
        group: (R_i - mean_group R) / (std_group R + 1e-4);  batch: the std over every rank's rewards;
        none:  R_i - mean_group R.
    std with Bessel's correction. A NaN reward (no reward function scored the response) is left out of the
    means and stds, and its A is 0, as in TRL. Also returns each group's std (N / G,; NaN under two scored
    responses): a group whose rewards are all equal has A = 0 and teaches nothing."""
    groups = rewards.view(-1, num_generations)
    advantages = (groups - groups.nanmean(-1, keepdim=True)).flatten()
    scored = (~groups.isnan()).sum(-1)
    group_std = torch.where(scored > 1, (advantages.view_as(groups) ** 2).nansum(-1) / (scored - 1), torch.nan).sqrt()
    if scale_rewards == "group":
        advantages = advantages / (group_std.repeat_interleave(num_generations) + 1e-4)
    elif scale_rewards == "batch":
        _, batch_std = scored_mean_std(rewards, rewards.device)
        advantages = advantages / (batch_std + 1e-4)
    return advantages.nan_to_num(0.0), group_std


def scored_mean_std(rewards, device):
    """Mean and std (Bessel's correction) over every rank of the rewards that are not NaN; NaN if none is."""
    scored = ~rewards.isnan()
    if common.all_sum([float(scored.sum())], device)[0] == 0:
        return math.nan, math.nan
    return common.global_mean_std(rewards.nan_to_num(), device, scored.float())


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type, epsilon_low, epsilon_high, beta,
              n_sequences, n_tokens, max_new_tokens):
    """This micro-batch's part of the loss of the global batch:
        ratio_t = exp(logp_t - old_logp_t)
        L_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
        KL_t = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1          (k3: pi_ref/pi - log(pi_ref/pi) - 1)
        grpo:    sum over sequences of (token mean of L_t) / n_sequences
        dr_grpo: token sum of L_t / (n_sequences * max_new_tokens)
        dapo:    token sum of L_t / n_tokens
    logps, old_logps, ref_logps (None when beta = 0), mask: (B, C); advantages: (B,). n_sequences, n_tokens:
    the counts of the global batch, so that its micro-batches and ranks add up to its loss. Also returns,
    per token (B, C): KL_t and whether the low or the high clip is active (ratio < 1 - eps_low with A < 0,
    ratio > 1 + eps_high with A > 0: the token has no gradient)."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * a)
    kl = torch.zeros_like(logps)
    if beta > 0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_sequences
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (n_sequences * max_new_tokens)
    else:
        loss = per_token.sum() / n_tokens
    low, high = (ratio < 1 - epsilon_low) & (a < 0), (ratio > 1 + epsilon_high) & (a > 0)
    return loss, kl.detach(), low.float(), high.float()


def grpo_step(logps, entropy, old_logps, ref_logps, advantages, mask, n_sequences, n_tokens, args):
    """A micro-batch of responses -> (its share of the global batch's loss, its shares of the global batch's
    token means, named). logps, entropy: the policy's (B, C); old_logps, ref_logps (None when --beta is 0),
    advantages (B,): the rollout's; n_sequences, n_tokens: the global batch's responses and response tokens."""
    loss, kl, low, high = grpo_loss(
        logps, old_logps, ref_logps, advantages, mask, loss_type=args.loss_type, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high, beta=args.beta, n_sequences=n_sequences, n_tokens=n_tokens,
        max_new_tokens=args.max_new_tokens)
    return loss, {"loss": loss, **({"kl": (kl * mask).sum() / n_tokens} if args.beta > 0 else {}),
                  "clip_ratio/low_mean": (low * mask).sum() / n_tokens,
                  "clip_ratio/high_mean": (high * mask).sum() / n_tokens,
                  "entropy": (entropy * mask).sum() / n_tokens}


class Rollout(NamedTuple):
    """Sampled responses and their no-grad scores: the scoring batch (batching.collate layout, the G responses
    of a prompt in consecutive rows), has_eos (N,), the rewards of each source (N, sources), and the policy's
    old_logps (with --num_iterations > 1) and the reference's ref_logps (with --beta > 0), (N, C) or None."""
    batch: dict
    has_eos: torch.Tensor
    rewards: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None


@torch.no_grad()
def rollout(policy, ref_model, reward_model, reward_fns, reward_kwargs, prompts, tokenizer, args, device, logps=True):
    """Sample G responses per prompt, then score them: a Rollout. The policy scores in eval mode, as it
    sampled; its mode is restored after. reward_kwargs: the reward functions' keywords besides the columns.
    `logps` False (an evaluation, which reads the rewards only): no old or reference log-probs."""
    pad_id, size = tokenizer.pad_token_id, args.local_rollout_forward_batch_size
    stop = common.stop_ids(policy.generation_config, tokenizer)
    expanded = [p for p in prompts for _ in range(args.num_generations)]
    completions = common.generate_completions(policy, expanded, tokenizer, device, size)
    batch = batching.collate([p["prompt"] for p in expanded], completions, pad_id, device)
    has_eos = torch.tensor([c[-1] in stop for c in completions], device=device)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    rows = [p["row"] for p in expanded]
    texts = [[{"role": "assistant", "content": t}] if isinstance(r["prompt"], list) else t for r, t in zip(rows, texts)]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "_where")}
    rewards = [reward_functions.call_reward_fn(name, fn, [r["prompt"] for r in rows], texts, completions, columns,
                                               reward_kwargs) for name, fn in reward_fns]
    parts = {"old_logps": [], "ref_logps": [], "scores": []}
    with common.evaluating(policy):
        for i in range(0, len(expanded), size):
            chunk = {k: v[i:i + size] for k, v in batch.items()}
            if args.num_iterations > 1 and logps:
                parts["old_logps"].append(logprobs.token_logps(policy, chunk, args.temperature))
            if args.beta > 0 and logps:
                parts["ref_logps"].append(logprobs.token_logps(ref_model, chunk, args.temperature))
            if reward_model is not None:
                parts["scores"].append(rm.last_token_rewards(reward_model, chunk))
    rewards = torch.tensor(rewards, device=device).reshape(len(reward_fns), len(expanded)).T
    scores = parts.pop("scores")
    if reward_model is not None:
        rewards = torch.cat([rewards, torch.cat(scores)[:, None].float()], 1)
    if rewards.isnan().all(1).any():
        warnings.warn("every reward function returned None for a response: it has A = 0 and no part in the "
                      "reward metrics; make at least one reward function score every response")
    return Rollout(batch, has_eos, rewards, **{k: torch.cat(v) if v else None for k, v in parts.items()})


def heldout_metrics(policy, ref_model, reward_model, reward_fns, reward_kwargs, weights, chunks, tokenizer, args,
                    device):
    """`eval/reward`: the mean weighted reward of G responses per held-out prompt, sampled as in rollout
    (seeded: the same draws at every evaluation, training RNG untouched), over the responses scored."""
    sums = common.Sums()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + common.rank())
        for chunk in chunks:
            sampled = rollout(policy, ref_model, reward_model, reward_fns, reward_kwargs, chunk, tokenizer, args,
                              device, logps=False)
            rewards = reward_functions.total_rewards(sampled.rewards, weights)
            sums.add({"reward": rewards.nansum(), "scored": (~rewards.isnan()).sum()})
    totals = sums.total(device)
    return {"eval/reward": totals["reward"] / totals["scored"] if totals["scored"] else math.nan}


def parse_args(argv=None):
    p = common.base_parser(__doc__, data=os.path.join(TOY_DATA_DIR, "prompts.jsonl"), model=SFT_MODEL_DIR,
                           lr=1e-3, max_steps=100, batch_size=8, output_dir="out/grpo", real_lr="1e-6")
    p.add_argument("--reward_fn", action="append", default=[],
                   help="path/to/file.py:function, repeatable (default on the toy data: toy/rewards.py:gold_reward)")
    p.add_argument("--reward_model", default=None, help="an rm.py output directory, as another reward")
    p.add_argument("--reward_weights", type=float, nargs="+", default=None,
                   help="one weight per --reward_fn, then the --reward_model (default: all 1)")
    p.add_argument("--num_generations", type=int, default=8, help="G, responses sampled per prompt")
    p.add_argument("--max_new_tokens", type=int, default=32,
                   help="response length limit when sampling; a response ends earlier at the tokenizer's EOS or "
                        "any eos_token_id of the model's generation_config (e.g. <end_of_turn>)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling and scoring temperature T")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model; DeepSeekMath: 0.04)")
    p.add_argument("--epsilon", type=float, default=0.2, help="eps_low, the clip below 1")
    p.add_argument("--epsilon_high", type=float, default=None, help="eps_high (default: --epsilon; DAPO: 0.28)")
    p.add_argument("--loss_type", default="dapo", choices=["grpo", "dr_grpo", "dapo"],
                   help="how token losses add up: grpo: mean per response, then over responses; "
                        "dr_grpo: sum / (responses * max_new_tokens); dapo: mean over all response tokens")
    p.add_argument("--scale_rewards", default="group", choices=["group", "batch", "none"],
                   help="divide advantages by the std of the group, of the batch, or not at all (Dr. GRPO)")
    p.add_argument("--num_iterations", type=int, default=1, help="mu, optimizer steps per rollout")
    p.add_argument("--local_rollout_forward_batch_size", type=int, default=64, help="rows per no-grad forward")
    p.add_argument("--num_sample_generations", type=int, default=10, help="times a sample is printed (0: never)")
    args = p.parse_args(argv)
    if args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    for name in ("max_new_tokens", "num_iterations", "local_rollout_forward_batch_size", "temperature", "epsilon",
                 "epsilon_high"):
        common.check_range(args, name, above=0)
    common.check_range(args, "num_generations", low=2)
    common.check_range(args, "beta", low=0)
    if args.max_new_tokens >= args.max_length:
        raise common.UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt in "
                               f"--max_length {args.max_length}")
    if not args.reward_fn and args.reward_model is None:
        if not is_toy(args):
            raise common.UserError(f"{args.data}: no reward given; pass --reward_fn path/to/file.py:function "
                                   "or --reward_model")
        args.reward_fn = [TOY_REWARD_FN]
    n_rewards = len(args.reward_fn) + (args.reward_model is not None)
    if args.reward_weights is not None and len(args.reward_weights) != n_rewards:
        raise common.UserError(f"--reward_weights has {len(args.reward_weights)} values for {n_rewards} rewards")
    return args


def main(argv=None):
    args = parse_args(argv)
    common.check_args(args)
    ensure_model(args.model)
    device = common.setup(args)

    reward_fns = [reward_functions.load_reward_fn(spec) for spec in args.reward_fn]
    tokenizer, policy = models.load_policy(args, device)
    ref_model = reward_model = None
    if args.beta > 0:
        ref_model = models.load_reference(args, device, policy=policy)  # LoRA: the adapter off
    if args.reward_model is not None:
        reward_model = models.frozen(rm.load_reward_model(args.reward_model, device, args.dtype, args.trust_remote_code,
                                                          args.allow_pickle, padding_free=args.padding_free))
        if models.load_tokenizer(args.reward_model, args.trust_remote_code).get_vocab() != tokenizer.get_vocab():
            raise common.UserError(f"--reward_model {args.reward_model} has another tokenizer than --model "
                                   f"{args.model}; train the reward model from the same base")
    names = [name for name, _ in reward_fns] + ["reward_model"] * (reward_model is not None)
    weights = torch.tensor(args.reward_weights or [1.0] * len(names), device=device)
    generation_config = common.set_sampling(policy, args, tokenizer)
    # the schedule runs over every optimizer step: num_iterations per rollout
    optimizer, scheduler = common.make_optimizer(policy, args, total_steps=args.max_steps * args.num_iterations)

    notes = []

    def load(path):  # reward functions get each prompt's data row
        rows, note = formats.read_data(path, ())
        notes.append(note)
        return [{**ex, "row": row} for ex, row in zip(
            formats.tokenize(rows, tokenizer, args.max_length - args.max_new_tokens, ()), rows)]

    prompts = load(args.data)
    heldout = args.eval_data and batching.heldout_chunks(load(args.eval_data), args.batch_size)
    sample_every = max(1, args.max_steps // args.num_sample_generations) if args.num_sample_generations else 0
    toy = is_toy(args)

    torch.manual_seed(args.seed + common.rank())  # every rank samples differently; before resume restores RNG
    state = checkpoint.TrainState(args, tokenizer, prompts, policy, optimizer, scheduler)
    start = state.resume()

    def evaluation(step):  # the held-out rollouts' log_metric values are not logged
        kwargs = reward_functions.reward_kwargs(step, args.max_steps, log_metric=lambda name, value: None)
        return {**(evaluate(policy, tokenizer, args, device) if toy else {}), **(heldout_metrics(
            policy, ref_model, reward_model, reward_fns, kwargs, weights, heldout, tokenizer, args, device)
            if heldout else {})}

    step_metrics = {}  # what the reward functions log_metric in this step's rollout: name -> values

    def log_metric(name, value):
        step_metrics.setdefault(name, []).append(float(value))

    logger = common.Logger(args, start, notes, headline=("loss", "reward"))
    if (toy or heldout) and start == 0:
        logger.log(0, evaluation(0))
    logger.tokens_per_second(device)  # start the step clock
    policy.train()  # the updates' mode, which rollouts and evaluations restore
    for step in range(start + 1, args.max_steps + 1):
        batch_prompts = [p for mb in batching.micro_batches(prompts, step - 1, args) for p in mb]
        step_metrics.clear()
        kwargs = reward_functions.reward_kwargs(step - 1, args.max_steps, log_metric)
        sampled = rollout(policy, ref_model, reward_model, reward_fns, kwargs, batch_prompts, tokenizer, args, device)
        batch = sampled.batch
        rewards = reward_functions.total_rewards(sampled.rewards, weights)
        advantages, group_std = group_advantages(rewards, args.num_generations, args.scale_rewards)
        mask = (batch["labels"] != -100).float()
        n_sequences, n_tokens = common.all_sum([len(mask), float(mask.sum())], device)
        sums, grad_norm = common.Sums(), 0.0
        for _ in range(args.num_iterations):
            for rows in torch.arange(len(mask), device=device).split(args.batch_size * args.num_generations):
                mb = {k: v[rows] for k, v in batch.items()}
                logps, entropy = logprobs.logps_and_entropy(policy, mb, args.temperature)
                old_logps = sampled.old_logps[rows] if args.num_iterations > 1 else logps.detach()
                ref_logps = sampled.ref_logps[rows] if args.beta > 0 else None
                loss, metrics = grpo_step(logps, entropy, old_logps, ref_logps, advantages[rows], mask[rows],
                                          n_sequences, n_tokens, args)
                (loss * common.world()).backward()  # FSDP averages gradients over ranks
                sums.add(metrics)
                logger.count(mb)
            grad_norm += float(common.clip_and_step(policy, optimizer, scheduler, args.max_grad_norm))
        grad_norm /= args.num_iterations

        if step % args.log_every == 0 or step == args.max_steps:
            reward, reward_std = scored_mean_std(rewards, device)
            # each source's mean over the responses it scored (TRL's nanmean)
            per_source = common.all_sum(sampled.rewards.nansum(0).tolist() + (~sampled.rewards.isnan()).sum(0).tolist(),
                                        device)
            source_means = {f"rewards/{name}": total / n if n else math.nan
                            for name, total, n in zip(names, per_source, per_source[len(names):])}
            reward_fn_metrics = common.Sums()  # every rank's functions must log the same names, as in TRL
            reward_fn_metrics.add({name: sum(values) / len(values) for name, values in step_metrics.items()})
            responses = common.Sums()
            responses.add({"frac_reward_zero_std": (group_std == 0).sum() * args.num_generations,
                           "completions/mean_length": mask.sum(),
                           "completions/clipped_ratio": (~sampled.has_eos).sum()})
            logger.log(step, {
                "reward": reward, "reward_std": reward_std, **source_means,
                **common.means(responses.total(device), n_sequences),
                **(common.means(reward_fn_metrics.total(device), common.world()) if step_metrics else {}),
                # the update's means over its num_iterations optimizer steps
                **{name: value / args.num_iterations for name, value in sums.total(device).items()},
                "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens/s": logger.tokens_per_second(device),
            })
        if sample_every and step % sample_every == 0 and common.rank() == 0:
            response = batch["labels"][0][batch["labels"][0] != -100]
            logger.bar.write(f"[step {step}] {tokenizer.decode(batch_prompts[0]['prompt'], skip_special_tokens=True)!r}"
                             f" -> {tokenizer.decode(response)!r} (reward {float(rewards[0]):.3f})")
        if (toy or heldout) and (step == args.max_steps or (args.eval_every and step % args.eval_every == 0)):
            logger.log(step, evaluation(step))
        logger.update()
        state.end_step(step, loss=sums.values["loss"], grad_norm=grad_norm)

    policy.generation_config = generation_config  # save the checkpoint's own generation defaults, not GRPO's
    checkpoint.save_model(policy, tokenizer, args.output_dir, models.save_dtype(args), args.merge_lora)
    logger.close()


if __name__ == "__main__":
    common.run(main)
