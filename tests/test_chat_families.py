"""Chat data on two real families' layouts (tests/chat_families.py): a Gemma-style template whose turns end with
<end_of_turn> and a newline (not the tokenizer's EOS), and a Phi-3-style SentencePiece tokenizer that puts
`▁` before each input. Every check is against an independent reference: the whole conversation rendered
and tokenized once, as the model reads it at inference, with each assistant content through the
template's end-of-turn marker scored, and nothing else."""
import json
import math

import pytest
import torch

import batching
import dpo
import formats
import sft
from conftest import read_metrics
from chat_families import FAMILIES, build_family_model

CONVERSATION = [{"role": "user", "content": "tell me about animals :"}, {"role": "assistant", "content": "cat dog"},
                {"role": "user", "content": "and fruits :"}, {"role": "assistant", "content": "apple pear"}]
PROMPT, REPLY = CONVERSATION[:1], CONVERSATION[1:2]
OTHER = [{"role": "assistant", "content": "red horse"}]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    from transformers import AutoTokenizer

    path = build_family_model(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, path, AutoTokenizer.from_pretrained(path)


def reference(tokenizer, family, conversation):
    """(the whole conversation's ids, the positions scored): each assistant content, found after the family's
    assistant opener, through the closer that follows it (Gemma: <end_of_turn>, Phi-3: <|end|>)."""
    *_, opener, closer = FAMILIES[family]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for m in conversation:
        if m["role"] == "assistant":
            start = text.index(opener + m["content"] + closer, pos) + len(opener)
            pos = start + len(m["content"]) + len(closer)
            spans.append((start, pos))
    scored = [j for j, (a, b) in enumerate(enc.offset_mapping) if any(b > s and a < e for s, e in spans)]
    return enc.input_ids, scored


def scored_positions(example, field):
    """Positions in prompt + completion of the ids the example scores."""
    mask = example.get(f"{field}_mask") or [1] * len(example[field])
    return [len(example["prompt"]) + j for j, m in enumerate(mask) if m]


def test_sft_conversations_score_each_turn_through_its_end_of_turn_marker(family):
    name, _, tokenizer = family
    (ex,) = formats.tokenize([{"prompt": PROMPT, "completion": CONVERSATION[1:]}], tokenizer, 512, ("completion",))
    whole, scored = reference(tokenizer, name, CONVERSATION)
    assert ex["prompt"] + ex["completion"] == whole[: len(ex["prompt"]) + len(ex["completion"])]
    assert scored_positions(ex, "completion") == scored
    # each turn ends at its marker: the newline after it and the template's final EOS are never scored
    end_of_turn = tokenizer.convert_tokens_to_ids(FAMILIES[name][3])
    assert [whole[j] for j in scored].count(end_of_turn) == 2 and ex["completion"][-1] == end_of_turn


def test_pairs_and_kto_rows_score_the_reply_through_its_marker_and_share_the_prompt(family, tmp_path):
    name, _, tokenizer = family
    data = tmp_path / "data.jsonl"
    for row, fields in (({"prompt": PROMPT, "chosen": REPLY, "rejected": OTHER}, ("chosen", "rejected")),
                        ({"chosen": PROMPT + REPLY, "rejected": PROMPT + OTHER}, ("chosen", "rejected")),
                        ({"prompt": PROMPT, "completion": REPLY, "label": True}, ("completion", "label"))):
        data.write_text(json.dumps(row) + "\n")
        scored_fields = tuple(f for f in fields if f != "label")
        (ex,) = formats.tokenize(formats.read_data(str(data), fields)[0], tokenizer, 512, scored_fields)
        for field, reply in zip(scored_fields, (REPLY, OTHER)):
            whole, scored = reference(tokenizer, name, PROMPT + reply)
            assert ex["prompt"] + ex[field] == whole[: scored[-1] + 1]  # the completion ends with the marker
            assert scored_positions(ex, field) == scored
    # the prompt ids are exactly what generation starts from
    assert ex["prompt"] == formats.encode_prompt(tokenizer, PROMPT)


def test_plain_text_is_tokenized_whole_with_an_eos_appended(family):
    _, _, tokenizer = family
    (ex,) = formats.tokenize([{"prompt": "tell me about animals :", "completion": " cat dog"}], tokenizer, 512,
                             ("completion",))
    whole = tokenizer("tell me about animals : cat dog").input_ids
    assert ex["prompt"] + ex["completion"] == whole + [tokenizer.eos_token_id]
    assert ex["prompt"] == tokenizer("tell me about animals :").input_ids and "completion_mask" not in ex


def test_a_token_merging_across_the_prompt_boundary_belongs_to_the_completion(capsys, tmp_path):
    """Phi-3-style: "cat do" + "g" tokenized whole is ▁cat ▁dog: the prompt keeps ▁cat (a prefix of the whole) and
    ▁dog is the completion's. In a pair whose other reply does not merge, the shared prompt is the longest
    common start, and the other reply's leading tokens of prompt text ("do") are left unscored."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_family_model("phi3", tmp_path))
    cat, dog, horse = tokenizer.convert_tokens_to_ids(["▁cat", "▁dog", "▁horse"])
    eos = tokenizer.eos_token_id
    do = tokenizer("cat do").input_ids[1:]  # "do" alone is not one word of this vocabulary's: ▁d o, say
    assert tokenizer("cat do").input_ids[0] == cat and tokenizer("cat dog").input_ids == [cat, dog]
    (ex,) = formats.tokenize([{"prompt": "cat do", "completion": "g", "_where": "d.jsonl:1"}], tokenizer, 64,
                             ("completion",))
    assert (ex["prompt"], ex["completion"]) == ([cat], [dog, eos])
    assert "d.jsonl:1" in capsys.readouterr().err  # a warning names the first example that merges
    (ex,) = formats.tokenize([{"prompt": "cat do", "chosen": "g", "rejected": " horse"}], tokenizer, 64,
                             ("chosen", "rejected"))
    assert tokenizer("cat do horse").input_ids == [cat, *do, horse]
    assert (ex["prompt"], ex["chosen"], ex["rejected"]) == ([cat], [dog, eos], [*do, horse, eos])
    assert ex["rejected_mask"] == [0] * len(do) + [1, 1] and "chosen_mask" not in ex
    labels = batching.collate_pairs([ex], tokenizer.pad_token_id, torch.device("cpu"))["labels"]
    assert labels.tolist() == [[dog, eos] + [-100] * len(do), [-100] * len(do) + [horse, eos]]


def naive_logps(path, ids, positions):
    """log p(ids[j] | ids[:j]) at each position j, from one plain forward of the whole sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return [logps[j - 1, ids[j]].item() for j in positions]


def test_sft_and_dpo_train_on_exactly_the_reference_tokens(family, tmp_path):
    """The scripts end to end: SFT's step-1 loss is the mean NLL of the reference's scored tokens, and DPO's
    step-1 log-probs are their sums (and its loss log 2, the policy being its reference)."""
    name, path, tokenizer = family
    data = tmp_path / "messages.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    out = str(tmp_path / "sft")
    sft.main(["--model", path, "--data", str(data), "--output_dir", out, "--max_steps", "1", "--log_every", "1",
              "--batch_size", "1", "--lr", "1e-9"])
    whole, scored = reference(tokenizer, name, CONVERSATION)
    nll = [-lp for lp in naive_logps(path, whole, scored)]
    assert read_metrics(out)[0]["loss"] == pytest.approx(sum(nll) / len(nll), abs=1e-5)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": PROMPT, "chosen": REPLY, "rejected": OTHER}) + "\n")
    out = str(tmp_path / "dpo")
    dpo.main(["--model", path, "--data", str(pairs), "--output_dir", out, "--max_steps", "1", "--log_every", "1",
              "--batch_size", "1", "--lr", "1e-9"])
    row = read_metrics(out)[0]
    for field, reply in (("chosen", REPLY), ("rejected", OTHER)):
        whole, scored = reference(tokenizer, name, PROMPT + reply)
        assert row[f"logps/{field}"] == pytest.approx(sum(naive_logps(path, whole, scored)), abs=1e-4)
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(beta * 0)
