"""DPO: direct preference optimisation on (prompt, chosen, rejected) pairs, with cDPO, IPO, RPO, R-DPO and SamPO.

    h = (logp_theta(y_w|x) - logp_ref(y_w|x)) - (logp_theta(y_l|x) - logp_ref(y_l|x))
    DPO:    L = -logsig(beta*h)
    cDPO:   L = -(1-eps)*logsig(beta*h) - eps*logsig(-beta*h)          --label_smoothing eps
    IPO:    L = (h - 1/(2*beta))^2                                      --loss_type ipo
    R-DPO:  L = -logsig(beta*h + rdpo_alpha*(|y_w| - |y_l|))            --rdpo_alpha
    RPO:    L += rpo_alpha * NLL(y_w), a per-token mean over the chosen --rpo_alpha
    SamPO:  each logp(y) sums only min(|y_w|, |y_l|) of y's tokens, drawn at random without
            replacement (the same tokens for policy and reference)     --sampo

logp(y|x) is the sum of the response-token log-probs; |y| counts response tokens (EOS included).
The implicit reward is r(y) = beta*(logp_theta(y|x) - logp_ref(y|x)); the reference is a frozen
copy of --model (or --ref_model). L is the mean over the pairs of the global batch.

Data: JSONL with `prompt`, `chosen`, `rejected` (strings or lists of {"role", "content"} messages),
or chosen/rejected conversations with the prompt implicit or repeated (H4): README, Bring your own data.
The defaults suit the toy task (a tiny model, lr 1e-3); real models want --lr ~5e-7.

    python sft.py && python dpo.py                          # toy task, starts from out/sft, CPU
    torchrun --nproc_per_node=8 dpo.py --model my-sft-model --data pairs.jsonl --lr 5e-7 --max_steps 2000
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
from toy.eval import evaluate, is_toy
from toy.task import DATA_DIR as TOY_DATA_DIR, SFT_MODEL_DIR, ensure_model


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, label_smoothing=0.0, loss_type="sigmoid", rdpo_term=0.0):
    """Per-pair losses (B,) and the implicit rewards beta*(logp - ref_logp) of chosen and rejected (detached).

        h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
        sigmoid: L = -(1-eps)*logsig(z) - eps*logsig(-z),  z = beta*h + rdpo_term,  eps = label_smoothing
        ipo:     L = (h - 1/(2*beta))^2

    `rdpo_term` (scalar or (B,)) is R-DPO's rdpo_alpha*(|y_w| - |y_l|) (Park et al. 2024, eq. 9): a longer
    chosen response raises z, so the pair weighs less. 0 gives DPO (eps = 0) or cDPO (eps > 0).
    """
    chosen_ratios = chosen_logps - ref_chosen_logps
    rejected_ratios = rejected_logps - ref_rejected_logps
    h = chosen_ratios - rejected_ratios
    if loss_type == "sigmoid":
        z = beta * h + rdpo_term
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


def sampo_mask(mask, generator):
    """SamPO: keep min(|y_w|, |y_l|) random response tokens of each response, without replacement.

    mask: (2B, C) response-token mask, chosen rows then rejected rows. Returns the (2B, C) mask of kept tokens.
    """
    keep = torch.minimum(*mask.sum(-1).chunk(2)).repeat(2)
    keys = torch.rand(mask.shape, generator=generator).to(mask.device).masked_fill(~mask, 2.0)  # padding sorts last
    place = keys.argsort(-1).argsort(-1)  # each token's place in a random order of its row's tokens
    return place < keep[:, None]


def pair_logps(policy_logps, ref_logps, mask, sampo_generator=None):
    """(chosen, rejected, ref_chosen, ref_rejected) summed log-probs (B,) from (2B, C) per-token log-probs,
    chosen rows then rejected; with a generator, each sums SamPO's random min(|y_w|, |y_l|) of its tokens."""
    if sampo_generator is not None:
        mask = sampo_mask(mask, sampo_generator)
    return (*(policy_logps * mask).sum(-1).chunk(2), *(ref_logps * mask).sum(-1).chunk(2))


def dpo_step(policy_logps, ref_logps, mask, n_pairs, n_chosen, args, generator):
    """A micro-batch of pairs -> (its share of the global batch's loss, named sums over its pairs).

    policy_logps, ref_logps: (2B, C) per-token log-probs, chosen rows then rejected; mask: their response
    tokens; n_pairs, n_chosen: the global batch's pairs and chosen tokens, which the loss averages over.
    Training and the held-out pass both call it, so eval/loss is the training loss."""
    chosen, rejected, ref_chosen, ref_rejected = pair_logps(policy_logps, ref_logps, mask,
                                                            generator if args.sampo else None)
    chosen_len, rejected_len = mask.sum(-1).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, args.beta, args.label_smoothing, args.loss_type,
        rdpo_term=args.rdpo_alpha * (chosen_len - rejected_len))
    loss = losses.sum() / n_pairs
    if args.rpo_alpha:  # RPO: minus the chosen responses' log-likelihood, a token mean
        loss = loss - args.rpo_alpha * policy_logps.chunk(2)[0].sum() / n_chosen
    return loss, {
        "loss": loss,
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).sum(),
        "logps/chosen": chosen.sum(),
        "logps/rejected": rejected.sum(),
    }


def parse_args(argv=None):
    p = common.base_parser(__doc__, data=os.path.join(TOY_DATA_DIR, "pairs.jsonl"), model=SFT_MODEL_DIR,
                           lr=1e-3, max_steps=100, batch_size=16, real_lr="5e-7", eval_file="eval_pairs.jsonl",
                           output_dir="out/dpo")
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    p.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo"],
                   help="sigmoid: the DPO loss; ipo: IPO's squared loss, which stops at a finite margin")
    p.add_argument("--label_smoothing", type=float, default=0.0, help="cDPO: the share of flipped labels, in [0, 0.5)")
    p.add_argument("--rpo_alpha", type=float, default=0.0,
                   help="weight of an SFT term, the NLL of the chosen responses (token mean): 0 is plain DPO, "
                        "1.0 (RPO) often keeps responses shorter")
    p.add_argument("--rdpo_alpha", type=float, default=0.0,
                   help="R-DPO: add rdpo_alpha*(|y_w| - |y_l|) (tokens) to beta*h; a longer chosen response weighs less")
    p.add_argument("--sampo", action="store_true", help="SamPO: down-sample both responses to the shorter one's length")
    p.add_argument("--ref_model", default=None, help="reference model (default: a frozen copy of --model)")
    p.add_argument("--precompute_ref", action="store_true",
                   help="score the data with the reference once before training, then free it")
    args = p.parse_args(argv)
    common.check_range(args, "beta", above=0)
    if not 0 <= args.label_smoothing < 0.5:
        raise common.UserError(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.loss_type == "ipo" and (args.label_smoothing or args.rdpo_alpha):
        raise common.UserError("--loss_type ipo takes neither --label_smoothing nor --rdpo_alpha")
    return args


def heldout_metrics(model, chunks, ref_logps, args, pad_id, device):
    """dpo_step's metrics over the held-out pairs, as eval/...: this rank's chunks, and the reference's
    per-token log-probs of each (computed once)."""
    generator = torch.Generator().manual_seed(args.seed)  # the same SamPO draw at every evaluation
    n_pairs, n_chosen = common.all_sum([sum(map(len, chunks)), sum(len(e["chosen"]) for c in chunks for e in c)], device)
    sums = common.Sums()
    with common.evaluating(model):
        for chunk, ref in zip(chunks, ref_logps):
            batch = batching.collate_pairs(chunk, pad_id, device)
            sums.add(dpo_step(logprobs.token_logps(model, batch), ref, batch["labels"] != -100, n_pairs, n_chosen,
                              args, generator)[1])
    return common.means(sums.total(device), n_pairs, prefix="eval/")


def main(argv=None):
    args = parse_args(argv)
    common.check_args(args)
    ensure_model(args.model)
    device = common.setup(args)

    tokenizer, model = models.load_policy(args, device)
    ref_path = args.ref_model or args.model
    ref_model = models.load_reference(args, device, args.ref_model, policy=model)  # LoRA: the adapter off
    if ref_model.config.vocab_size != model.config.vocab_size:
        raise common.UserError(f"--ref_model {ref_path} has another vocabulary than --model {args.model}")
    fields = ("chosen", "rejected")
    notes = []

    def load(path):
        rows, note = formats.read_data(path, fields)
        notes.append(note)
        return formats.tokenize(rows, tokenizer, args.max_length, fields)

    examples = load(args.data)
    optimizer, scheduler = common.make_optimizer(model, args)
    pad_id, toy = tokenizer.pad_token_id, is_toy(args)

    heldout = args.eval_data and batching.heldout_chunks(load(args.eval_data), args.batch_size)
    if heldout:  # scored by the reference once, as the reference never changes
        with torch.no_grad():
            heldout_ref = [logprobs.token_logps(ref_model, batching.collate_pairs(c, pad_id, device)) for c in heldout]
    if args.precompute_ref:
        logprobs.precompute_ref_logps(ref_model, examples, args.batch_size, pad_id, device)
        ref_model = None

    state = checkpoint.TrainState(args, tokenizer, examples, model, optimizer, scheduler)
    start = state.resume()

    def evaluation():
        return {**(evaluate(model, tokenizer, args, device) if toy else {}),
                **(heldout_metrics(model, heldout, heldout_ref, args, pad_id, device) if heldout else {})}

    logger = common.Logger(args, start, notes)
    if (toy or heldout) and start == 0:
        logger.log(0, evaluation())
    generator = torch.Generator()  # SamPO's draws, reseeded each step so that a resumed run draws the same
    model.train()
    for step in range(start + 1, args.max_steps + 1):
        generator.manual_seed(args.seed + 1_000_003 * step + common.rank())
        micro = batching.micro_batches(examples, step - 1, args)
        n_pairs = args.batch_size * len(micro) * common.world()  # the loss is a mean over the global batch
        (n_chosen,) = common.all_sum([sum(len(e["chosen"]) for mb in micro for e in mb)], device)  # RPO's token mean
        sums = common.Sums()
        for mb in micro:
            batch = batching.collate_pairs(mb, pad_id, device)
            policy_logps = logprobs.token_logps(model, batch)
            with torch.no_grad():
                ref_logps = (logprobs.token_logps(ref_model, batch) if ref_model is not None
                             else logprobs.precomputed_ref_logps(mb, device))
            loss, metrics = dpo_step(policy_logps, ref_logps, batch["labels"] != -100, n_pairs, n_chosen, args,
                                     generator)
            (loss * common.world()).backward()  # FSDP averages gradients over ranks
            sums.add(metrics)
            logger.count(batch)
        grad_norm = common.clip_and_step(model, optimizer, scheduler, args.max_grad_norm)

        if step % args.log_every == 0 or step == args.max_steps:
            logger.log(step, {**common.means(sums.total(device), n_pairs), "lr": scheduler.get_last_lr()[0],
                              "grad_norm": float(grad_norm), "tokens/s": logger.tokens_per_second(device)})
        if (toy or heldout) and (step == args.max_steps or (args.eval_every and step % args.eval_every == 0)):
            logger.log(step, evaluation())
        logger.update()
        state.end_step(step, loss=sums.values["loss"], grad_norm=grad_norm)

    checkpoint.save_model(model, tokenizer, args.output_dir, models.save_dtype(args), args.merge_lora)
    logger.close()


if __name__ == "__main__":
    common.run(main)
