"""Token ids -> batches: the batch layout (padded and packed), collation, and which examples each step uses.

Batch layout (all collators): each row is [left padding | prompt | completion | right padding],
with every completion starting at the same column P. `labels` holds only the completion
columns: labels[:, j] is token P + j, or -100 on padding and on the unscored turns inside a
multi-turn chat's completion (an example's "completion_mask"). So the model projects to the
vocabulary only at the C + 1 positions that score a completion token, never on the prompt. Two
tensors stay on the host, so that no layout waits for the device: `spans` (B, 2), each row's first
real column and its number of real tokens (pack() and Logger.count read them), and `scored` (B, C),
labels != -100 (logprobs.scored_index).

This padded batch is what scripts see. The model may run on its packed (padding-free) form instead:
pack() puts each sequence's real tokens whole into rows of at most P + C tokens (or into one row, for an
attention that splits a row by its sequences: models.packed_sdpa, flash attention), position_ids
restarting at 0 per sequence and no attention_mask, so attention stays inside each sequence.
token_logps, completion_logits and position_outputs map results back to the padded columns;
packs() decides per model (--padding_free, else packing_check once).

    padded (B=3, P=3, C=4)      packed (R=2 rows, T=7)    position_ids
     5  6  7 | 11 12  .  .       9 10 14 15 16 17  .       0 1 2 3 4 5 0    (. = padding; the packed
     .  .  8 | 13  .  .  .       5  6  7 11 12  8 13       0 1 2 3 4 0 1     row's filler is never scored)
     .  9 10 | 14 15 16 17
"""
import itertools
import random

import torch
import torch.distributed as dist

from common import UserError, rank, world


def collate(prompts, completions, pad_id, device, masks=None):
    """Left-pad prompts, right-pad completions, so every completion starts at the same column.
    `masks`: per row None or a 0/1 list over its completion; a 0 leaves that token unscored (label -100)."""
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)  # 0 for prompt-only batches
    input_ids = torch.full((len(prompts), P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(prompts), C), -100, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p): P + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, P - len(p): P + len(c)] = 1
        labels[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        if masks and masks[i] is not None:
            labels[i, : len(c)].masked_fill_(torch.tensor(masks[i]) == 0, -100)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    spans = torch.tensor([[P - len(p), len(p) + len(c)] for p, c in zip(prompts, completions)], dtype=torch.long)
    return {**{k: to_device(v, device) for k, v in batch.items()}, "spans": spans, "scored": labels != -100}


def collate_single(examples, pad_id, device):
    return collate([e["prompt"] for e in examples], [e["completion"] for e in examples], pad_id, device,
                   [e.get("completion_mask") for e in examples])


def collate_pairs(examples, pad_id, device):
    """Chosen rows, then rejected rows: one forward serves both halves."""
    prompts = [e["prompt"] for e in examples] * 2
    completions = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    masks = [e.get("chosen_mask") for e in examples] + [e.get("rejected_mask") for e in examples]
    return collate(prompts, completions, pad_id, device, masks)


def collate_prompts(examples, pad_id, device):
    """Left-padded prompts for generation (a batch with empty completions)."""
    return collate([e["prompt"] for e in examples], [[] for _ in examples], pad_id, device)


def pack(batch, one_row=None, min_saving=0.0):
    """The packed layout of a collated batch, for a forward with no attention_mask; None where it would save less
    than `min_saving` of the padded batch's positions (logprobs.MIN_PACK_SAVING: a batch with little padding
    runs faster padded).

    Each sequence's real tokens (prompt + completion) go whole into one row, first-fit by decreasing
    length, into rows of at most W tokens (W: the padded width): at most B rows of at most W tokens,
    so no activation and no (T x T) attention mask is larger than the padded batch's. position_ids
    restart at 0 at each sequence, which transformers reads as a sequence boundary (masking_utils.
    find_packed_sequence_indices); the filler ending a short row counts from 0 too and is never scored.
    `one_row`, for an attention that splits a row at its sequences' boundaries and needs no (T x T) mask, puts
    every sequence in one row (no filler) and adds `varlen`, the boundaries for the forward: for "flash"
    (transformers' flash path keeps sequences apart only in a single row) the varlen kernel's cu_seq_lens_q/k
    and max_length_q/k on the device, built here so that no layer derives them; for "packed_sdpa"
    (models.packed_sdpa) sequence_bounds, a tuple of ints: no wrapper moves it to the device (FSDP2 moves
    tensors), so no layer waits for the device to read it.
    Returns input_ids and position_ids (R, T), and index (B, W): where each padded position's token
    sits in the flattened rows, -1 on padding. The layout is built on the host from the batch's spans,
    then copied over at once (no device sync).
    """
    B, W = batch["input_ids"].shape
    starts, lengths = batch["spans"].T.tolist()
    width = sum(lengths) if one_row else W
    rows, free = [], []
    for b in sorted(range(B), key=lambda b: -lengths[b]):
        r = next((r for r, room in enumerate(free) if room >= lengths[b]), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(width)
        rows[r].append(b)
        free[r] -= lengths[b]
    T = width - min(free)
    if len(rows) * T > (1 - min_saving) * B * W:
        return None
    source = torch.zeros(len(rows), T, dtype=torch.long)  # each packed token's index in the flattened padded batch
    position_ids = torch.zeros_like(source)
    filled = torch.zeros_like(source, dtype=torch.bool)
    for r, row in enumerate(rows):
        t = 0
        for b in row:
            source[r, t:t + lengths[b]] = b * W + starts[b] + torch.arange(lengths[b])
            position_ids[r, t:t + lengths[b]] = torch.arange(lengths[b])
            t += lengths[b]
        filled[r, :t] = True
        position_ids[r, t:] = torch.arange(T - t)
    index = torch.full((B * W,), -1, dtype=torch.long)
    index[source[filled]] = torch.arange(source.numel())[filled.flatten()]
    host = dict(source=source, filled=filled, position_ids=position_ids, index=index.view(B, W))
    device = batch["input_ids"].device
    moved = {k: to_device(v, device) for k, v in host.items()}
    input_ids = batch["input_ids"].flatten()[moved["source"]].masked_fill(~moved["filled"], 0)  # filler: id 0
    packed = dict(input_ids=input_ids, position_ids=moved["position_ids"], index=moved["index"])
    if one_row:
        bounds = (0, *itertools.accumulate(lengths[b] for b in rows[0]))
        if one_row == "packed_sdpa":
            packed["varlen"] = dict(sequence_bounds=bounds)
        else:
            there = to_device(torch.tensor(bounds, dtype=torch.int32), device)
            packed["varlen"] = dict(cu_seq_lens_q=there, cu_seq_lens_k=there,
                                    max_length_q=max(lengths), max_length_k=max(lengths))
    return packed


def to_device(tensor, device):
    """A host tensor on `device`; to CUDA from pinned memory, without waiting for the copy."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def take(tensors, rows, device):
    """Rows `rows` (a host index tensor) of every tensor: those on the host (a batch's spans) directly, those
    on `device` through one non-blocking copy of the index (a host index would wait for the device)."""
    on_device = to_device(rows, device)
    return {k: v[rows if v.device.type == "cpu" else on_device] for k, v in tensors.items()}


def unpack(outputs, index):
    """Per-position outputs of packed rows (R, T, ...) in the padded layout (B, W, ...), 0 on padding."""
    flat = outputs.flatten(0, 1)[index.clamp(min=0)]
    return flat.masked_fill((index < 0).view(*index.shape, *[1] * (flat.dim() - 2)), 0)


def micro_batches(examples, step, args, grad_accum=None):
    """This rank's grad_accum micro-batches (lists of examples) for optimizer step `step` (counting from 0);
    `grad_accum` replaces --grad_accum (ppo.py: a rollout is num_mini_batches minibatches of it).

    A pure function of (step, seed): each epoch is a seeded shuffle, each step takes the next global
    batch and rank r takes the r-th contiguous slice of every micro-batch. So one process with
    batch_size B*N sees exactly what N processes with batch_size B see, and resuming needs no loader state.
    """
    N, r, B = world(), rank(), args.batch_size  # ranks, this rank, examples per micro-batch
    grad_accum = grad_accum or args.grad_accum
    per_step = B * N * grad_accum
    steps_per_epoch = len(examples) // per_step
    if steps_per_epoch == 0:
        raise UserError(f"{args.data}: {len(examples)} examples is fewer than one global batch ({per_step} = "
                        "batch_size x grad_accum x ranks); lower --batch_size or --grad_accum, or add data")
    epoch, i = divmod(step, steps_per_epoch)
    order = list(range(len(examples)))
    random.Random(args.seed + epoch).shuffle(order)
    start = i * per_step
    return [[examples[j] for j in order[start + (m * N + r) * B: start + (m * N + r + 1) * B]]
            for m in range(grad_accum)]


def gather_global(items, batch_size):
    """Every rank's items, each rank's in its micro-batches of batch_size, as one list in micro_batches' global
    order (micro-batch, then rank): the same list on every rank, whatever the number of ranks."""
    if world() == 1:
        return items
    everyone = [None] * world()
    dist.all_gather_object(everyone, items)
    return [x for m in range(0, len(items), batch_size) for theirs in everyone for x in theirs[m:m + batch_size]]


def rank_share(items, batch_size):
    """This rank's share of a global list, dealt as micro_batches deals a global batch (its inverse)."""
    return [x for n, x in enumerate(items) if (n // batch_size) % world() == rank()]


def heldout_chunks(examples, batch_size):
    """This rank's share of held-out examples in chunks of up to batch_size, the same number of chunks on
    every rank (FSDP runs every forward on all ranks): up to world - 1 examples are left out. A last chunk
    of one example joins the one before (KTO pairs each example with another)."""
    usable = examples[: len(examples) - len(examples) % world()]
    if not usable:
        raise UserError(f"{len(examples)} held-out examples for {world()} processes; add --eval_data examples")
    mine = usable[rank()::world()]
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] += chunks.pop()
    return chunks
