"""Data shapes: every accepted shape of a data file, the exact tokens each one scores, and
the refusals. Most checks use the Qwen-style chat model (byte-level BPE, no BOS, ChatML with a default
system prompt, <|im_end|> as EOS) that a new user brings; some also the tiny model's word-level one."""
import json
import math
import os
import re

import pytest
import torch

import batching
import common
import dpo
import formats
import kto
import logprobs
import models
import sft

CPU = torch.device("cpu")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


TWO_TURNS = [user("tell me about animals :"), assistant("cat dog"), user("and fruits :"), assistant("apple")]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def qwen(chat_model):
    return models.load_tokenizer(chat_model)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return models.load_tokenizer(tiny_model)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_two_turn_conversation_scores_both_assistant_turns_and_nothing_else(tmp_path, qwen):
    """The rendered conversation, split by hand at ChatML's turn boundaries: the prompt is everything up
    to the first assistant header; the completion holds "cat dog<|im_end|>" (scored), the newline, the
    second user turn and the assistant header (not scored), then "apple<|im_end|>" (scored)."""
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}, {"messages": [user("hi"), assistant("cat")]}])
    rows, note = formats.read_data(path, ("completion",))
    assert note == f"{path}: messages rows (conversations, loss on every assistant turn and nothing else)"
    ex = formats.tokenize(rows, qwen, 512, ("completion",))[0]
    assert ex["prompt"] == encode(qwen, SYSTEM + "<|im_start|>user\ntell me about animals :<|im_end|>\n"
                                          "<|im_start|>assistant\n")
    first, between, second = (encode(qwen, "cat dog<|im_end|>"),
                              encode(qwen, "\n<|im_start|>user\nand fruits :<|im_end|>\n<|im_start|>assistant\n"),
                              encode(qwen, "apple<|im_end|>"))
    batch = batching.collate_single([ex], qwen.pad_token_id, CPU)
    assert batch["labels"][0].tolist() == first + [-100] * len(between) + second
    assert batch["input_ids"][0].tolist() == ex["prompt"] + first + between + second
    scored = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert qwen.convert_ids_to_tokens(scored) == ["c", "at", "Ġd", "og", "<|im_end|>", "a", "p", "ple", "<|im_end|>"]


def test_two_turn_conversation_on_the_word_level_template(tiny):
    (ex,) = formats.tokenize([{"prompt": [user("tell me about animals :")],
                              "completion": TWO_TURNS[1:], "_where": "x:1"}], tiny, 512, ("completion",))
    batch = batching.collate_single([ex], tiny.pad_token_id, CPU)
    labels = [tiny.convert_ids_to_tokens(t) if t != -100 else None for t in batch["labels"][0].tolist()]
    assert labels == ["cat", "dog", "</s>", None, None, None, None, None, None, "apple", "</s>"]
    assert tiny.convert_ids_to_tokens(ex["completion"][3:9]) == ["<|user|>", "and", "fruits", ":", "</s>", "<|assistant|>"]


def test_multi_turn_sft_loss_is_the_mean_over_assistant_tokens(chat_model, qwen):
    """sft_loss on a batch equals the naive mean of -log p over the hand-marked assistant tokens."""
    model = models.load_model(chat_model, CPU)
    (ex,) = formats.tokenize([{"prompt": TWO_TURNS[:1], "completion": TWO_TURNS[1:]}], qwen, 512, ("completion",))
    batch = batching.collate_single([ex], qwen.pad_token_id, CPU)
    n_scored = int((batch["labels"] != -100).sum())
    loss = sft.sft_loss(logprobs.token_logps(model, batch), batch["labels"] != -100, n_scored)
    ids = torch.tensor([ex["prompt"] + ex["completion"]])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    P, a, between, b = len(ex["prompt"]), 5, len(encode(qwen, "\n<|im_start|>user\nand fruits :<|im_end|>\n"
                                                            "<|im_start|>assistant\n")), 4
    # token t (t >= 1) is predicted at position t - 1; the assistant tokens are P..P+a-1 and P+a+between..+b-1
    positions = list(range(P - 1, P - 1 + a)) + list(range(P - 1 + a + between, P - 1 + a + between + b))
    assert n_scored == a + b == 9
    torch.testing.assert_close(loss, -logps[positions].mean(), atol=1e-5, rtol=0)  # float32 sums of 9 terms near 6


def test_messages_with_one_turn_equal_prompt_completion(tmp_path, qwen):
    chat = [{"role": "system", "content": "be brief"}, user("tell me about animals :"), assistant("cat dog")]
    a = formats.tokenize(formats.read_data(write_jsonl(tmp_path / "a.jsonl", [{"messages": chat + [user("bye")]}]),
                                         ("completion",))[0], qwen, 512, ("completion",))
    b = formats.tokenize(formats.read_data(write_jsonl(tmp_path / "b.jsonl", [{"prompt": chat[:2], "completion": chat[2:]}]),
                                         ("completion",))[0], qwen, 512, ("completion",))
    assert a == b and "completion_mask" not in a[0]  # a trailing user turn is dropped, nothing left unscored
    assert a[0]["prompt"][:len(encode(qwen, "<|im_start|>system\nbe brief"))] == encode(qwen, "<|im_start|>system\nbe brief")


PROMPT, GOOD, BAD = "tell me about animals :", "cat dog", "red"
PAIR_SHAPES = {
    "explicit": {"prompt": [user(PROMPT)], "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
    "implicit": {"chosen": [user(PROMPT), assistant(GOOD)], "rejected": [user(PROMPT), assistant(BAD)]},
    "H4": {"prompt": PROMPT, "chosen": [user(PROMPT), assistant(GOOD)], "rejected": [user(PROMPT), assistant(BAD)]},
    "text prompt, message replies": {"prompt": PROMPT, "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
    "message prompt, text replies": {"prompt": [user(PROMPT)], "chosen": GOOD, "rejected": BAD},
}


def test_pair_shapes_give_identical_tokens_and_scores(tmp_path, chat_model, qwen):
    model = models.load_model(chat_model, CPU)
    batches, lines = {}, []
    for name, row in PAIR_SHAPES.items():
        rows, note = formats.read_data(write_jsonl(tmp_path / "pairs.jsonl", [row]), ("chosen", "rejected"))
        lines.append(note)
        examples = formats.tokenize(rows, qwen, 512, ("chosen", "rejected"))
        batches[name] = batching.collate_pairs(examples, qwen.pad_token_id, CPU)
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == [
        "prompt/chosen/rejected chat rows", "implicit prompt rows", "H4 rows"] + ["prompt/chosen/rejected chat rows"] * 2
    explicit = batches["explicit"]
    assert explicit["input_ids"][0].tolist() == encode(qwen, SYSTEM + f"<|im_start|>user\n{PROMPT}<|im_end|>\n"
                                                               f"<|im_start|>assistant\n{GOOD}<|im_end|>")
    assert explicit["labels"][0].tolist() == encode(qwen, f"{GOOD}<|im_end|>")  # the user turn is never scored
    scores = logprobs.token_logps(model, explicit)
    for name, batch in batches.items():
        assert all(torch.equal(batch[k], explicit[k]) for k in explicit), name
        assert torch.equal(logprobs.token_logps(model, batch), scores), name


def test_multi_turn_implicit_pair_takes_the_shared_turns_as_prompt(tmp_path, qwen):
    chosen, rejected = TWO_TURNS, TWO_TURNS[:3] + [assistant("red")]
    rows, _ = formats.read_data(write_jsonl(tmp_path / "p.jsonl", [{"chosen": chosen, "rejected": rejected}]),
                               ("chosen", "rejected"))
    assert rows[0]["prompt"] == TWO_TURNS[:3] and rows[0]["chosen"] == TWO_TURNS[3:]
    (ex,) = formats.tokenize(rows, qwen, 512, ("chosen", "rejected"))
    assert ex["chosen"] == encode(qwen, "apple<|im_end|>") and ex["rejected"] == encode(qwen, "red<|im_end|>")


def test_kto_and_ppo_read_messages(tmp_path, qwen):
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": [user(PROMPT)], "completion": [assistant(GOOD)], "label": True},
                                                  {"prompt": [user(PROMPT)], "completion": BAD, "label": False}])
    rows, _ = kto.read_feedback(unpaired)
    assert [r["completion"] for r in rows] == [[assistant(GOOD)], [assistant(BAD)]]
    pairs, _ = kto.read_feedback(write_jsonl(tmp_path / "p.jsonl", [PAIR_SHAPES["implicit"]]))
    assert [(r["prompt"], r["completion"], r["label"]) for r in pairs] == [
        ([user(PROMPT)], [assistant(GOOD)], True), ([user(PROMPT)], [assistant(BAD)], False)]
    examples = formats.tokenize(pairs, qwen, 512, ("completion",))
    assert examples[0]["completion"] == encode(qwen, f"{GOOD}<|im_end|>")
    prompts, _ = formats.read_data(write_jsonl(tmp_path / "q.jsonl", [{"prompt": [user(PROMPT)]}]), ())
    (ex,) = formats.tokenize(prompts, qwen, 512, ())
    assert ex["prompt"] == encode(qwen, SYSTEM + f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")


REFUSALS = {  # case: (fields, rows or file text, the message after "data.jsonl:LINE: ")
    "shape_changes": (("completion",), [{"messages": TWO_TURNS}, {"prompt": "p", "completion": "c"}],
                      "2: a prompt/completion text row, but the first row is messages"),
    "text_then_chat": (("completion",), [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": [assistant("c")]}],
                       "2: a prompt/completion chat row, but the first row is prompt/completion text"),
    "no_assistant_turn": (("completion",), [{"messages": [user("hi")]}], "1: field 'messages' has no assistant turn"),
    "starts_with_assistant": (("completion",), [{"messages": [assistant("hi"), user("x")]}],
                              "1: field 'messages' starts with an assistant turn"),
    "completion_starts_with_user": (("completion",), [{"prompt": "p", "completion": [user("q"), assistant("a")]}],
                                    "1: field 'completion' must start with the assistant's reply"),
    "implicit_text": (("chosen", "rejected"), [{"chosen": "p a", "rejected": "p b"}],
                      "1: without a 'prompt' field, 'chosen' and 'rejected' must both be lists of messages"),
    "implicit_no_shared_prompt": (("chosen", "rejected"), [{"chosen": [user("p"), assistant("a")],
                                                           "rejected": [user("q"), assistant("b")]}],
                                  "1: 'chosen' and 'rejected' do not start with the same message"),
    "implicit_same_conversation": (("chosen", "rejected"), [{"chosen": TWO_TURNS, "rejected": TWO_TURNS}],
                                   "1: field 'chosen' has no reply after the prompt"),
    "h4_prompt_not_shared": (("chosen", "rejected"), [{"prompt": "something else", **PAIR_SHAPES["implicit"]}],
                             "1: field 'prompt' is not among the turns 'chosen' and 'rejected' share"),
    "h4_on_one_side_only": (("chosen", "rejected"), [{"prompt": PROMPT, "chosen": PAIR_SHAPES["implicit"]["chosen"],
                                                      "rejected": [assistant(BAD)]}],
                            "1: field 'chosen' must be one assistant reply (its roles: user, assistant)"),
    "pair_reply_of_two_turns": (("chosen", "rejected"), [{"prompt": PROMPT, "chosen": [assistant("a"), assistant("b")],
                                                          "rejected": "c"}],
                                "1: field 'chosen' must be one assistant reply (its roles: assistant, assistant)"),
    "kto_reply_with_user_turn": (("completion", "label"), [{"prompt": PROMPT, "completion": TWO_TURNS[1:], "label": True}],
                                 "1: field 'completion' must be one assistant reply"),
    "json_array": (("completion",), json.dumps([{"prompt": "p", "completion": "c"}] * 2, indent=1),
                   "1: expected JSONL, one object per line; this is a JSON array"),
    "json_array_one_line": (("completion",), json.dumps([{"prompt": "p", "completion": "c"}] * 2),
                            "1: expected JSONL, one object per line; this is a JSON array"),
    "csv": (("completion",), "prompt,completion\nhi,there\n", "1: expected JSONL, one object per line; this looks like CSV"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_file_and_line(tmp_path, case):
    fields, rows, message = REFUSALS[case]
    path = tmp_path / "data.jsonl"
    write_jsonl(path, rows) if isinstance(rows, list) else path.write_text(rows)
    with pytest.raises(common.UserError, match="^" + re.escape(f"{path}:{message}")):
        formats.read_data(str(path), fields)


REWRITING = ("{% for m in messages %}<|{{ m['role'] }}|> "  # earlier replies shown as "...", as templates that
             "{{ m['content'] if loop.last or m['role'] != 'assistant' else '...' }} </s> {% endfor %}"  # drop reasoning do
             "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def test_template_that_rewrites_earlier_turns_is_refused(tiny):
    tiny.chat_template, template = REWRITING, tiny.chat_template
    try:
        with pytest.raises(common.UserError, match=r"^data.jsonl:7: the chat template renders messages 1-2 "
                                                   r"differently from the start of the whole conversation"):
            formats.tokenize([{"prompt": TWO_TURNS[:1], "completion": TWO_TURNS[1:], "_where": "data.jsonl:7"}],
                            tiny, 512, ("completion",))
        # one reply per row renders the same either way: accepted
        formats.tokenize([{"prompt": TWO_TURNS[:1], "completion": TWO_TURNS[1:2]}], tiny, 512, ("completion",))
    finally:
        tiny.chat_template = template


def test_truncation_cuts_the_mask_with_the_completion(qwen):
    row = {"prompt": TWO_TURNS[:1], "completion": TWO_TURNS[1:]}
    (whole,) = formats.tokenize([row], qwen, 512, ("completion",))
    (cut,) = formats.tokenize([row], qwen, 40, ("completion",))  # the prompt keeps 20 tokens, the completion 20
    n = len(cut["completion"])
    assert len(cut["prompt"]) == n == 20 and len(whole["completion"]) > 20
    assert cut["completion"] == whole["completion"][:n] and cut["completion_mask"] == whole["completion_mask"][:n]
    assert cut["completion_mask"][:6] == [1, 1, 1, 1, 1, 0]  # "cat dog<|im_end|>", then the unscored turns


def test_sft_and_dpo_train_on_chat_shapes(tmp_path, chat_model, capsys):
    """A few real steps of sft.py on multi-turn messages and dpo.py on H4 pairs with the Qwen-style model."""
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": TWO_TURNS}] * 4)
    sft.main(["--model", chat_model, "--data", chats, "--output_dir", str(tmp_path / "sft"), "--max_steps", "3",
              "--batch_size", "2", "--log_every", "1", "--lr", "1e-2"])
    assert f"{chats}: messages rows (conversations, loss on every assistant turn" in capsys.readouterr().err
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(losses) == 3 and losses[-1] < losses[0] and all(math.isfinite(x) for x in losses)
    pairs = write_jsonl(tmp_path / "h4.jsonl", [PAIR_SHAPES["H4"]] * 4)
    dpo.main(["--model", chat_model, "--data", pairs, "--output_dir", str(tmp_path / "dpo"), "--max_steps", "3",
              "--batch_size", "2", "--log_every", "1", "--lr", "1e-2"])
    rows = [json.loads(line) for line in open(tmp_path / "dpo" / "metrics.jsonl")]
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-4  # the policy starts as the reference: -log sigmoid(0)
    assert rows[-1]["loss"] < rows[0]["loss"]  # step 1 warms up from lr 0; steps 2-3 learn
    assert os.path.isfile(tmp_path / "dpo" / "model.safetensors")
