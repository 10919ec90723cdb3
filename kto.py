"""KTO: Kahneman-Tversky Optimization on unpaired feedback (arXiv 2402.01306).

Each example is one response labelled desirable or undesirable, with no pair. With
r = logp_theta(y|x) - logp_ref(y|x) (per-sequence sums) and the reference point z0:

    desirable:    L = lambda_D * (1 - sigma(beta * (r - z0)))
    undesirable:  L = lambda_U * (1 - sigma(beta * (z0 - r)))

The loss is the mean over every example of the global batch. z0 is a KL estimate, re-estimated
every step under no_grad on mismatched pairs (x_i, y_j), j != i (neighbours within each
micro-batch, see mismatched_order; hence --batch_size >= 2), and clamped at 0:

    z0 = max(0, mean over the global batch's mismatched pairs of logp_theta(y_j|x_i) - logp_ref(y_j|x_i))

The paper recommends lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] (n_D, n_U: desirable and
undesirable examples); a warning suggests weights when the data is outside. The logged reward
is beta * r (TRL's convention). The reference model is a frozen copy of --model.

Data: JSONL with `prompt`, `completion` and a boolean `label` (true: desirable), plain strings
or lists of {"role", "content"} messages. A pairwise file (any pair shape of the README's Bring
your own data; told apart by the fields of its first row) is accepted too: each pair becomes one
desirable example (the chosen response) and one undesirable example (the rejected one).
Default: the toy task.

    python sft.py && python kto.py                         # toy task, from the toy SFT policy, CPU
    torchrun --nproc_per_node=8 kto.py --model my-sft --data my.jsonl --lr 5e-7 --max_steps 2000
"""
import os
import sys

import torch

import batching
import checkpoint
import common
import formats
import logprobs
import models
from toy.eval import evaluate, is_toy
from toy.task import DATA_DIR as TOY_DATA_DIR, SFT_MODEL_DIR, ensure_model


def kto_loss(policy_logps, ref_logps, labels, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example KTO losses and rewards beta * r, with r = policy_logps - ref_logps.

        labels True (desirable):   desirable_weight   * (1 - sigmoid(beta * (r - kl)))
        labels False (undesirable): undesirable_weight * (1 - sigmoid(beta * (kl - r)))

    policy_logps, ref_logps: (B,) summed completion log-probs. labels: (B,) bool.
    kl: the reference point z0, a scalar already clamped at 0 and detached (see reference_point):
    no gradient flows through it. The rewards are detached.
    """
    r = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(labels, desirable, undesirable), beta * r.detach()


def reference_point(policy_logps, ref_logps):
    """z0 = max(0, mean of policy_logps - ref_logps), detached, the mean taken over every rank's
    mismatched pairs (one all-reduce of their sum and count)."""
    logratios = (policy_logps - ref_logps).detach()
    total, count = common.all_sum([float(logratios.sum()), logratios.numel()], logratios.device)
    return torch.tensor(max(0.0, total / count), device=logratios.device)


def mismatched_order(n):
    """For each prompt i of a micro-batch of n >= 2 examples, the example whose completion it is
    paired with for z0: the neighbour in blocks of two (1, 0, 3, 2, ...), and, when n is odd, a
    roll by one over the last three. Never i itself. The blocks stay inside each rank's slice when
    --batch_size is even, so W processes pair exactly as one process with W times the batch."""
    order = [i ^ 1 for i in range(n)]
    if n % 2:
        order[-3:] = [n - 1, n - 3, n - 2]
    return order


def collate_with_mismatched(examples, pad_id, device):
    """The B matched rows (x_i, y_i), then the B mismatched rows (x_i, y_order[i]) that estimate z0.
    Both halves hold the same prompts and completions, so they pad to the same shape."""
    prompts = [e["prompt"] for e in examples]
    completions = [e["completion"] for e in examples]
    mismatched = [completions[j] for j in mismatched_order(len(examples))]
    return batching.collate(prompts * 2, completions + mismatched, pad_id, device)


def rows_slice(batch, start, stop):
    """Rows start:stop of every tensor of a batch (the matched or the mismatched half)."""
    return {k: v[start:stop] for k, v in batch.items()}


def read_feedback(path):
    """Unpaired rows (prompt, completion, label) and the note naming the shape found. A pairwise file (any
    pair shape), told apart by its first row, gives one desirable row (chosen) and one undesirable row
    (rejected) per pair."""
    # the first read only finds the format; parsing twice is cheap next to training
    if "chosen" not in formats.read_jsonl(path, [])[0]:
        return formats.read_data(path, ("completion", "label"))
    pairs, note = formats.read_data(path, ("chosen", "rejected"))
    return [dict(prompt=p["prompt"], completion=p[field], label=field == "chosen", _where=p["_where"])
            for p in pairs for field in ("chosen", "rejected")], note


def weight_warning(n_desirable, n_undesirable, desirable_weight, undesirable_weight):
    """A warning (or None) when desirable_weight*n_D / (undesirable_weight*n_U) is outside [1, 4/3],
    the range the KTO paper recommends, with weights that bring it to 7/6, mid-range."""
    if n_desirable == 0 or n_undesirable == 0:
        return (f"the data has {n_desirable} desirable and {n_undesirable} undesirable examples; "
                "KTO learns best from both")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    if ratio < 1:
        fix = f"--desirable_weight {7 / 6 * undesirable_weight * n_undesirable / n_desirable:.3g}"
    else:
        fix = f"--undesirable_weight {desirable_weight * n_desirable / (7 / 6 * n_undesirable):.3g}"
    return (f"desirable_weight*n_D / (undesirable_weight*n_U) = {desirable_weight}*{n_desirable} / "
            f"({undesirable_weight}*{n_undesirable}) = {ratio:.3g}, outside the recommended [1, 4/3]; try {fix}")


def kto_step(policy_logps, ref_logps, labels, z0, n_examples, args):
    """A micro-batch -> (its share of the global batch's loss, named sums over its examples).

    policy_logps, ref_logps: (B,) summed completion log-probs of the matched rows; labels: (B,) bool, True
    for desirable; z0: the reference point (reference_point); n_examples: the global batch's examples, which
    the loss averages over. A name with `chosen` (`rejected`) in it sums over the desirable (undesirable)
    examples only (see kto_means). Training and the held-out pass both call it."""
    losses, rewards = kto_loss(policy_logps, ref_logps, labels, z0, args.beta, args.desirable_weight,
                               args.undesirable_weight)
    loss = losses.sum() / n_examples
    logps = policy_logps.detach()
    return loss, {"loss": loss, "n_desirable": labels.sum(), "n_undesirable": (~labels).sum(),
                  "rewards/chosen": rewards[labels].sum(), "logps/chosen": logps[labels].sum(),
                  "rewards/rejected": rewards[~labels].sum(), "logps/rejected": logps[~labels].sum()}


def kto_means(sums, z0, prefix=""):
    """kto_step's sums over the global batch -> the logged metrics: the loss (a batch mean already), z0 as kl,
    each `chosen` (`rejected`) sum as a mean over the desirable (undesirable) examples, any other sum as a
    mean over all of them, and rewards/margins. A class absent from the batch is left out, not logged as NaN."""
    sums = dict(sums)
    counts = {"chosen": sums.pop("n_desirable"), "rejected": sums.pop("n_undesirable")}
    metrics = {"loss": sums.pop("loss"), "kl": z0}
    for name, value in sums.items():
        count = next((counts[group] for group in counts if group in name), sum(counts.values()))
        if count:
            metrics[name] = value / count
    if all(counts.values()):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return {prefix + name: value for name, value in metrics.items()}


def parse_args(argv=None):
    p = common.base_parser(__doc__, data=os.path.join(TOY_DATA_DIR, "unpaired.jsonl"),
                           model=SFT_MODEL_DIR, lr=5e-4, max_steps=200, output_dir="out/kto", real_lr="5e-7",
                           eval_file="eval_pairs.jsonl")
    p.add_argument("--beta", type=float, default=0.1, help="KTO beta: the scale of r inside the sigmoid")
    p.add_argument("--desirable_weight", type=float, default=1.0, help="lambda_D, the weight of desirable losses")
    p.add_argument("--undesirable_weight", type=float, default=1.0, help="lambda_U, the weight of undesirable losses")
    args = p.parse_args(argv)
    if args.batch_size < 2:
        raise common.UserError("--batch_size must be at least 2: z0 is estimated on mismatched pairs of each micro-batch")
    for name in ("beta", "desirable_weight", "undesirable_weight"):
        common.check_range(args, name, above=0)
    return args


def heldout_metrics(model, chunks, ref_logps, args, pad_id, device):
    """kto_step's metrics over the held-out examples (this rank's chunks), as eval/..., with z0 (eval/kl) from
    their mismatched pairs. ref_logps: the reference's summed log-probs of each chunk's matched and mismatched
    rows (collate_with_mismatched), computed once."""
    with common.evaluating(model):
        logps = [logprobs.sequence_logps(model, collate_with_mismatched(c, pad_id, device))[0] for c in chunks]
    z0 = reference_point(torch.cat([p[len(c):] for p, c in zip(logps, chunks)]),
                         torch.cat([r[len(c):] for r, c in zip(ref_logps, chunks)]))
    (n_examples,) = common.all_sum([sum(map(len, chunks))], device)
    sums = common.Sums()
    for policy, ref, chunk in zip(logps, ref_logps, chunks):
        labels = torch.tensor([e["label"] for e in chunk], device=device)
        sums.add(kto_step(policy[:len(chunk)], ref[:len(chunk)], labels, z0, n_examples, args)[1])
    return kto_means(sums.total(device), float(z0), prefix="eval/")


def main(argv=None):
    args = parse_args(argv)
    common.check_args(args)
    ensure_model(args.model)
    device = common.setup(args)

    tokenizer, model = models.load_policy(args, device)
    ref_model = models.load_reference(args, device, policy=model)  # LoRA: the adapter off
    notes = []

    def load(path):
        rows, note = read_feedback(path)
        notes.append(note)
        return formats.tokenize(rows, tokenizer, args.max_length, ("completion",))

    examples = load(args.data)
    n_desirable = sum(e["label"] for e in examples)
    warning = weight_warning(n_desirable, len(examples) - n_desirable, args.desirable_weight, args.undesirable_weight)
    if warning and common.rank() == 0:
        print(f"warning: {warning}", file=sys.stderr)
    optimizer, scheduler = common.make_optimizer(model, args)
    pad_id, toy = tokenizer.pad_token_id, is_toy(args)
    heldout = args.eval_data and batching.heldout_chunks(load(args.eval_data), args.batch_size)
    if heldout:  # scored by the reference once, as the reference never changes
        with torch.no_grad():
            heldout_ref = [logprobs.sequence_logps(ref_model, collate_with_mismatched(c, pad_id, device))[0]
                           for c in heldout]
    n_examples = args.batch_size * args.grad_accum * common.world()  # the loss is a mean over the global batch
    state = checkpoint.TrainState(args, tokenizer, examples, model, optimizer, scheduler)
    start = state.resume()

    def evaluation():
        return {**(evaluate(model, tokenizer, args, device) if toy else {}),
                **(heldout_metrics(model, heldout, heldout_ref, args, pad_id, device) if heldout else {})}

    logger = common.Logger(args, start, notes)
    if (toy or heldout) and start == 0:
        logger.log(0, evaluation())
    model.train()
    for step in range(start + 1, args.max_steps + 1):
        micro = batching.micro_batches(examples, step - 1, args)
        batches = [collate_with_mismatched(mb, pad_id, device) for mb in micro]
        # z0 first, from every micro-batch's mismatched half; the reference scores both halves at once
        with torch.no_grad():
            ref_logps = [logprobs.sequence_logps(ref_model, b)[0] for b in batches]
            policy_mismatched = [logprobs.sequence_logps(model, rows_slice(b, len(mb), None))[0]
                                 for b, mb in zip(batches, micro)]
        z0 = reference_point(torch.cat(policy_mismatched), torch.cat([r[len(mb):] for r, mb in zip(ref_logps, micro)]))

        sums = common.Sums()
        for batch, ref, mb in zip(batches, ref_logps, micro):
            matched = rows_slice(batch, 0, len(mb))
            labels = torch.tensor([e["label"] for e in mb], device=device)
            loss, metrics = kto_step(logprobs.sequence_logps(model, matched)[0], ref[:len(mb)], labels, z0,
                                     n_examples, args)
            (loss * common.world()).backward()  # FSDP averages gradients over ranks
            sums.add(metrics)
            logger.count(matched)
        grad_norm = common.clip_and_step(model, optimizer, scheduler, args.max_grad_norm)

        if step % args.log_every == 0 or step == args.max_steps:
            logger.log(step, {**kto_means(sums.total(device), float(z0)), "lr": scheduler.get_last_lr()[0],
                              "grad_norm": float(grad_norm), "tokens/s": logger.tokens_per_second(device)})
        if (toy or heldout) and (step == args.max_steps or (args.eval_every and step % args.eval_every == 0)):
            logger.log(step, evaluation())
        logger.update()
        state.end_step(step, loss=sums.values["loss"], grad_norm=grad_norm)

    checkpoint.save_model(model, tokenizer, args.output_dir, models.save_dtype(args), args.merge_lora)
    logger.close()


if __name__ == "__main__":
    common.run(main)
