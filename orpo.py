"""ORPO (arXiv 2403.07691): odds-ratio preference optimization, SFT and preference in one loss.

    P(y|x) = exp(avg_logp(y|x)),   log_odds(y) = log(P / (1 - P)) = avg_logp - log(1 - exp(avg_logp))
    L = NLL(y_w) - lam * logsig(log_odds(y_w) - log_odds(y_l))

avg_logp = logp / |y| is the mean response-token log-prob (EOS included): with summed log-probs
P would be about 0 and the odds term would vanish. NLL(y_w) is the token mean over every chosen
response token of the global batch, as in sft.py; the odds-ratio term is the mean over the
global batch's pairs. No reference model. lam = 0.1 (paper and TRL; ms-swift and TRL pass it
as --beta, which is accepted as an alias of --lam). Rewards are logged as lam * avg_logp,
with TRL's `log_odds_ratio` (the mean of logsig(log_odds(y_w) - log_odds(y_l))) and
`log_odds_chosen` (the mean of log_odds(y_w) - log_odds(y_l)).

The paper trains ORPO straight from a base model; here the toy default starts from out/sft like
the other preference scripts. The defaults suit the toy task; real models want --lr ~5e-6 (the paper's 8e-6).

Data: JSONL with `prompt`, `chosen`, `rejected` (strings or message lists), or chosen/rejected
conversations with the prompt implicit or repeated (H4; README, Bring your own data). Default: the toy pairs.

    python sft.py && python orpo.py                         # toy task, from out/sft, CPU
    torchrun --nproc_per_node=8 orpo.py --model Qwen/Qwen2.5-0.5B --data pairs.jsonl --lr 5e-6 --max_steps 2000
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


def orpo_loss(chosen_avg_logps, rejected_avg_logps, lam=0.1):
    """Per-pair odds-ratio losses -lam * logsig(log_odds) and the log-odds ratios log_odds, each (B,).

        log_odds = (a_w - log(1 - exp(a_w))) - (a_l - log(1 - exp(a_l))),  a = average response log-prob

    log(1 - exp(a)) is taken as log(-expm1(a)), which equals log1p(-exp(a)) but keeps its precision as
    a -> 0, where 1 - exp(a) cancels; a is capped just below 0 so that P = 1 gives finite odds.
    """
    def log1m_exp(a):
        return torch.log(-torch.expm1(a.clamp(max=-1e-6)))

    log_odds = (chosen_avg_logps - log1m_exp(chosen_avg_logps)) - (rejected_avg_logps - log1m_exp(rejected_avg_logps))
    return -lam * F.logsigmoid(log_odds), log_odds.detach()


SHARES = ("loss", "nll_loss")  # orpo_step's metrics that are global-batch means already, not sums


def orpo_step(policy_logps, mask, n_pairs, n_chosen, args):
    """A micro-batch of pairs -> (its share of the global batch's loss, named sums over its pairs).

    policy_logps: (2B, C) per-token log-probs, chosen rows then rejected; mask: their response tokens;
    n_pairs, n_chosen: the global batch's pairs and chosen tokens, which the loss averages over. The rewards
    are lam * avg_logp; nll_loss, like loss, is already this micro-batch's share of the global batch's.
    Training and the held-out pass both call it, so eval/loss is the training loss."""
    chosen, rejected = (policy_logps.sum(-1) / mask.sum(-1)).chunk(2)  # average response log-probs
    losses, log_odds = orpo_loss(chosen, rejected, args.lam)
    nll = -policy_logps.chunk(2)[0].sum() / n_chosen  # the chosen responses' NLL, a token mean
    loss = losses.sum() / n_pairs + nll
    return loss, {"loss": loss, "nll_loss": nll, "rewards/chosen": args.lam * chosen.sum(),
                  "rewards/rejected": args.lam * rejected.sum(),
                  "rewards/margins": args.lam * (chosen - rejected).sum(),
                  "rewards/accuracies": (chosen > rejected).sum(),
                  "logps/chosen": chosen.sum(), "logps/rejected": rejected.sum(),
                  "log_odds_ratio": F.logsigmoid(log_odds).sum(), "log_odds_chosen": log_odds.sum()}


def parse_args(argv=None):
    p = common.base_parser(__doc__, data=os.path.join(TOY_DATA_DIR, "pairs.jsonl"), model=SFT_MODEL_DIR,
                           lr=3e-4, max_steps=150, batch_size=16, real_lr="8e-6", eval_file="eval_pairs.jsonl",
                           output_dir="out/orpo")
    p.add_argument("--lam", "--beta", dest="lam", type=float, default=0.1,
                   help="weight of the odds-ratio term (the paper's lambda; TRL calls it beta, so --beta works too)")
    args = p.parse_args(argv)
    common.check_range(args, "lam", low=0)
    return args


def heldout_metrics(model, chunks, args, pad_id, device):
    """orpo_step's metrics over the held-out pairs (this rank's chunks), as eval/..."""
    n_pairs, n_chosen = common.all_sum([sum(map(len, chunks)), sum(len(e["chosen"]) for c in chunks for e in c)], device)
    sums = common.Sums()
    with common.evaluating(model):
        for chunk in chunks:
            batch = batching.collate_pairs(chunk, pad_id, device)
            sums.add(orpo_step(logprobs.token_logps(model, batch), batch["labels"] != -100, n_pairs, n_chosen,
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
        n_pairs = args.batch_size * len(micro) * common.world()  # the odds-ratio term is a mean over the global batch
        (n_chosen,) = common.all_sum([sum(len(e["chosen"]) for mb in micro for e in mb)], device)  # NLL's token mean
        sums = common.Sums()
        for mb in micro:
            batch = batching.collate_pairs(mb, pad_id, device)
            loss, metrics = orpo_step(logprobs.token_logps(model, batch), batch["labels"] != -100, n_pairs, n_chosen,
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
