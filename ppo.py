"""PPO (RLHF stage 3): train the policy against a frozen reward model, with a KL penalty to a reference.

Four models: the policy pi (from --model, trained), the reference pi_ref (a frozen copy of --model),
the reward model r (from --reward_model, frozen) and the value model V (a copy of the reward model,
backbone and head, trained). One iteration:

1. Rollout, no grad: sample y ~ pi(.|x) for a batch of prompts at temperature T (top_k=0, top_p=1),
   cut after the first EOS, and score it: old_logp_t and ref_logp_t (logits / T), V_old_t, score = r(x, y).
2. Rewards:  r_t = -kl_coef * (old_logp_t - ref_logp_t), plus the score at the last response token
   (optionally clipped to +-score_clip, minus missing_eos_penalty without EOS, whitened).
3. GAE, backwards over the response (r, V, A are 0 past its end), A then whitened over the batch:
       delta_t = r_t + gamma * V_{t+1} - V_t      A_t = delta_t + gamma * lam * A_{t+1}      ret_t = A_t + V_t
4. For ppo_epochs, for every minibatch (masked means over its response tokens):
       ratio_t = exp(logp_t - old_logp_t)
       pg   = mean max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))
       vf   = 0.5 * mean max((V_t - ret_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - ret_t)^2)
       loss = pg + vf_coef * vf                  (eps = --cliprange, eps_v = --cliprange_value)

Sizes per device: a micro-batch is --batch_size rows, a minibatch (one optimizer step of each model)
--grad_accum micro-batches, a rollout --num_mini_batches minibatches; --max_steps counts rollouts.

    python sft.py && python rm.py && python ppo.py          # the toy pipeline on CPU: out/sft -> out/rm -> out/ppo
    torchrun --nproc_per_node=8 ppo.py --model my/sft --reward_model my/rm --data prompts.jsonl --lr 1e-6
    python ppo.py --save_every 10 --resume                  # pre-emptible: rerun the same command
"""
import os
from typing import NamedTuple

import torch

import batching
import checkpoint
import common
import formats
import logprobs
import lora
import models
import reward_models
from toy.eval import evaluate, is_toy
from toy.task import DATA_DIR as TOY_DATA_DIR, SFT_MODEL_DIR, ensure_model


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def gae(rewards, values, mask, gamma, lam):
    """Advantages and returns (B, C), computed backwards over the response tokens:
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},   ret_t = A_t + V_t
    with r, V (hence A and ret) taken as 0 where mask is 0, i.e. past each response's end."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def policy_loss(logps, old_logps, advantages, mask, cliprange):
    """Clipped surrogate: masked mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),
    ratio = exp(logp - old_logp). clipfrac: share of tokens where the clipped term is the larger one."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values, old_values, returns, mask, cliprange_value):
    """0.5 * masked mean of max((V - ret)^2, (clip(V, V_old - eps_v, V_old + eps_v) - ret)^2).
    clipfrac: share of tokens where the clipped error is the larger one."""
    clipped_values = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def kl_rewards(old_logps, ref_logps, scores, mask, kl_coef):
    """Per-token rewards (B, C): -kl_coef * (logp_t - ref_logp_t) on response tokens, plus each row's
    score on its last response token (the EOS, or the last token when generation was cut off)."""
    rewards = -kl_coef * (old_logps - ref_logps) * mask
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(last), device=last.device), last] += scores
    return rewards


def whiten(x, mask, device, shift_mean=True):
    """(x - mean) / std over the response tokens of every rank; shift_mean=False adds the mean back."""
    mean, std = common.global_mean_std(x, device, mask)
    return ((x - mean) / (std + 1e-8) + (0.0 if shift_mean else mean)) * mask


def token_values(value_model, batch):
    """(B, C) values V_t, read where the policy predicts response token t: the state before it."""
    values = logprobs.position_outputs(value_model, batch)  # packed or padded forward, padded layout
    return values[:, -batch["labels"].shape[1] - 1:-1]


class Rollout(NamedTuple):
    """Sampled responses and their no-grad scores: the scoring batch (batching.collate layout), has_eos (B,),
    the policy's old_logps, the reference's ref_logps and the value model's old_values (B, C), and the reward
    model's scores (B,)."""
    batch: dict
    has_eos: torch.Tensor
    old_logps: torch.Tensor
    ref_logps: torch.Tensor
    old_values: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def rollout(policy, ref_model, reward_model, value_model, prompts, tokenizer, args, device):
    """Sample one response per prompt, then score it, in chunks of --local_rollout_forward_batch_size: a Rollout.
    The policy scores in eval mode, as it sampled; its mode is restored after. Each model scores every chunk in
    turn, gathered once under FSDP2 (models.unsharded), so at most one model is held whole at a time."""
    size = args.local_rollout_forward_batch_size
    completions = common.generate_completions(policy, prompts, tokenizer, device, size)
    batch = batching.collate([p["prompt"] for p in prompts], completions, tokenizer.pad_token_id, device)
    stop = common.stop_ids(policy.generation_config, tokenizer)
    has_eos = torch.tensor([c[-1] in stop for c in completions], device=device)
    chunks = [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, len(prompts), size)]
    scorers = {"old_logps": (policy, lambda c: logprobs.token_logps(policy, c, args.temperature)),
               "ref_logps": (ref_model, lambda c: logprobs.token_logps(ref_model, c, args.temperature)),
               "old_values": (value_model, lambda c: token_values(value_model, c)),
               "scores": (reward_model, lambda c: logprobs.last_token_outputs(reward_model, c))}
    parts = {}
    with common.evaluating(policy):
        for name, (model, score) in scorers.items():  # one model at a time, gathered once for all its chunks
            with models.unsharded(model):
                parts[name] = torch.cat([score(chunk) for chunk in chunks])
    return Rollout(batch, has_eos, **parts)


def ppo_step(logps, entropy, values, mask, targets, n_tokens, args):
    """A micro-batch of the rollout -> (its share of the minibatch's loss, its shares of the minibatch's token
    means, named). logps, entropy: the policy's (B, C); values: the value model's (B, C); mask: the response
    tokens; targets: a mapping with these rows' old_logps, old_values, advantages and returns; n_tokens: the
    minibatch's response tokens over all its micro-batches and ranks."""
    pg, pg_clipfrac = policy_loss(logps, targets["old_logps"], targets["advantages"], mask, args.cliprange)
    vf, vf_clipfrac = value_loss(values, targets["old_values"], targets["returns"], mask, args.cliprange_value)
    weight = mask.sum() / n_tokens
    return (pg + args.vf_coef * vf) * weight, {
        "loss/policy_avg": weight * pg, "loss/value_avg": weight * vf,
        "policy/clipfrac": weight * pg_clipfrac, "val/clipfrac": weight * vf_clipfrac,
        "policy/entropy_avg": weight * masked_mean(entropy, mask)}


def heldout_metrics(policy, ref_model, reward_model, value_model, chunks, tokenizer, args, device):
    """`eval/scores`: the reward model's mean score of responses sampled, as in rollout (seeded: the same draws
    at every evaluation, training RNG untouched), for this rank's held-out prompts."""
    sums = common.Sums()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + common.rank())
        for chunk in chunks:
            sums.add({"scores": rollout(policy, ref_model, reward_model, value_model, chunk, tokenizer, args,
                                        device).scores.sum()})
    (n,) = common.all_sum([sum(map(len, chunks))], device)
    return common.means(sums.total(device), n, prefix="eval/")


def parse_args(argv=None):
    p = common.base_parser(__doc__, data=os.path.join(TOY_DATA_DIR, "prompts.jsonl"), model=SFT_MODEL_DIR,
                           lr=3e-4, max_steps=100, batch_size=16, output_dir="out/ppo", real_lr="1e-6")
    p.add_argument("--reward_model", default="out/rm", help="the reward model: a directory rm.py wrote")
    p.add_argument("--max_new_tokens", type=int, default=32,
                   help="response length limit when sampling; a response ends earlier at the tokenizer's EOS or "
                        "any eos_token_id of the model's generation_config (e.g. <end_of_turn>)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling and scoring temperature T")
    p.add_argument("--kl_coef", type=float, default=0.05,
                   help="weight of the per-token KL penalty to the reference in the reward: higher keeps the policy "
                        "closer to --model and harder to reward-hack (usual: 0.01 to 0.1)")
    p.add_argument("--cliprange", type=float, default=0.2,
                   help="policy clip eps: an update gains nothing by moving a token's probability ratio new/old "
                        "outside [1 - eps, 1 + eps]")
    p.add_argument("--vf_coef", type=float, default=0.1, help="weight of the value model's loss next to the policy's")
    p.add_argument("--cliprange_value", type=float, default=0.2,
                   help="value clip: an update gains nothing by moving a value more than this from its rollout value")
    p.add_argument("--gamma", type=float, default=1.0, help="discount per token of later rewards (1: none, usual)")
    p.add_argument("--lam", type=float, default=0.95,
                   help="GAE lambda: 0 estimates advantages from the next value only (low variance, biased), "
                        "1 from the whole rest of the response")
    p.add_argument("--whiten_rewards", action="store_true",
                   help="scale the per-token rewards to unit variance over the rollout before GAE")
    p.add_argument("--score_clip", type=float, default=None,
                   help="clip reward-model scores to +-this (default: no clipping; DeepSpeed-Chat uses 5)")
    p.add_argument("--missing_eos_penalty", type=float, default=None,
                   help="subtracted from the score of a response cut off before EOS (default: none)")
    p.add_argument("--ppo_epochs", type=int, default=4, help="passes over each rollout")
    p.add_argument("--num_mini_batches", type=int, default=4, help="optimizer steps per pass")
    p.add_argument("--local_rollout_forward_batch_size", type=int, default=64, help="rows per sampling and scoring forward (no grad); lower it if memory runs out")
    p.add_argument("--num_sample_generations", type=int, default=10, help="how many times a sampled response is printed during training (0: never)")
    p.add_argument("--save_value_model", action="store_true", help="also save the value model (output_dir/value_model)")
    args = p.parse_args(argv)
    for name in ("max_new_tokens", "ppo_epochs", "num_mini_batches", "local_rollout_forward_batch_size",
                 "temperature", "cliprange", "cliprange_value"):
        common.check_range(args, name, above=0)
    for name in ("kl_coef", "vf_coef"):
        common.check_range(args, name, low=0)
    for name in ("gamma", "lam"):
        common.check_range(args, name, low=0, high=1)
    if args.max_new_tokens >= args.max_length:
        raise common.UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt in "
                               f"--max_length {args.max_length}")
    return args


def main(argv=None):
    args = parse_args(argv)
    common.check_args(args)
    ensure_model(args.model)
    device = common.setup(args)

    tokenizer, policy = models.load_policy(args, device)
    ref_model = models.load_reference(args, device, policy=policy)  # LoRA: the adapter off
    reward_model = reward_models.load_frozen(args.reward_model, tokenizer, args.model, device, args.dtype,
                                             args.trust_remote_code, args.allow_pickle, args.padding_free,
                                             args.attn_implementation)
    value_model = reward_models.load_reward_model(  # with --lora_r a LoRA backbone too, its head trained in full
        args.reward_model, device, args.dtype, args.trust_remote_code, args.allow_pickle, True, args.padding_free,
        lora.config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules, args.reward_model),
        args.seed, args.attn_implementation)
    if args.gradient_checkpointing:
        value_model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    generation_config = common.set_sampling(policy, args, tokenizer)
    # the schedules run over every optimizer step: ppo_epochs * num_mini_batches per rollout
    n_updates = args.max_steps * args.ppo_epochs * args.num_mini_batches
    policy_optimizer, policy_scheduler = common.make_optimizer(policy, args, total_steps=n_updates)
    value_optimizer, value_scheduler = common.make_optimizer(value_model, args, total_steps=n_updates)
    value_model.train()

    notes = []

    def load(path):
        rows, note = formats.read_data(path, ())
        notes.append(note)
        return formats.tokenize(rows, tokenizer, args.max_length - args.max_new_tokens, ())

    prompts = load(args.data)
    heldout = args.eval_data and batching.heldout_chunks(load(args.eval_data), args.local_rollout_forward_batch_size)
    rollout_accum = args.grad_accum * args.num_mini_batches  # a rollout is num_mini_batches minibatches
    sample_every = max(1, args.max_steps // args.num_sample_generations) if args.num_sample_generations else 0
    toy = is_toy(args)

    torch.manual_seed(args.seed + common.rank())  # every rank samples differently; before resume restores RNG
    state = checkpoint.TrainState(args, tokenizer, prompts, policy, policy_optimizer, policy_scheduler,
                                  grad_accum=rollout_accum, value=value_model, value_optimizer=value_optimizer,
                                  value_scheduler=value_scheduler)
    start = state.resume()

    def evaluation():
        return {**(evaluate(policy, tokenizer, args, device) if toy else {}), **(heldout_metrics(
            policy, ref_model, reward_model, value_model, heldout, tokenizer, args, device) if heldout else {})}

    logger = common.Logger(args, start, notes, headline=("objective/scores",))
    if (toy or heldout) and start == 0:
        logger.log(0, evaluation())
    logger.tokens_per_second(device)  # start the rollout clock
    n_minibatches = args.ppo_epochs * args.num_mini_batches
    policy.train()  # the updates' mode, which rollouts and evaluations restore
    for step in range(start + 1, args.max_steps + 1):
        batch_prompts = [p for mb in batching.micro_batches(prompts, step - 1, args, rollout_accum) for p in mb]
        sampled = rollout(policy, ref_model, reward_model, value_model, batch_prompts, tokenizer, args, device)
        batch = sampled.batch
        logger.count(batch)
        rollout_speed = logger.tokens_per_second(device)

        mask = (batch["labels"] != -100).float()
        scores = sampled.scores
        if args.score_clip is not None:
            scores = scores.clamp(-args.score_clip, args.score_clip)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~sampled.has_eos).float()
        rewards = kl_rewards(sampled.old_logps, sampled.ref_logps, scores, mask, args.kl_coef)
        if args.whiten_rewards:
            rewards = whiten(rewards, mask, device, shift_mean=False)
        advantages, returns = gae(rewards, sampled.old_values, mask, args.gamma, args.lam)
        targets = {"old_logps": sampled.old_logps, "old_values": sampled.old_values,
                   "advantages": whiten(advantages, mask, device), "returns": returns}
        sums = common.Sums()
        for _ in range(args.ppo_epochs):
            order = torch.randperm(len(mask))  # on the host, as the batch's spans are
            for rows in order.split(args.batch_size * args.grad_accum):  # a minibatch: one step of each model
                minibatch = batching.take({**batch, **targets, "mask": mask}, rows, device)
                (n_tokens,) = common.all_sum([float(minibatch["mask"].sum())], device)  # over its micro-batches, ranks
                for i in range(0, len(rows), args.batch_size):
                    mb = {k: v[i:i + args.batch_size] for k, v in minibatch.items()}
                    logps, entropy = logprobs.logps_and_entropy(policy, mb, args.temperature)
                    loss, metrics = ppo_step(logps, entropy, token_values(value_model, mb), mb["mask"], mb, n_tokens,
                                             args)
                    (loss * common.world()).backward()  # FSDP averages gradients over ranks
                    sums.add(metrics)
                    logger.count(mb)
                common.clip_and_step(policy, policy_optimizer, policy_scheduler, args.max_grad_norm)
                common.clip_and_step(value_model, value_optimizer, value_scheduler, args.max_grad_norm)
        update_speed = logger.tokens_per_second(device)

        if step % args.log_every == 0 or step == args.max_steps:
            responses = common.Sums()
            responses.add({"objective/kl": ((sampled.old_logps - sampled.ref_logps) * mask).sum(-1).sum(),
                           "objective/scores": scores.sum(), "response/mean_length": mask.sum(),
                           "response/eos_fraction": sampled.has_eos.sum()})
            objective = common.means(responses.total(device), len(mask) * common.world())
            logger.log(step, {
                **objective,
                "objective/rlhf_reward": objective["objective/scores"] - args.kl_coef * objective["objective/kl"],
                **common.means(sums.total(device), n_minibatches),  # each minibatch's token means, averaged
                "lr": policy_scheduler.get_last_lr()[0],
                "tokens/s/rollout": rollout_speed, "tokens/s/update": update_speed,
            })
        if sample_every and step % sample_every == 0 and common.rank() == 0:
            response = batch["labels"][0][mask[0].bool()]
            logger.bar.write(f"[step {step}] {tokenizer.decode(batch_prompts[0]['prompt'], skip_special_tokens=True)!r}"
                             f" -> {tokenizer.decode(response)!r} (score {float(scores[0]):.3f})")
        if (toy or heldout) and (step == args.max_steps or (args.eval_every and step % args.eval_every == 0)):
            logger.log(step, evaluation())
        logger.update()
        state.end_step(step, loss_policy=sums.values["loss/policy_avg"], loss_value=sums.values["loss/value_avg"])

    policy.generation_config = generation_config  # save the checkpoint's own generation defaults, not PPO's
    checkpoint.save_model(policy, tokenizer, args.output_dir, models.save_dtype(args), args.merge_lora)
    if args.save_value_model:
        reward_models.save_reward_model(value_model, tokenizer, os.path.join(args.output_dir, "value_model"),
                                        models.save_dtype(args))
    logger.close()


if __name__ == "__main__":
    common.run(main)
