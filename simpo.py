"""SimPO (and CPO with --loss cpo): preference optimization without a reference model.

SimPO (arXiv 2405.14734), with the length-normalized reward r(y) = beta * avg_logp(y|x):

    L = -logsig(beta * avg_logp(y_w|x) - beta * avg_logp(y_l|x) - gamma)  [+ cpo_alpha * NLL(y_w)]

CPO (arXiv 2401.08417, --loss cpo), DPO with a uniform reference, reward r(y) = beta * logp(y|x):

    L = -logsig(beta * logp(y_w|x) - beta * logp(y_l|x)) + cpo_alpha * NLL(y_w)

logp is the sum of response-token log-probs, avg_logp = logp / |y| (EOS included). NLL(y_w) is
the token mean over every chosen response token of the global batch, as in sft.py; the
preference term is the mean over the global batch's pairs. No reference model is loaded.

Defaults: SimPO beta 2.0, gamma 1.0, cpo_alpha 0 (the original SimPO; ms-swift documents
cpo_alpha 1.0, its NLL mix "for stability"). CPO: beta 0.1, cpo_alpha 1.0.
--lr defaults suit the toy model: 5e-5 for SimPO (which collapses there at 3e-4 without the
NLL mix), 3e-4 for CPO. SimPO is very sensitive to the learning rate; on real models the
paper uses 3e-7..1e-6.

Data: JSONL with `prompt`, `chosen`, `rejected` (strings or message lists), or chosen/rejected
conversations with the prompt implicit or repeated (H4; README, Bring your own data). Default: the toy pairs.

    python sft.py && python simpo.py                         # toy task, from out/sft, CPU
    python simpo.py --loss cpo                               # CPO
    torchrun --nproc_per_node=8 simpo.py --model my-sft-model --data pairs.jsonl --lr 5e-7 --max_steps 2000
    torchrun --nproc_per_node=8 simpo.py --loss cpo --model my-sft-model --data pairs.jsonl --lr 1e-6
"""
import os

import torch.nn.functional as F

import batching
import checkpoint
import common
import formats
import logprobs
import models
from toy.eval import evaluate, is_toy
from toy.task import DATA_DIR as TOY_DATA_DIR, SFT_MODEL_DIR, ensure_model


def simpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=2.0, gamma=1.0):
    """Per-pair SimPO losses -logsig(r_w - r_l - gamma) with rewards r = beta * logp / |y| (detached).

    chosen_logps, rejected_logps: (B,) summed response log-probs; *_lengths: (B,) response token counts.
    Returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    chosen_rewards = beta * chosen_logps / chosen_lengths
    rejected_rewards = beta * rejected_logps / rejected_lengths
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def cpo_loss(chosen_logps, rejected_logps, beta=0.1):
    """Per-pair CPO preference losses -logsig(r_w - r_l) with rewards r = beta * logp (detached).

    chosen_logps, rejected_logps: (B,) summed response log-probs. The NLL term is added by the caller.
    Returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    chosen_rewards = beta * chosen_logps
    rejected_rewards = beta * rejected_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


SHARES = ("loss", "nll_loss")  # simpo_step's metrics that are global-batch means already, not sums


def simpo_step(policy_logps, mask, n_pairs, n_chosen, args):
    """A micro-batch of pairs -> (its share of the global batch's loss, named sums over its pairs).

    policy_logps: (2B, C) per-token log-probs, chosen rows then rejected; mask: their response tokens;
    n_pairs, n_chosen: the global batch's pairs and chosen tokens, which the loss averages over. The logged
    logps are those the loss uses: averages for simpo, sums for cpo. nll_loss, like loss, is already this
    micro-batch's share of the global batch's. Training and the held-out pass both call it, so eval/loss is
    the training loss."""
    logps, lengths = policy_logps.sum(-1), mask.sum(-1)
    if args.loss == "cpo":
        losses, chosen_rewards, rejected_rewards = cpo_loss(*logps.chunk(2), args.beta)
        chosen, rejected = logps.chunk(2)
    else:
        losses, chosen_rewards, rejected_rewards = simpo_loss(*logps.chunk(2), *lengths.chunk(2), args.beta,
                                                              args.gamma)
        chosen, rejected = (logps / lengths).chunk(2)
    nll = -policy_logps.chunk(2)[0].sum() / n_chosen  # the chosen responses' NLL, a token mean
    loss = losses.sum() / n_pairs + args.cpo_alpha * nll
    return loss, {"loss": loss, "nll_loss": nll, "rewards/chosen": chosen_rewards.sum(),
                  "rewards/rejected": rejected_rewards.sum(),
                  "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).sum(),
                  "logps/chosen": chosen.sum(), "logps/rejected": rejected.sum()}


def parse_args(argv=None):
    p = common.base_parser(__doc__, data=os.path.join(TOY_DATA_DIR, "pairs.jsonl"), model=SFT_MODEL_DIR,
                           lr=None, max_steps=150, batch_size=16, real_lr="5e-7 for SimPO, 1e-6 for CPO",
                           eval_file="eval_pairs.jsonl", output_dir="out/simpo")
    p.add_argument("--loss", default="simpo", choices=["simpo", "cpo"],
                   help="simpo: length-normalised rewards and a target margin; cpo: summed log-probs and an SFT term")
    p.add_argument("--beta", type=float, default=None, help="reward scale (default: 2.0 for simpo, 0.1 for cpo)")
    p.add_argument("--gamma", type=float, default=None, help="SimPO's target reward margin "
                   "(default: 1.0; the paper uses gamma/beta about 0.5)")
    p.add_argument("--cpo_alpha", type=float, default=None,
                   help="weight of an SFT term, the NLL of the chosen responses (token mean); default 0 for simpo, "
                        "the original SimPO (1.0 often steadies it), and 1.0 for cpo")
    args = p.parse_args(argv)
    cpo = args.loss == "cpo"
    args.beta = (0.1 if cpo else 2.0) if args.beta is None else args.beta
    args.cpo_alpha = (1.0 if cpo else 0.0) if args.cpo_alpha is None else args.cpo_alpha
    args.lr = (3e-4 if cpo else 5e-5) if args.lr is None else args.lr  # on the toy task SimPO collapses at 3e-4
    common.check_range(args, "beta", above=0)
    common.check_range(args, "cpo_alpha", low=0)
    if cpo and args.gamma is not None:
        raise common.UserError("--gamma is SimPO's reward margin; --loss cpo has none")
    args.gamma = 1.0 if args.gamma is None else args.gamma
    return args


def heldout_metrics(model, chunks, args, pad_id, device):
    """simpo_step's metrics over the held-out pairs (this rank's chunks), as eval/..."""
    n_pairs, n_chosen = common.all_sum([sum(map(len, chunks)), sum(len(e["chosen"]) for c in chunks for e in c)], device)
    sums = common.Sums()
    with common.evaluating(model):
        for chunk in chunks:
            batch = batching.collate_pairs(chunk, pad_id, device)
            sums.add(simpo_step(logprobs.token_logps(model, batch), batch["labels"] != -100, n_pairs, n_chosen,
                                args)[1])
    return common.means(sums.total(device), n_pairs, "eval/", SHARES)


def main(argv=None):
    args = parse_args(argv)
    common.check_args(args)
    ensure_model(args.model)
    device = common.setup(args)

    tokenizer, model = models.load_policy(args, device)
    fields = ("chosen", "rejected")
    notes = []

    def load(path):
        rows, note = formats.read_data(path, fields)
        notes.append(note)
        return formats.tokenize(rows, tokenizer, args.max_length, fields)

    examples = load(args.data)
    heldout = args.eval_data and batching.heldout_chunks(load(args.eval_data), args.batch_size)
    optimizer, scheduler = common.make_optimizer(model, args)
    pad_id, toy = tokenizer.pad_token_id, is_toy(args)

    state = checkpoint.TrainState(args, tokenizer, examples, model, optimizer, scheduler)
    start = state.resume()

    def evaluation():
        return {**(evaluate(model, tokenizer, args, device) if toy else {}),
                **(heldout_metrics(model, heldout, args, pad_id, device) if heldout else {})}

    logger = common.Logger(args, start, notes)
    if (toy or heldout) and start == 0:
        logger.log(0, evaluation())
    model.train()
    for step in range(start + 1, args.max_steps + 1):
        micro = batching.micro_batches(examples, step - 1, args)
        n_pairs = args.batch_size * len(micro) * common.world()  # the loss is a mean over the global batch
        (n_chosen,) = common.all_sum([sum(len(e["chosen"]) for mb in micro for e in mb)], device)  # NLL's token mean
        sums = common.Sums()
        for mb in micro:
            batch = batching.collate_pairs(mb, pad_id, device)
            loss, metrics = simpo_step(logprobs.token_logps(model, batch), batch["labels"] != -100, n_pairs, n_chosen,
                                       args)
            (loss * common.world()).backward()  # FSDP averages gradients over ranks
            sums.add(metrics)
            logger.count(batch)
        grad_norm = common.clip_and_step(model, optimizer, scheduler, args.max_grad_norm)

        if step % args.log_every == 0 or step == args.max_steps:
            logger.log(step, {**common.means(sums.total(device), n_pairs, shares=SHARES), "lr": scheduler.get_last_lr()[0],
                              "grad_norm": float(grad_norm), "tokens/s": logger.tokens_per_second(device)})
        if (toy or heldout) and (step == args.max_steps or (args.eval_every and step % args.eval_every == 0)):
            logger.log(step, evaluation())
        logger.update()
        state.end_step(step, loss=sums.values["loss"], grad_norm=grad_norm)

    checkpoint.save_model(model, tokenizer, args.output_dir, models.save_dtype(args), args.merge_lora)
    logger.close()


if __name__ == "__main__":
    common.run(main)
