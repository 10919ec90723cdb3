"""GRPO: RL with verifiable rewards, a group of samples per prompt as the baseline (no value model).

Models: the policy pi (from --model, trained), and with --beta > 0 the reference pi_ref (a frozen
copy of --model). Rewards come from Python functions (--reward_fn) and/or a reward model from
rm.py (--reward_model). One step:

1. Rollout, no grad: sample G = --num_generations responses o_1..o_G ~ pi_old(.|q) for each prompt
   q at temperature T (top_k=0, top_p=1), cut after the first EOS; score each, R_i = sum_k w_k R_k(q, o_i).
   --overlong_buffer L adds DAPO's length reward: -p * max(0, |o_i| - (--max_new_tokens - L)) / L.
   --dynamic_sampling (DAPO): groups whose R are all equal (std 0: A = 0, no signal) are dropped and
   more prompts sampled, up to --max_resample_rounds times, until the batch is full of informative ones.
2. Advantage of o_i, the same for each of its tokens. The baseline (--advantage):
       grpo:  A_i = R_i - mean_group(R);    rloo: A_i = R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean_group(R))
   then divided (--scale_rewards) by std_group(R) + 1e-4 (group), the whole batch's std of R (batch), the
   whole batch's std of the A_i + 1e-4 (centered_batch: REINFORCE++-baseline), or nothing (none: Dr. GRPO).
   Stds with Bessel's correction.
3. --num_iterations optimizer steps on the rollout (with 1, pi_old is pi_theta detached: ratio 1 in value):
       ratio_t = pi_theta(o_t|q, o_<t) / pi_old(o_t|q, o_<t)          (log-probs of logits / T, float32)
       L_t  = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_t
       KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1               (k3, in the loss, not the reward)
   GSPO (--importance_sampling_level sequence): ratio_t = s_i = exp(mean_t log(pi_theta/pi_old)) for every
   token of o_i, one clip per sequence. CISPO (--loss_type cispo): L_t = -sg(clip(ratio_t)) * A_i *
   log pi_theta(o_t) + beta * KL_t, every token keeps its gradient. --use_bias_correction_kl: KL_t times
   ratio_t (per token; DeepSeek-V3.2), an unbiased estimate of KL(pi_theta || pi_ref) on pi_old's samples.
   Aggregated over the global batch (all micro-batches and ranks) by --loss_type:
       grpo:    mean over sequences of (token mean within the sequence)    (DeepSeekMath; GSPO's)
       dr_grpo: token sum / (number of sequences * --max_new_tokens)    (Dr. GRPO)
       dapo, cispo: token sum / number of response tokens              (DAPO; TRL's default; MiniMax-M1)
   --mask_truncated_completions leaves responses without EOS out of the loss (and its counts).

Sizes per device: a micro-batch is --batch_size prompts, so --batch_size * G sampled responses; a
rollout is --grad_accum micro-batches. The G responses of a prompt stay on one rank, so the group
statistics need no collective. --max_steps counts rollouts.

The defaults (--lr 1e-3, --batch_size 8, --max_steps 100) are tuned for the toy task: from out/sft,
`python grpo.py` raises the toy gold score 0.50 -> 0.91 in about a minute on one CPU core. For real
models set e.g. --lr 1e-6. The reward on the toy data is the gold score (toy/rewards.py:gold_reward).

    python sft.py && python grpo.py                          # the toy task on CPU: out/sft -> out/grpo
    torchrun --nproc_per_node=8 grpo.py --model my/sft --data math.jsonl --reward_fn verify.py:accuracy --lr 1e-6
    python grpo.py --loss_type dr_grpo --scale_rewards none  # Dr. GRPO;  --epsilon_high 0.28: DAPO's clip-higher
    python grpo.py --importance_sampling_level sequence --loss_type grpo --epsilon 3e-4 --epsilon_high 4e-4  # GSPO
"""
import math
import os
from typing import NamedTuple

import torch

import batching
import checkpoint
import common
import formats
import logprobs
import models
import reward_functions
import reward_models
from toy.eval import evaluate, is_toy
from toy.task import DATA_DIR as TOY_DATA_DIR, ensure_model, HERE as TOY_DIR, SFT_MODEL_DIR

TOY_REWARD_FN = os.path.join(TOY_DIR, "rewards.py") + ":gold_reward"


def group_advantages(rewards, num_generations, scale_rewards, advantage="grpo"):
    """A_i (N,) for rewards (N,) laid out as N / G groups of G consecutive responses:
        grpo: R_i - mean_group R;  rloo: R_i - mean_{j != i} R_j (the other scored responses of the group)
    divided by group: std_group R + 1e-4;  batch: the std of every rank's R + 1e-4;  centered_batch: the std
    of every rank's A + 1e-4;  none: 1. std with Bessel's correction. A NaN reward (no reward function scored
    the response) is left out of the means and stds, and its A is 0, as in TRL. Also returns each group's std
    (N / G,; NaN under two scored responses): a group whose rewards are all equal has A = 0, teaching nothing."""
    groups = rewards.view(-1, num_generations)
    advantages = (groups - groups.nanmean(-1, keepdim=True)).flatten()
    scored = (~groups.isnan()).sum(-1)
    group_std = torch.where(scored > 1, (advantages.view_as(groups) ** 2).nansum(-1) / (scored - 1), torch.nan).sqrt()
    if advantage == "rloo":  # R_i - (n mean - R_i) / (n - 1) = n / (n - 1) (R_i - mean), n scored in the group
        advantages = advantages * (scored / (scored - 1).clamp(min=1)).repeat_interleave(num_generations)
    if scale_rewards == "group":
        advantages = advantages / (group_std.repeat_interleave(num_generations) + 1e-4)
    elif scale_rewards in ("batch", "centered_batch"):
        _, batch_std = scored_mean_std(rewards if scale_rewards == "batch" else advantages, rewards.device)
        advantages = advantages / (batch_std + 1e-4)
    return advantages.nan_to_num(0.0), group_std


def scored_mean_std(rewards, device):
    """Mean and std (Bessel's correction) over every rank of the rewards that are not NaN; NaN if none is."""
    scored = ~rewards.isnan()
    if common.all_sum([float(scored.sum())], device)[0] == 0:
        return math.nan, math.nan
    return common.global_mean_std(rewards.nan_to_num(), device, scored.float())


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type, importance_sampling_level, epsilon_low,
              epsilon_high, beta, use_bias_correction_kl, n_sequences, n_tokens, max_new_tokens):
    """This micro-batch's part of the loss of the global batch:
        ratio_t = exp(logp_t - old_logp_t);  sequence (GSPO): exp(mean over the sequence's tokens of that)
        L_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
        cispo: L_t = -sg(clip(ratio_t, 1 - eps_low, 1 + eps_high)) * A * logp_t + beta * KL_t
        KL_t = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1          (k3: pi_ref/pi - log(pi_ref/pi) - 1)
               times exp(logp_t - old_logp_t) with use_bias_correction_kl (per token at either level)
        grpo:    sum over sequences of (token mean of L_t) / n_sequences
        dr_grpo: token sum of L_t / (n_sequences * max_new_tokens)
        dapo, cispo: token sum of L_t / n_tokens
    logps, old_logps, ref_logps (None when beta = 0), mask: (B, C); advantages: (B,). n_sequences, n_tokens:
    the counts of the global batch, so that its micro-batches and ranks add up to its loss. Also returns,
    per token (B, C): KL_t (k3) and whether the low or the high clip is active (ratio < 1 - eps_low with A < 0,
    ratio > 1 + eps_high with A > 0: the token has no gradient; cispo: the weight is clipped, whatever A)."""
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":  # the length-normalised sequence likelihood ratio, per token
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(mask)
    ratio, a = torch.exp(log_ratio), advantages[:, None]
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    if loss_type == "cispo":
        per_token = -clipped.detach() * a * logps
    else:
        per_token = -torch.min(ratio * a, clipped * a)
    kl = torch.zeros_like(logps)
    if beta > 0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl * (torch.exp(logps - old_logps) if use_bias_correction_kl else 1)
    per_token = per_token * mask
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_sequences
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (n_sequences * max_new_tokens)
    else:
        loss = per_token.sum() / n_tokens
    any_sign = loss_type == "cispo"
    low, high = (ratio < 1 - epsilon_low) & ((a < 0) | any_sign), (ratio > 1 + epsilon_high) & ((a > 0) | any_sign)
    return loss, kl.detach(), low.float(), high.float()


def grpo_step(logps, entropy, old_logps, ref_logps, advantages, mask, n_sequences, n_tokens, args):
    """A micro-batch of responses -> (its share of the global batch's loss, its shares of the global batch's
    token means, named). logps, entropy: the policy's (B, C); old_logps, ref_logps (None when --beta is 0),
    advantages (B,): the rollout's; mask: the tokens in the loss; n_sequences, n_tokens: the global batch's
    responses and response tokens in the loss."""
    loss, kl, low, high = grpo_loss(
        logps, old_logps, ref_logps, advantages, mask, loss_type=args.loss_type,
        importance_sampling_level=args.importance_sampling_level, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high, beta=args.beta, use_bias_correction_kl=args.use_bias_correction_kl,
        n_sequences=n_sequences, n_tokens=n_tokens, max_new_tokens=args.max_new_tokens)
    return loss, {"loss": loss, **({"kl": (kl * mask).sum() / n_tokens} if args.beta > 0 else {}),
                  "clip_ratio/low_mean": (low * mask).sum() / n_tokens,
                  "clip_ratio/high_mean": (high * mask).sum() / n_tokens,
                  "entropy": (entropy * mask).sum() / n_tokens}


class Group(NamedTuple):
    """A prompt example and its G sampled responses (id lists), whether each ended with EOS, their rewards (G lists
    of one per source), and the std of their total rewards (> 0: A != 0, something to learn; NaN under two scored)."""
    prompt: dict
    completions: list
    has_eos: list
    rewards: list
    std: float


@torch.no_grad()
def sample(policy, reward_model, reward_fns, reward_kwargs, weights, prompts, tokenizer, args, device):
    """G responses per prompt, scored: a Group per prompt. reward_kwargs: the reward functions' keywords besides
    the data columns; weights: one per reward source."""
    G, size = args.num_generations, args.local_rollout_forward_batch_size
    expanded = [p for p in prompts for _ in range(G)]
    completions = common.generate_completions(policy, expanded, tokenizer, device, size)
    stop = common.stop_ids(policy.generation_config, tokenizer)
    overlong = (args.max_new_tokens, args.overlong_buffer, args.overlong_penalty) if args.overlong_buffer else None
    rewards = reward_functions.score(expanded, completions, tokenizer, reward_fns, reward_kwargs, reward_model,
                                     overlong, device, size)
    _, group_std = group_advantages(reward_functions.total_rewards(rewards, weights), G, "none")
    return [Group(p, completions[i * G:(i + 1) * G], [c[-1] in stop for c in completions[i * G:(i + 1) * G]],
                  rewards[i * G:(i + 1) * G].tolist(), float(group_std[i])) for i, p in enumerate(prompts)]


@torch.no_grad()
def rollout_logps(policy, ref_model, batch, args):
    """The rollout's old_logps (with --num_iterations > 1) and ref_logps (with --beta > 0): (N, C) or None. The
    policy scores in eval mode, as it sampled; its mode is restored after."""
    size, parts = args.local_rollout_forward_batch_size, ([], [])
    with common.evaluating(policy):
        for i in range(0, len(batch["labels"]), size):
            chunk = {k: v[i:i + size] for k, v in batch.items()}
            if args.num_iterations > 1:
                parts[0].append(logprobs.token_logps(policy, chunk, args.temperature))
            if args.beta > 0:
                parts[1].append(logprobs.token_logps(ref_model, chunk, args.temperature))
    return [torch.cat(part) if part else None for part in parts]


def heldout_metrics(policy, reward_model, reward_fns, reward_kwargs, weights, chunks, tokenizer, args, device):
    """`eval/reward`: the mean weighted reward of G responses per held-out prompt, sampled as in training
    (seeded: the same draws at every evaluation, training RNG untouched), over the responses scored."""
    sums = common.Sums()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + common.rank())
        for chunk in chunks:
            groups = sample(policy, reward_model, reward_fns, reward_kwargs, weights, chunk, tokenizer, args, device)
            rewards = torch.tensor([r for g in groups for r in g.rewards], device=device)
            rewards = reward_functions.total_rewards(rewards, weights)
            sums.add({"reward": rewards.nansum(), "scored": (~rewards.isnan()).sum()})
    totals = sums.total(device)
    return {"eval/reward": totals["reward"] / totals["scored"] if totals["scored"] else math.nan}


def parse_args(argv=None):
    p = common.base_parser(__doc__, data=os.path.join(TOY_DATA_DIR, "prompts.jsonl"), model=SFT_MODEL_DIR,
                           lr=1e-3, max_steps=100, batch_size=8, output_dir="out/grpo", real_lr="1e-6")
    reward_functions.add_flags(p)
    p.add_argument("--num_generations", type=int, default=8, help="G, responses sampled per prompt")
    p.add_argument("--max_new_tokens", type=int, default=32,
                   help="response length limit when sampling; a response ends earlier at the tokenizer's EOS or "
                        "any eos_token_id of the model's generation_config (e.g. <end_of_turn>)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling and scoring temperature T")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model; DeepSeekMath: 0.04)")
    p.add_argument("--use_bias_correction_kl", action="store_true",
                   help="KL_t times ratio_t: unbiased off-policy (DeepSeek-V3.2; TRL 1.16's default)")
    p.add_argument("--epsilon", type=float, default=None, help="eps_low, the clip below 1 (default 0.2; cispo: 1, "
                   "no lower bound, as MiniMax-M1)")
    p.add_argument("--epsilon_high", type=float, default=None,
                   help="eps_high (default: --epsilon; DAPO: 0.28; cispo: 4, TRL's epsilon_high 5 = 1 + eps_high)")
    p.add_argument("--loss_type", default="dapo", choices=["grpo", "dr_grpo", "dapo", "cispo"],
                   help="how token losses add up: grpo: mean per response, then over responses; dr_grpo: sum / "
                        "(responses * max_new_tokens); dapo: mean over all response tokens; cispo: dapo's mean of "
                        "CISPO's loss")
    p.add_argument("--importance_sampling_level", default="token", choices=["token", "sequence"],
                   help="sequence: GSPO's one ratio per response (with --loss_type grpo, as the paper)")
    p.add_argument("--advantage", default="grpo", choices=["grpo", "rloo"],
                   help="baseline: the group mean (grpo) or the mean of the other G - 1 responses (rloo)")
    p.add_argument("--scale_rewards", default="group", choices=["group", "batch", "centered_batch", "none"],
                   help="divide advantages by the std of the group's rewards, of the batch's, of the batch's "
                        "advantages (REINFORCE++-baseline), or not at all (Dr. GRPO)")
    p.add_argument("--dynamic_sampling", action="store_true",
                   help="DAPO: drop groups of equal rewards and sample more prompts in their place")
    p.add_argument("--max_resample_rounds", type=int, default=3,
                   help="with --dynamic_sampling: sampling rounds after the first; then zero-std groups fill up")
    p.add_argument("--mask_truncated_completions", action="store_true", help="leave responses without EOS out of "
                   "the loss")
    p.add_argument("--overlong_buffer", type=int, default=0, help="L: DAPO's length penalty over the last L tokens "
                   "before --max_new_tokens (0: none)")
    p.add_argument("--overlong_penalty", type=float, default=1.0, help="p: the penalty at --max_new_tokens")
    p.add_argument("--num_iterations", type=int, default=1, help="mu, optimizer steps per rollout")
    p.add_argument("--local_rollout_forward_batch_size", type=int, default=64, help="rows per no-grad forward")
    p.add_argument("--num_sample_generations", type=int, default=10, help="times a sample is printed (0: never)")
    args = p.parse_args(argv)
    cispo = args.loss_type == "cispo"
    if args.epsilon is None:
        args.epsilon = 1.0 if cispo else 0.2
    if args.epsilon_high is None:
        args.epsilon_high = 4.0 if cispo else args.epsilon
    for name in ("max_new_tokens", "num_iterations", "local_rollout_forward_batch_size", "temperature", "epsilon",
                 "epsilon_high"):
        common.check_range(args, name, above=0)
    common.check_range(args, "num_generations", low=2)
    for name in ("beta", "max_resample_rounds", "overlong_penalty"):
        common.check_range(args, name, low=0)
    common.check_range(args, "overlong_buffer", low=0, high=args.max_new_tokens)
    if args.max_new_tokens >= args.max_length:
        raise common.UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt in "
                               f"--max_length {args.max_length}")
    args.reward_fn = reward_functions.check_flags(args.reward_fn, args.reward_model, args.reward_weights, args.data,
                                                  TOY_REWARD_FN if is_toy(args) else None)
    return args


def main(argv=None):
    args = parse_args(argv)
    common.check_args(args)
    ensure_model(args.model)
    device = common.setup(args)

    reward_fns = [reward_functions.load_reward_fn(spec) for spec in args.reward_fn]
    tokenizer, policy = models.load_policy(args, device)
    ref_model = models.load_reference(args, device, policy=policy) if args.beta > 0 else None  # LoRA: adapter off
    reward_model = None if args.reward_model is None else reward_models.load_frozen(
        args.reward_model, tokenizer, args.model, device, args.dtype, args.trust_remote_code, args.allow_pickle,
        args.padding_free, args.attn_implementation)
    names = [name for name, _ in reward_fns] + ["reward_model"] * (reward_model is not None)
    weights = torch.tensor((args.reward_weights or [1.0] * len(names)) + [1.0] * bool(args.overlong_buffer),
                           device=device)  # --overlong_penalty scales the overlong penalty
    names += ["overlong_penalty"] * bool(args.overlong_buffer)
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
            policy, reward_model, reward_fns, kwargs, weights, heldout, tokenizer, args, device) if heldout else {})}

    step_metrics = {}  # what the reward functions log_metric in this step's rollout: name -> values

    def log_metric(name, value):
        step_metrics.setdefault(name, []).append(float(value))

    logger = common.Logger(args, start, notes, headline=("loss", "reward"))
    if (toy or heldout) and start == 0:
        logger.log(0, evaluation(0))
    logger.tokens_per_second(device)  # start the step clock
    policy.train()  # the updates' mode, which rollouts and evaluations restore
    rounds = 1 + args.dynamic_sampling * args.max_resample_rounds
    global_prompts = args.batch_size * args.grad_accum * common.world()
    for step in range(start + 1, args.max_steps + 1):
        step_metrics.clear()
        kwargs = reward_functions.reward_kwargs(step - 1, args.max_steps, log_metric)
        groups, sampled = [], common.Sums()
        for k in range(rounds):  # round k takes the data's global batch (step - 1) * rounds + k: resume-safe
            new = sample(policy, reward_model, reward_fns, kwargs, weights, [p for mb in batching.micro_batches(
                prompts, (step - 1) * rounds + k, args) for p in mb], tokenizer, args, device)
            sampled.add({"frac_reward_zero_std": sum(g.std == 0 for g in new), "groups": len(new)})
            groups += batching.gather_global(new, args.batch_size) if args.dynamic_sampling else new
            if sum(g.std > 0 for g in groups) >= global_prompts:
                break
        if args.dynamic_sampling:  # every rank has every group, and all keep the same: the first informative ones
            kept = sorted(sorted(range(len(groups)), key=lambda i: not groups[i].std > 0)[:global_prompts])
            groups = batching.rank_share([groups[i] for i in kept], args.batch_size)
        batch_prompts = [g.prompt for g in groups]
        completions = [c for g in groups for c in g.completions]
        batch = batching.collate([g.prompt["prompt"] for g in groups for _ in g.completions], completions,
                                 tokenizer.pad_token_id, device)
        has_eos = torch.tensor([e for g in groups for e in g.has_eos], device=device)
        source_rewards = torch.tensor([r for g in groups for r in g.rewards], device=device)
        rollout_old, rollout_ref = rollout_logps(policy, ref_model, batch, args)
        rewards = reward_functions.total_rewards(source_rewards, weights)
        advantages, _ = group_advantages(rewards, args.num_generations, args.scale_rewards, args.advantage)
        mask = (batch["labels"] != -100).float()
        loss_mask = mask * has_eos[:, None] if args.mask_truncated_completions else mask
        n_responses, n_sequences, n_tokens = common.all_sum(
            [len(mask), float((loss_mask.sum(-1) > 0).sum()), float(loss_mask.sum())], device)
        n_sequences, n_tokens = max(n_sequences, 1), max(n_tokens, 1)  # every response masked: loss 0
        sums, grad_norm = common.Sums(), 0.0
        for _ in range(args.num_iterations):
            for start in range(0, len(mask), args.batch_size * args.num_generations):
                rows = slice(start, start + args.batch_size * args.num_generations)
                mb = {k: v[rows] for k, v in batch.items()}
                logps, entropy = logprobs.logps_and_entropy(policy, mb, args.temperature)
                old = rollout_old[rows] if args.num_iterations > 1 else logps.detach()
                ref = rollout_ref[rows] if args.beta > 0 else None
                loss, metrics = grpo_step(logps, entropy, old, ref, advantages[rows], loss_mask[rows], n_sequences,
                                          n_tokens, args)
                (loss * common.world()).backward()  # FSDP averages gradients over ranks
                sums.add(metrics)
                logger.count(mb)
            grad_norm += float(common.clip_and_step(policy, optimizer, scheduler, args.max_grad_norm))
        grad_norm /= args.num_iterations

        if step % args.log_every == 0 or step == args.max_steps:
            reward, reward_std = scored_mean_std(rewards, device)
            source_means = reward_functions.source_means(source_rewards, names, device)
            reward_fn_metrics = common.Sums()  # every rank's functions must log the same names, as in TRL
            reward_fn_metrics.add({name: sum(values) / len(values) for name, values in step_metrics.items()})
            responses = common.Sums()
            responses.add({"completions/mean_length": mask.sum(), "completions/clipped_ratio": (~has_eos).sum()})
            counts = sampled.total(device)  # frac_reward_zero_std: of every group sampled, before any is dropped
            logger.log(step, {
                "reward": reward, "reward_std": reward_std, **source_means,
                **common.means(responses.total(device), n_responses),
                "frac_reward_zero_std": counts["frac_reward_zero_std"] / counts["groups"],
                **({"num_gen_batches": k + 1} if args.dynamic_sampling else {}),
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
