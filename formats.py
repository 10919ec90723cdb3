"""Data files -> token ids: the accepted JSONL shapes, their validation (one line naming the file and
line), tokenization with the chat template, and the --max_length rule (README: Bring your own data).
"""
import bisect
import json
import os
import sys

from common import UserError, rank


def read_jsonl(path, required):
    """Rows of a JSONL file, each with the `required` fields; errors name the file and line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such data file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UserError(f"{path}:{n}: not valid UTF-8; re-encode the file as UTF-8") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if not rows and not line.startswith("{"):
                    raise UserError(f"{path}:{n}: expected JSONL, one object per line; {not_jsonl(line)}") from None
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                if not rows:
                    raise UserError(f"{path}:{n}: expected JSONL, one object per line; {not_jsonl(line)}")
                raise UserError(f"{path}:{n}: expected a JSON object with fields {', '.join(required)}")
            for field in required:
                if field not in row:
                    raise UserError(f"{path}:{n}: missing field {field!r}; each line needs {', '.join(required)}")
                check_field(row[field], f"{path}:{n}: field {field!r}", field)
            row["_where"] = f"{path}:{n}"
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no examples; the file is empty")
    return rows


def not_jsonl(first_line):
    if first_line.startswith("["):
        return "this is a JSON array: write one object per line (e.g. jq -c '.[]' data.json > data.jsonl)"
    return "this looks like CSV or plain text: convert it to one JSON object per line"


def check_field(value, where, field):
    if field == "label":
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {json.dumps(value)}")
        return
    if isinstance(value, list):
        if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                and isinstance(m.get("content"), str) for m in value):
            raise UserError(f"{where} must be a list of {{'role': str, 'content': str}} messages")
        value = "".join(m["content"] for m in value)
    elif not isinstance(value, str):
        raise UserError(f"{where} must be a string or a list of messages, got {json.dumps(value)}")
    if not value.strip() and field != "prompt":
        raise UserError(f"{where} is empty; remove the line or fill it in")


def row_shape(row, fields):
    """The shape of a data row, from its fields (and, for pairs with a prompt, whether the lists repeat it)."""
    def repeats_prompt(value):  # H4 style: the conversation starts with the prompt's turns
        return isinstance(value, list) and any(isinstance(m, dict) and m.get("role") != "assistant" for m in value)

    if fields == ("completion",) and "messages" in row and "completion" not in row:
        return "messages"
    if fields == ("chosen", "rejected") and "prompt" not in row and "chosen" in row:
        return "implicit prompt"
    if fields == ("chosen", "rejected") and repeats_prompt(row.get("chosen")) and repeats_prompt(row.get("rejected")):
        return "H4"
    chat = any(isinstance(row[f], list) for f in ("prompt", *fields) if f in row and f != "label")
    return "/".join(["prompt", *fields]) + (" chat" if chat else " text")


SHAPES = {  # what the one stderr line says about each detected shape
    "messages": "conversations, loss on every assistant turn and nothing else",
    "implicit prompt": "chosen/rejected conversations; the prompt is the messages they share",
    "H4": "a prompt plus chosen/rejected conversations that repeat it; the conversations are used",
    "text": "plain text, no chat template",
    "chat": "chat messages, rendered with the tokenizer's chat template",
}


def read_data(path, fields):
    """A data file in any accepted shape, as rows {"prompt", *fields, "_where"} that tokenize() takes, and a
    line naming the shape found (for the Logger's notes).

    fields: ("completion",) for SFT, ("chosen", "rejected") for pairs, ("completion", "label") for
    unpaired feedback, () for prompts. The first row's fields pick the shape; every later row must have it. Chat rows come out as a list of prompt messages and
    completions that start with an assistant turn; only SFT completions may hold later user turns,
    which are never scored. A string beside messages is a user prompt or an assistant reply.
    """
    rows = read_jsonl(path, [])
    shape = row_shape(rows[0], fields)
    for row in rows:
        where = row["_where"]
        if row_shape(row, fields) != shape:
            raise UserError(f"{where}: a {row_shape(row, fields)} row, but the first row is {shape}; "
                            "every row must have the same shape")
        required = {"messages": ["messages"], "implicit prompt": ["chosen", "rejected"]}.get(shape, ["prompt", *fields])
        for field in required:
            if field not in row:
                other = {("completion",): " (or one 'messages' conversation)",
                         ("chosen", "rejected"): " (or chosen and rejected conversations)"}.get(fields, "")
                raise UserError(f"{where}: missing field {field!r}; each line needs {', '.join(required)}{other}")
            check_field(row[field], f"{where}: field {field!r}", field)
        if shape == "messages":
            row.update(split_conversation(row.pop("messages"), where))
        elif shape in ("implicit prompt", "H4"):
            row.update(extract_prompt(row, where))
        elif shape.endswith(" chat"):
            if isinstance(row["prompt"], str):
                row["prompt"] = [{"role": "user", "content": row["prompt"]}]
            for f in fields:
                if isinstance(row[f], str) and f != "label":
                    row[f] = [{"role": "assistant", "content": row[f]}]
        for f in fields if shape.endswith(" chat") or shape in ("implicit prompt", "H4") else ():
            if f != "label":
                check_reply(row[f], f, fields, where)
    return rows, f"{path}: {shape} rows ({SHAPES[shape] if shape in SHAPES else SHAPES[shape.split()[-1]]})"


def split_conversation(messages, where):
    """A `messages` conversation as prompt (before the first assistant turn) and completion (through the last)."""
    scored = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not scored:
        raise UserError(f"{where}: field 'messages' has no assistant turn, so nothing to train on")
    if scored[0] == 0:
        raise UserError(f"{where}: field 'messages' starts with an assistant turn; put the user turn it answers first")
    return {"prompt": messages[: scored[0]], "completion": messages[scored[0]: scored[-1] + 1]}


def extract_prompt(row, where):
    """Implicit and H4 pairs: the prompt is the longest run of messages chosen and rejected start with."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise UserError(f"{where}: without a 'prompt' field, 'chosen' and 'rejected' must both be lists of messages "
                        "that start with the same prompt turns; for plain text, add a 'prompt' field")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise UserError(f"{where}: 'chosen' and 'rejected' do not start with the same message, so they share no prompt")
    prompt = row.get("prompt")
    ambiguous = (prompt != chosen[: len(prompt)] or len(prompt) > n if isinstance(prompt, list)
                 else prompt is not None and prompt.strip() not in [m["content"].strip() for m in chosen[:n]])
    if ambiguous:
        raise UserError(f"{where}: field 'prompt' is not among the turns 'chosen' and 'rejected' share, so "
                        "which prompt to train on is ambiguous; drop 'prompt' or make it the shared user turn")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def check_reply(messages, field, fields, where):
    """A chat completion starts with an assistant turn; outside SFT it is exactly one assistant turn."""
    roles = [m["role"] for m in messages]
    if not roles:
        raise UserError(f"{where}: field {field!r} has no reply after the prompt that 'chosen' and 'rejected' share")
    if roles[0] != "assistant" or (fields != ("completion",) and roles != ["assistant"]):
        need = "start with the assistant's reply" if fields == ("completion",) else "be one assistant reply"
        raise UserError(f"{where}: field {field!r} must {need} (its roles: {', '.join(roles)}); give whole "
                        "conversations as " + ("'messages'" if fields == ("completion",) else
                                               "'chosen' and 'rejected' lists that both repeat the prompt"))


def render_chat(tokenizer, messages, generation, where):
    """The chat template's text for `messages`; a template that refuses them (a role it lacks, roles that do
    not alternate) is an input error naming the row."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
    except TemplateError as e:
        roles = [m["role"] for m in messages]
        hint = ("; this model's template has no system role: merge it into the first user turn" if "system" in roles
                and "system" in str(e).lower() else "; give turns that alternate user/assistant, merging repeated "
                "ones" if any(a == b for a, b in zip(roles, roles[1:])) else "")
        raise UserError(f"{where}: the model's chat template refuses this conversation: {e}{hint}") from e


def encode_prompt(tokenizer, prompt, where="?"):
    """A plain prompt as the tokenizer encodes text (with BOS if it adds one); messages via the chat template."""
    if isinstance(prompt, list):
        return tokenizer(render_chat(tokenizer, prompt, True, where), add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def turn_ends(tokenizer):
    """The ids that can end an assistant turn: the tokenizer's special tokens (its EOS, and added ones such as
    Gemma's <end_of_turn>, Phi-3's <|end|> or Llama 3's <|eot_id|>)."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def chat_turns(tokenizer, prompt, completion, where):
    """The whole conversation's text, where its prompt ends, and each assistant turn of `completion` as
    (start, content end, end) character positions in that text.

    A turn starts where the template starts generating it (the render of the messages before it with
    add_generation_prompt) and ends where the render through it stops matching the whole conversation
    (Phi-3's template ends every render with an EOS that only the last turn keeps). No template syntax is
    assumed, but each render up to a generation prompt must be the start of the whole conversation's.
    """
    chat = prompt + completion

    def render(n, generation=False):
        return render_chat(tokenizer, chat[:n], generation, where)

    full = render(len(chat))
    boundary = pos = len(render(len(prompt), True))
    turns = []
    for i in range(len(prompt), len(chat)):
        if chat[i]["role"] != "assistant":
            continue
        head, end = render(i, True), len(os.path.commonprefix([render(i + 1), full]))
        content = chat[i]["content"].strip()  # templates may trim it
        found = full.find(content, len(head), end) if content else len(head)
        if not (full.startswith(head) and pos <= len(head) <= end) or found < 0:
            raise UserError(f"{where}: the chat template renders messages 1-{i + 1} differently from the start of the "
                            "whole conversation (it rewrites earlier turns), so the assistant turns cannot be "
                            "located; use a template that renders each turn the same way, or one reply per row")
        turns.append((len(head), found + len(content), end))
        pos = end
    return full, boundary, turns


def encode_whole(tokenizer, prompt, completion, ends, where):
    """(ids, n_prompt, mask, straddles): prompt + completion tokenized once, as one text, the way the model
    reads it at inference; ids[:n_prompt] are the tokens inside the prompt's text, mask marks the scored ids.

    Chat: an assistant turn is scored from its start through the first of `ends` after its content (the
    template's end-of-turn marker; the whole turn if it writes none), and nothing after that; nothing is
    appended. Plain text: the completion's tokens and an appended EOS. A token spanning the prompt's end
    (`straddles`: the two merge) belongs to the completion, so the prompt ids stay a prefix of the whole.
    """
    if isinstance(completion, list):
        text, boundary, turns = chat_turns(tokenizer, prompt, completion, where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc.input_ids, enc.offset_mapping
    else:
        text, boundary = prompt + completion, len(prompt)
        turns = [(boundary, len(text), len(text))]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        bare, ids = enc.input_ids, tokenizer(text).input_ids  # with the BOS (or other prefix) it adds
        lead = next(i for i in range(len(ids) - len(bare) + 1) if ids[i: i + len(bare)] == bare)
        ids, offsets = ids[: lead + len(bare)], [(0, 0)] * lead + enc.offset_mapping
    starts, stops = [a for a, _ in offsets], [b for _, b in offsets]
    n_prompt = bisect.bisect_right(stops, boundary)
    mask = [0] * len(ids)
    for start, content_end, end in turns:
        first = bisect.bisect_left(starts, content_end)
        marker = next((j for j in range(first, len(ids)) if starts[j] < end and ids[j] in ends), None)
        scored_end = end if marker is None or starts[marker] >= end else stops[marker]
        for j in range(bisect.bisect_right(stops, start), bisect.bisect_left(starts, scored_end)):
            mask[j] = 1
    straddles = n_prompt < len(ids) and starts[n_prompt] < boundary
    if not isinstance(completion, list) and ids[-1] != tokenizer.eos_token_id:
        ids, mask = ids + [tokenizer.eos_token_id], mask + [1]
    return ids, n_prompt, mask, straddles


def encode_example(tokenizer, prompt, completions, ends, where="?"):
    """(prompt ids, [(completion ids, mask or None)], whether a completion merges with the prompt): each
    prompt + completion tokenized once (encode_whole); the prompt ids are the longest start they share, so
    a pair's two completions follow the same prompt. A completion ends after its last scored token; mask
    is None when every id is scored, else a 0/1 list (user turns of an SFT conversation: 0)."""
    encoded = [encode_whole(tokenizer, prompt, c, ends, where) for c in completions]
    shared = min(n for _, n, _, _ in encoded)
    while shared and any(ids[:shared] != encoded[0][0][:shared] for ids, _, _, _ in encoded):
        shared -= 1
    out = []
    for ids, _, mask, _ in encoded:
        ids, mask = ids[shared:], mask[shared:]
        end = len(mask) - mask[::-1].index(1) if 1 in mask else 0
        out.append((ids[:end], None if all(mask[:end]) else mask[:end]))
    return encoded[0][0][:shared], out, any(s for _, _, _, s in encoded)


def truncate(prompt_ids, completion_lens, max_length):
    """The --max_length rule: cut the prompt from the left first, keeping at least half of max_length
    for it (if it has that many); completions are then cut from the right to fit. Returns
    (prompt_ids, completion budget, whether anything was cut)."""
    longest = max(completion_lens)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, max_length - len(prompt_ids), False
    keep = min(len(prompt_ids), max(max_length - longest, max_length // 2))
    return prompt_ids[len(prompt_ids) - keep:], max_length - keep, True


def tokenize(rows, tokenizer, max_length, fields):
    """Tokenize each row into {"prompt": ids, field: ids for field in fields, "label"?, "completion_mask"?}.

    `fields` are the completion fields: ("completion",), ("chosen", "rejected"), or () for prompts.
    Each prompt + completion is tokenized once, as one text (encode_example); the prompt ids are shared by
    a pair's two completions. A multi-turn chat (SFT) also gets "completion_mask", 0/1 over the completion
    ids: its user turns and role headers sit in the completion but are never scored (collate's `masks`).
    Prompts alone (fields ()) are tokenized as generation will see them. The first completion token is
    always predicted from a prompt token (BOS, for an empty prompt), never from padding: a prompt of zero
    tokens is an error, and so is a max_length that cannot keep one prompt token and a whole completion.
    """
    examples, cut_at, unfit, merged, ends = [], [], [], [], turn_ends(tokenizer)
    for row in rows:
        where = row.get("_where", "?")
        if fields:
            prompt, encoded, merges = encode_example(tokenizer, row["prompt"], [row[f] for f in fields], ends, where)
            merged += [where] * merges
        else:
            prompt, encoded = encode_prompt(tokenizer, row["prompt"], where), []
        if not prompt:
            raise UserError(f"{where}: the prompt is empty after tokenization and this tokenizer adds no BOS "
                            "token, so no token would predict the completion's first token; give it a prompt")
        need = 1 + max((len(ids) for ids, _ in encoded), default=0)  # one prompt token and the longest whole completion
        unfit += [(where, need)] * (need > max_length)
        prompt, budget, cut = truncate(prompt, [len(ids) for ids, _ in encoded] or [0], max_length)
        cut_at += [where] * cut
        ex = {"prompt": prompt, **{f: ids[:budget] for f, (ids, _) in zip(fields, encoded)}}
        ex.update({f"{f}_mask": mask[:budget] for f, (_, mask) in zip(fields, encoded) if mask})
        if "label" in row:
            ex["label"] = row["label"]
        examples.append(ex)
    if unfit:
        raise UserError(f"{unfit[0][0]}: --max_length {max_length} cannot hold one prompt token and the whole "
                        f"completion, EOS included ({len(unfit)} of {len(rows)} examples); use --max_length "
                        f"{max(need for _, need in unfit)} or more")
    if merged and rank() == 0:
        print(f"warning: in {len(merged)} of {len(rows)} examples (the first at {merged[0]}) the prompt's end and the "
              "completion's start merge into one token when tokenized together, as the model reads them; that token "
              "is scored as the completion's. Start each completion with the space or newline that separates it "
              "(prompt + completion is tokenized as one text)", file=sys.stderr)
    if cut_at and rank() == 0:
        print(f"warning: {len(cut_at)} of {len(rows)} examples (the first at {cut_at[0]}) are longer than "
              f"--max_length {max_length} and were truncated, not dropped (prompt from the left first, then the "
              "completion); raise --max_length to keep them whole", file=sys.stderr)
    return examples
