"""SFT: supervised fine-tuning on prompt/completion pairs.

    L = - (1 / N) * sum over every response token t in the batch of log pi(y_t | x, y_<t)

N is the number of response tokens in the whole global batch (all micro-batches, all ranks):
a token mean over the batch, not a mean of per-sequence means, so long and short responses
weigh the same per token. Prompt tokens and padding are never scored (label -100).

Data: JSONL with `prompt` and `completion`, plain strings or lists of {"role", "content"}
messages (rendered with the tokenizer's chat template), or `messages` conversations (the loss
covers their assistant turns only). Default: the bundled toy task. All shapes: README, Bring your own data.

    python sft.py                                           # toy task, tiny model, CPU
    torchrun --nproc_per_node=8 sft.py --model Qwen/Qwen2.5-0.5B --data my.jsonl --lr 2e-5
    python sft.py --save_every 100 --resume                 # pre-emptible: rerun the same command
"""
import math
import os

import batching
import checkpoint
import common
import formats
import logprobs
import models
from toy.eval import evaluate, is_toy
from toy.task import DATA_DIR as TOY_DATA_DIR, TINY_MODEL_DIR, ensure_model


def sft_loss(token_logps, mask, n_tokens):
    """Summed negative log-likelihood of the masked tokens, divided by n_tokens.

    token_logps, mask: (B, T). n_tokens: the response-token count the mean is taken over
    (the global batch's, so that micro-batches and ranks add up to one token mean).
    """
    return -(token_logps * mask).sum() / n_tokens


def sft_step(token_logps, mask, n_tokens):
    """A micro-batch -> (its share of the global batch's loss, named sums over its response tokens).

    token_logps, mask: (B, T) per-token log-probs and the response tokens; n_tokens: the global batch's
    response tokens, which the loss averages over. Training and the held-out pass both call it."""
    loss = sft_loss(token_logps, mask, n_tokens)
    return loss, {"loss": loss}


def token_means(sums, n_tokens, prefix=""):
    """sft_step's sums -> the logged metrics: means over the n_tokens response tokens, and the perplexity
    exp(loss) (capped so that it stays finite)."""
    metrics = common.means(sums, n_tokens, prefix)
    return {**metrics, prefix + "perplexity": math.exp(min(metrics[prefix + "loss"], 50))}


def response_tokens(batches, device):
    """The response tokens of these batches, summed over ranks."""
    (n_tokens,) = common.all_sum([sum(int((b["labels"] != -100).sum()) for b in batches)], device)
    return n_tokens


def parse_args(argv=None):
    p = common.base_parser(__doc__, data=os.path.join(TOY_DATA_DIR, "sft.jsonl"), model=TINY_MODEL_DIR,
                           output_dir="out/sft", real_lr="2e-5")
    return p.parse_args(argv)


def heldout_metrics(model, chunks, pad_id, device):
    """sft_step's metrics over the held-out examples (this rank's chunks), as eval/...: a token mean over
    every rank's response tokens."""
    batches = [batching.collate_single(chunk, pad_id, device) for chunk in chunks]
    n_tokens = response_tokens(batches, device)
    sums = common.Sums()
    with common.evaluating(model):
        for batch in batches:
            sums.add(sft_step(logprobs.token_logps(model, batch), batch["labels"] != -100, n_tokens)[1])
    return token_means(sums.total(device), n_tokens, prefix="eval/")


def main(argv=None):
    args = parse_args(argv)
    common.check_args(args)
    ensure_model(args.model)
    device = common.setup(args)

    tokenizer, model = models.load_policy(args, device)
    notes = []

    def load(path):
        rows, note = formats.read_data(path, ("completion",))
        notes.append(note)
        return formats.tokenize(rows, tokenizer, args.max_length, ("completion",))

    examples = load(args.data)
    heldout = args.eval_data and batching.heldout_chunks(load(args.eval_data), args.batch_size)
    optimizer, scheduler = common.make_optimizer(model, args)
    state = checkpoint.TrainState(args, tokenizer, examples, model, optimizer, scheduler)
    start = state.resume()
    toy = is_toy(args)

    def evaluation():
        return {**(evaluate(model, tokenizer, args, device) if toy else {}),
                **(heldout_metrics(model, heldout, tokenizer.pad_token_id, device) if heldout else {})}

    logger = common.Logger(args, start, notes)
    if (toy or heldout) and start == 0:
        logger.log(0, evaluation())
    model.train()
    for step in range(start + 1, args.max_steps + 1):
        batches = [batching.collate_single(mb, tokenizer.pad_token_id, device)
                   for mb in batching.micro_batches(examples, step - 1, args)]
        n_tokens = response_tokens(batches, device)  # the loss is a token mean over the global batch
        sums = common.Sums()
        for batch in batches:
            loss, metrics = sft_step(logprobs.token_logps(model, batch), batch["labels"] != -100, n_tokens)
            (loss * common.world()).backward()  # FSDP averages gradients over ranks
            sums.add(metrics)
            logger.count(batch)
        grad_norm = common.clip_and_step(model, optimizer, scheduler, args.max_grad_norm)

        if step % args.log_every == 0 or step == args.max_steps:
            logger.log(step, {**token_means(sums.total(device), n_tokens), "lr": scheduler.get_last_lr()[0],
                              "grad_norm": float(grad_norm), "tokens/s": logger.tokens_per_second(device)})
        if (toy or heldout) and (step == args.max_steps or (args.eval_every and step % args.eval_every == 0)):
            logger.log(step, evaluation())
        logger.update()
        state.end_step(step, loss=sums.values["loss"], grad_norm=grad_norm)

    checkpoint.save_model(model, tokenizer, args.output_dir, models.save_dtype(args), args.merge_lora)
    logger.close()


if __name__ == "__main__":
    common.run(main)
