"""A batch -> per-token log-probs of its completion tokens, from a padded or a packed forward.

token_logps is the one path every script scores through; naive_token_logps beside it is what it computes,
the plain way. The fast path's LM head projects only the positions that predict a completion token
(HeadLogps), and the model runs on the packed form of the batch when packs(model) (batching.pack;
--padding_free, else a start-up check per model).
"""
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from batching import collate, collate_pairs, pack, to_device, unpack
from common import rank, unwrapped_class, world

MIN_PACK_SAVING = 0.05  # a model that packs runs a batch padded unless packing saves this share of its positions


def gather_logps(logits, labels, temperature=1.0):
    """log softmax(logits / T)[labels] per position (already aligned), 0.0 where labels == -100. As logit[label] -
    logsumexp in float32, HeadLogps.CHUNK_ELEMENTS logits at a time: no float32 copy of the full (..., V)
    log-softmax exists, nor a copy for / T at T = 1 when the logits are float32 already."""
    mask = labels != -100
    index = labels.masked_fill(~mask, 0).reshape(-1, 1)
    rows = max(1, HeadLogps.CHUNK_ELEMENTS // logits.shape[-1])
    out = []
    for lg, ix in zip(logits.reshape(-1, logits.shape[-1]).split(rows), index.split(rows)):
        lg = lg.float() if temperature == 1.0 else lg.float() / temperature
        out.append(lg.gather(-1, ix).squeeze(-1) - lg.logsumexp(-1))
    return torch.cat(out).view(labels.shape).masked_fill(~mask, 0.0)


@torch.no_grad()
def chunked_entropy(logits, temperature):
    """The entropy of softmax(logits / T) per row of (N, V) logits, in float32 chunks of HeadLogps.CHUNK_ELEMENTS."""
    out = []
    for lg in logits.split(max(1, HeadLogps.CHUNK_ELEMENTS // logits.shape[-1])):
        lg = lg.float() / temperature
        out.append(lg.logsumexp(-1) - (lg.softmax(-1) * lg).sum(-1))
    return torch.cat(out)


def naive_token_logps(model, batch, temperature=1.0):
    """What token_logps computes, the plain way: full (B, W, V) float32 logits, log_softmax, gather. Column
    P-1+j of the batch (P = W - C prompt columns) predicts completion token j."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, -labels.shape[1] - 1:-1]
    logps = (logits.float() / temperature).log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logps.masked_fill(labels == -100, 0.0)


def token_logps(model, batch, temperature=1.0):
    """Per-token log-probs (B, C) of the completion columns, 0.0 on padding (packed or padded forward: see pack).

    For this one forward the LM head scores the labels itself (HeadLogps) instead of returning
    logits: it projects only the positions that predict a completion token (no prompt, no
    padding), and its float32 logits stay within HeadLogps' memory budget, forward and backward.
    """
    return head_scores(model, batch, temperature, entropy=False)[0]


def logps_and_entropy(model, batch, temperature):
    """token_logps, plus the entropy of pi(.|state) (softmax of logits / T) at each completion position, without
    grad: PPO's and GRPO's update. Both come from HeadLogps' chunks of float32 logits, never all (N, V) at once."""
    return head_scores(model, batch, temperature, entropy=True)


def head_scores(model, batch, temperature, entropy):
    """(log-probs, entropies or None), (B, C) each, 0.0 on padding. The model's head scores through HeadLogps,
    unless the model changes its head's output (Gemma-2's soft-capping, Cohere's logit_scale): then from the
    logits the model returns. Which one is found at its first call and kept (model.changes_head_output)."""
    labels = batch["labels"]
    where = scored_index(batch)
    targets = labels[where]
    if not getattr(model, "changes_head_output", None):
        head, outputs = model.get_output_embeddings(), []

        def score(hidden):
            outputs.append(HeadLogps.apply(hidden, head.weight, head.bias, targets, temperature, entropy,
                                           torch.is_grad_enabled()))
            return outputs[-1][0]

        logps = completion_logits(model, batch, where, score)
        model.changes_head_output = not outputs or logps is not outputs[-1][0]
        if not model.changes_head_output:
            return spread(logps, where, labels.shape), spread(outputs[-1][1], where, labels.shape) if entropy else None
    logits = completion_logits(model, batch, where)
    return (spread(gather_logps(logits, targets, temperature), where, labels.shape),
            spread(chunked_entropy(logits, temperature), where, labels.shape) if entropy else None)


def completion_logits(model, batch, where, score=None):
    """One forward in which the LM head sees only the (N, H) hidden states that predict the N scored completion
    tokens at `where` (scored_index), packed or padded (see pack). Returns the logits there (N, V), after any
    change the model makes to its head's output, or, with `score`, score(hidden) in the head's place."""
    C = batch["labels"].shape[1]
    packed = packs(model) and pack(batch, one_row=one_row(model), min_saving=MIN_PACK_SAVING)
    if packed:
        P = batch["input_ids"].shape[1] - C
        before = packed["index"][:, P - 1:P - 1 + C][where]  # the token before each completion token
        inputs = dict(input_ids=packed["input_ids"], position_ids=packed["position_ids"], **packed.get("varlen", {}))

        def select(hidden):
            return hidden.flatten(0, 1)[before]
    else:
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], logits_to_keep=C + 1)

        def select(hidden):  # (B, C + 1, H): position P-1+j predicts completion token j, the last one nothing
            return hidden[:, :-1][where]
    head = model.get_output_embeddings()
    project, called = score or head.forward, []

    def head_forward(hidden):
        called.append(True)
        return project(select(hidden))

    own_forward = vars(head).pop("forward", None)  # an instance attribute shadows the class's forward
    head.forward = head_forward
    try:
        out = model(**inputs, use_cache=False)
    finally:
        del head.forward
        if own_forward is not None:
            head.forward = own_forward
    return out.logits if called else select(out.logits)  # a model that never calls its head: full logits


def scored_index(batch):
    """Where the batch's N scored completion tokens are, row-major: (rows, columns) index tensors into the
    (B, C) completion columns, from the host's copy of the label mask (batch["scored"]), so that no boolean
    indexing on the device waits for it."""
    return tuple(to_device(batch["scored"].nonzero().T, batch["labels"].device))


@torch.no_grad()
def precompute_ref_logps(ref_model, examples, batch_size, pad_id, device):
    """--precompute_ref (DPO, LD-DPO): store each pair's reference per-token log-probs on it (`ref_chosen`,
    `ref_rejected`), so that the reference can be freed before training.

    Rank r scores the r-th contiguous share, then ranks swap results: later epochs reshuffle which rank
    sees which pair. Every rank runs the same number of forwards, as FSDP's collectives require.
    """
    share = math.ceil(len(examples) / world())
    mine = examples[rank() * share:(rank() + 1) * share]
    scored = []
    for i in range(0, share, batch_size):
        chunk = mine[i:i + batch_size]
        logps = token_logps(ref_model, collate_pairs(chunk or examples[:1], pad_id, device)).cpu()
        scored += [(logps[j, :len(e["chosen"])].clone(), logps[len(chunk) + j, :len(e["rejected"])].clone())
                   for j, e in enumerate(chunk)]
    if dist.is_initialized():
        shares = [None] * world()
        dist.all_gather_object(shares, scored)
        scored = [s for part in shares for s in part]
    for e, (chosen, rejected) in zip(examples, scored):
        e["ref_chosen"], e["ref_rejected"] = chosen, rejected


def precomputed_ref_logps(examples, device):
    """The (2B, C) reference per-token log-probs of a micro-batch, from precompute_ref_logps."""
    rows = [e["ref_chosen"] for e in examples] + [e["ref_rejected"] for e in examples]
    return to_device(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), device)


def spread(values, where, shape):
    """(N,) values back to the completion columns (B, C) = shape at `where` (scored_index), 0 elsewhere."""
    return values.new_zeros(shape).index_put(where, values)


class HeadLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias) / temperature)[labels] for N scored rows: (N, H) -> (N,), and, with
    `entropy`, the entropy of that softmax per row (N,) without grad (else an empty tensor). `grad`: whether
    the caller runs with grad enabled (a forward always runs without, and needs_input_grad ignores the mode).

    d logp / d logits = (onehot(label) - softmax) / temperature. When the N x V softmax is small
    (KEEP_ELEMENTS) and a gradient is needed, it is computed at once and kept for the backward.
    Otherwise the float32 logits exist one chunk of rows (CHUNK_ELEMENTS) at a time, in one buffer
    reused from chunk to chunk: the forward keeps each row's logsumexp only, the backward recomputes
    a chunk's logits and turns them in place into their gradient. Chunks stay large for efficient
    matmuls (each re-reads the weight).
    """
    CHUNK_ELEMENTS = 2**24  # 64 MB of float32 logits
    KEEP_ELEMENTS = 3 * 2**25  # 384 MB kept rather than recomputed: 3,000 scored tokens at 32k; 960 at 128k recompute

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, entropy=False, grad=True):
        keep = grad and any(ctx.needs_input_grad) and hidden.shape[0] * weight.shape[0] <= HeadLogps.KEEP_ELEMENTS
        rows = hidden.shape[0] if keep else max(1, HeadLogps.CHUNK_ELEMENTS // weight.shape[0])
        buffer = HeadLogps.chunk_buffer(hidden, weight, rows)
        chunks = [HeadLogps.chunk_forward(h, y, weight, bias, temperature, keep, entropy, buffer)
                  for h, y in zip(hidden.split(rows), labels.split(rows))]
        logps, lse, probs, entropies = zip(*chunks)
        logps, lse = torch.cat(logps), torch.cat(lse)
        entropies = torch.cat(entropies) if entropy else logps.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, probs[0] if keep else None)
        ctx.rows, ctx.temperature = rows, temperature
        ctx.mark_non_differentiable(entropies)
        return logps, entropies

    @staticmethod
    def backward(ctx, grad, _):
        hidden, weight, bias, labels, lse, probs = ctx.saved_tensors
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        buffer = None if probs is not None else HeadLogps.chunk_buffer(hidden, weight, ctx.rows)
        grad_hidden = torch.cat([
            HeadLogps.chunk_backward(h, y, lz, g, weight, bias, ctx.temperature, grad_weight, grad_bias, probs, buffer)
            for h, y, lz, g in zip(*(t.split(ctx.rows) for t in (hidden, labels, lse, grad)))])
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)

    @staticmethod
    def chunk_buffer(hidden, weight, rows):
        """One (rows, V) float32 buffer for every chunk's logits (the kept softmax's, when one chunk is kept),
        when they are computed in float32: on CPU a fresh buffer per chunk costs more in page faults than its
        exp, and every chunk's logits come from the same matmul call, so that the same rows give the same bits
        kept or chunked. None otherwise (a bf16 matmul writes its own output; CUDA's allocator reuses memory)."""
        if hidden.dtype != torch.float32 or weight.dtype != torch.float32:
            return None
        return hidden.new_empty(min(rows, hidden.shape[0]), weight.shape[0])

    @staticmethod
    def chunk_logits(h, weight, bias, temperature, buffer=None):
        if buffer is None:
            logits = F.linear(h, weight, bias).float()
        elif bias is None:
            logits = torch.mm(h, weight.T, out=buffer[:len(h)])
        else:
            logits = torch.addmm(bias, h, weight.T, out=buffer[:len(h)])
        return logits.div_(temperature) if temperature != 1.0 else logits

    @staticmethod
    def chunk_forward(h, y, weight, bias, temperature, keep, entropy, buffer):
        """(log-probs, logsumexp, softmax if keep, entropy if `entropy`) of a chunk's rows, from one in-place
        log_softmax of its logits (a single pass per row). The entropy is -sum_v p_v log p_v."""
        logits = HeadLogps.chunk_logits(h, weight, bias, temperature, buffer)
        target = logits.gather(-1, y[:, None]).squeeze(-1)
        log_p = torch.log_softmax(logits, -1, out=logits)
        logps = log_p.gather(-1, y[:, None]).squeeze(-1)
        h_rows = -log_p.exp().mul_(log_p).sum(-1) if entropy else None
        return logps, target - logps, log_p.exp_() if keep else None, h_rows

    @staticmethod
    def chunk_backward(h, y, lse, g, weight, bias, temperature, grad_weight, grad_bias, probs, buffer):
        """The chunk's hidden gradient; adds its weight and bias gradients (float32) in place."""
        if probs is None:
            probs = HeadLogps.chunk_logits(h, weight, bias, temperature, buffer).sub_(lse[:, None]).exp_()
        # in place (the kept softmax too): a fresh logits-sized buffer's page faults cost more than the multiply
        grad_logits = probs.mul_(-g[:, None]).scatter_add_(1, y[:, None], g[:, None])
        if temperature != 1.0:
            grad_logits.div_(temperature)
        if grad_weight is not None:  # in the compute dtype (bf16 GEMMs accumulate in float32), summed in float32
            if h.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.T, h)
            else:
                grad_weight += grad_logits.to(h.dtype).T @ h
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
        return grad_logits.to(weight.dtype) @ weight


def sequence_logps(model, batch, temperature=1.0):
    """(sum of completion log-probs, number of completion tokens), each of shape (B,)."""
    return token_logps(model, batch, temperature).sum(-1), (batch["labels"] != -100).sum(-1)


def forward_outputs(model, input_ids, attention_mask, position_ids, varlen=None):
    """A causal LM's logits, or what another model (reward_models.RewardModel) returns, per position. `varlen`:
    pack's sequence boundaries for a one-row packed forward."""
    from transformers import PreTrainedModel

    extra = ({"use_cache": False} if isinstance(model, PreTrainedModel) else {}) | (varlen or {})  # a cache: no packing
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra)
    return getattr(out, "logits", out)


def last_token_outputs(model, batch):
    """(B,) outputs (a reward model's rewards, a value model's values) at each row's last real token (column
    P + n - 1 in collate's layout)."""
    values = position_outputs(model, batch)
    labels = batch["labels"]
    last = values.shape[1] - labels.shape[1] + (labels != -100).sum(-1) - 1
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def position_outputs(model, batch):
    """forward_outputs in the padded layout (B, W, ...), from a packed forward when the model packs."""
    packed = packs(model) and pack(batch, one_row=one_row(model), min_saving=MIN_PACK_SAVING)
    if not packed:
        return forward_outputs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    outputs = forward_outputs(model, packed["input_ids"], None, packed["position_ids"], packed.get("varlen"))
    return unpack(outputs, packed["index"])


def one_row(model):
    """"flash" where the model's (or its backbone's) attention is a flash-attention kernel, "packed_sdpa" where it
    is models.packed_sdpa: both keep packed sequences apart in one row. Else None: rows with (T x T) masks."""
    from transformers import PreTrainedModel
    from transformers.utils.generic import is_flash_attention_requested

    config = next((m.config for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if config is not None and is_flash_attention_requested(config):
        return "flash"
    return "packed_sdpa" if config is not None and config._attn_implementation == "packed_sdpa" else None


def packs(model):
    """Whether `model`'s forwards use the packed layout: model.padding_free (--padding_free / --no-padding_free,
    set by models.load_model), else, where that is None, its packing_check once."""
    if getattr(model, "padding_free", None) is None:
        model.padding_free = packing_check(model)
    return model.padding_free


@torch.no_grad()
def packing_check(model):
    """Once per model: do a few sequences (lengths 1 to 8) give the same outputs packed as padded? Only if its
    attention keeps packed sequences apart. If not, or for hub code, a one-line notice and False (padding)."""
    name = unwrapped_class(model).__name__
    if any(type(m).__module__.startswith("transformers_modules") for m in model.modules()):
        reason = "its code comes from the hub (--trust_remote_code)"
    else:
        vocab = next(m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding))
        ids = torch.randint(vocab, (24,), generator=torch.Generator().manual_seed(0)).tolist()
        prompts, completions = [ids[:5], ids[5:6], ids[6:8], ids[8:15]], [ids[15:18], ids[18:19], ids[19:24], []]
        batch = collate(prompts, completions, 0, next(model.parameters()).device)
        training = model.training
        model.eval()  # no dropout: both forwards must be deterministic
        try:
            padded = forward_outputs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            layout = pack(batch, one_row=one_row(model))
            packed = unpack(forward_outputs(model, layout["input_ids"], None, layout["position_ids"],
                                            layout.get("varlen")), layout["index"])
        finally:
            model.train(training)
        real = batch["attention_mask"].bool()
        tolerance = 1e-4 if padded.dtype == torch.float32 else 3e-2  # relative to the outputs' scale
        padded, packed = padded[real].float(), packed[real].float()
        tolerance *= max(1.0, float(padded.abs().max()))
        gap = float((packed - padded).abs().max())
        if gap <= tolerance:
            return True
        reason = f"its outputs for packed sequences differ from padded ones by {gap:.2g}"
    if rank() == 0:
        print(f"padding-free: {name} pads its batches, as {reason}; --padding_free forces packing", file=sys.stderr)
    return False
