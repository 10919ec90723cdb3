"""common.py: log-prob gathering, label masks, data validation, truncation and collation."""
import json
import os
import shutil

import pytest
import torch

import batching
import common
import formats
import logprobs
import models
from conftest import naive_completion_logps
from toy.task import TINY_MODEL_DIR


def naive_logps(logits, labels):
    """The reference form: a full log_softmax, then gather; 0 where labels == -100."""
    mask = labels != -100
    out = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return out * mask


@pytest.mark.parametrize("vocab", [7, 32768])
def test_gather_logps_matches_naive(vocab):
    torch.manual_seed(0)
    logits = torch.randn(5, 6, vocab) * 3
    labels = torch.randint(0, vocab, (5, 6))
    labels[0, :2] = -100  # left padding
    labels[1, -3:] = -100  # right padding
    labels[2, 1:4] = -100  # a hole in the middle
    labels[3, :] = -100  # an empty row
    got = logprobs.gather_logps(logits, labels)
    torch.testing.assert_close(got, naive_logps(logits, labels), atol=1e-5, rtol=1e-6)  # |logp| up to ~20
    assert (got[labels == -100] == 0).all()


def test_gather_logps_gradient_matches_naive():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 4))
    labels[0, 0] = labels[2, 3] = -100
    logprobs.gather_logps(logits, labels).sum().backward()
    ours, logits.grad = logits.grad, None
    naive_logps(logits, labels).sum().backward()
    torch.testing.assert_close(ours, logits.grad, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return models.load_tokenizer(TINY_MODEL_DIR)


def test_labels_score_each_completion_token_once(tokenizer):
    rows = [{"prompt": "tell me about animals :", "completion": "cat dog"},
            {"prompt": "tell me about fruits and colors :", "completion": "apple"}]
    examples = formats.tokenize(rows, tokenizer, 64, ("completion",))
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    cat, dog, apple = tokenizer.convert_tokens_to_ids(["cat", "dog", "apple"])
    assert examples[0]["completion"] == [cat, dog, eos]  # the completion ends with exactly one EOS
    assert examples[0]["prompt"][0] == bos and len(examples[0]["prompt"]) == 6
    batch = batching.collate_single(examples, tokenizer.pad_token_id, torch.device("cpu"))
    # prompts are left-padded to 8 tokens; every completion starts at column 8
    assert batch["labels"].tolist() == [[cat, dog, eos], [apple, eos, -100]]
    assert batch["input_ids"][0, 8:].tolist() == [cat, dog, eos]
    assert batch["input_ids"][1, 8:10].tolist() == [apple, eos]
    assert batch["attention_mask"].tolist() == [[0, 0] + [1] * 9, [1] * 10 + [0]]
    # positions count real tokens only, so left padding does not shift them
    assert batch["position_ids"][0, 2:].tolist() == list(range(9))


def test_token_logps_match_full_forward_and_ignore_padding(tiny_model, tokenizer):
    """Scored positions equal a plain full forward's log_softmax; padding on either side changes nothing."""
    model = models.load_model(tiny_model, torch.device("cpu"))
    rows = [{"prompt": "tell me about animals :", "completion": "cat dog horse"},
            {"prompt": "tell me about fruits and colors and tools :", "completion": "apple"}]
    examples = formats.tokenize(rows, tokenizer, 64, ("completion",))
    batch = batching.collate_single(examples, tokenizer.pad_token_id, torch.device("cpu"))
    ours = logprobs.token_logps(model, batch)
    for i, ex in enumerate(examples):  # each example alone, unpadded, through the naive path
        ids = torch.tensor([ex["prompt"] + ex["completion"]])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = ids[0, 1:]
        naive = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        scored = naive[len(ex["prompt"]) - 1:]  # the first completion token is predicted by the last prompt token
        torch.testing.assert_close(ours[i, : len(ex["completion"])], scored, atol=1e-5, rtol=0)
        assert (ours[i, len(ex["completion"]):] == 0).all()
    sums, counts = logprobs.sequence_logps(model, batch)
    assert counts.tolist() == [4, 2]
    torch.testing.assert_close(sums, ours.sum(-1))


def test_empty_prompt_is_scored_after_bos(tiny_model, tokenizer):
    """The toy tokenizer adds BOS: an empty prompt is [BOS], which predicts the first completion token, in a batch
    mixed with a longer prompt (so the row is left-padded) and in a batch of empty prompts only."""
    model = models.load_model(tiny_model, torch.device("cpu"))
    rows = [{"prompt": "", "completion": "cat dog"},
            {"prompt": "tell me about fruits and colors :", "completion": "apple"}]
    examples = formats.tokenize(rows, tokenizer, 64, ("completion",))
    assert examples[0]["prompt"] == [tokenizer.bos_token_id]
    alone = naive_completion_logps(model, tokenizer, "", "cat dog")  # [BOS] predicts cat, then dog, then EOS
    assert len(alone) == 3
    with torch.no_grad():
        for batch_rows in (examples, examples[:1] * 2):
            batch = batching.collate_single(batch_rows, tokenizer.pad_token_id, torch.device("cpu"))
            torch.testing.assert_close(logprobs.token_logps(model, batch)[0], alone, atol=1e-5, rtol=0)


def test_empty_prompt_without_bos_is_an_error_naming_the_line(no_bos_model):
    """A Qwen-style tokenizer adds no BOS: an empty prompt has no token to predict the completion's first one."""
    tokenizer = models.load_tokenizer(no_bos_model)
    assert tokenizer.bos_token is None
    rows = [{"prompt": "tell me :", "completion": "cat", "_where": "data.jsonl:1"},
            {"prompt": " ", "completion": "cat", "_where": "data.jsonl:2"}]
    (example,) = formats.tokenize(rows[:1], tokenizer, 64, ("completion",))
    assert example["prompt"] == tokenizer.convert_tokens_to_ids(["tell", "me", ":"])  # no BOS in front
    with pytest.raises(common.UserError, match=r"^data.jsonl:2: the prompt is empty after tokenization"):
        formats.tokenize(rows, tokenizer, 64, ("completion",))


def test_max_length_must_hold_one_prompt_token_and_every_whole_completion(tokenizer):
    # completions with EOS: "cat" -> 2 tokens, "cat dog horse" -> 4; so max_length 5 fits every example, 4 does not
    rows = [{"prompt": "tell me about animals :", "completion": "cat", "_where": "data.jsonl:1"},
            {"prompt": "tell me :", "completion": "cat dog horse", "_where": "data.jsonl:2"}]
    with pytest.raises(common.UserError, match=r"^data.jsonl:2: --max_length 4 cannot hold .* use --max_length 5 or"):
        formats.tokenize(rows, tokenizer, 4, ("completion",))
    # at 5, the documented truncation rule applies: the prompt keeps max(5 - longest, 5 // 2) tokens, from the left
    examples = formats.tokenize(rows, tokenizer, 5, ("completion",))
    assert examples[0]["prompt"] == tokenizer.convert_tokens_to_ids(["about", "animals", ":"])  # keeps 5 - 2 = 3
    assert examples[1]["prompt"] == tokenizer.convert_tokens_to_ids(["me", ":"])  # keeps 5 // 2 = 2 of 4
    assert [len(e["completion"]) for e in examples] == [2, 3]  # the second one cut to the 3 tokens left


def test_conversational_format_uses_chat_template(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "tell me about animals :"}],
             "completion": [{"role": "assistant", "content": "cat dog"}]}]
    (ex,) = formats.tokenize(rows, tokenizer, 64, ("completion",))
    assert tokenizer.convert_ids_to_tokens(ex["prompt"]) == [
        "<|user|>", "tell", "me", "about", "animals", ":", "</s>", "<|assistant|>"]
    assert tokenizer.convert_ids_to_tokens(ex["completion"]) == ["cat", "dog", "</s>"]


def test_truncation_cuts_prompt_from_the_left_first():
    prompt = list(range(10))
    # fits: nothing cut
    assert formats.truncate(prompt, [4], 14) == (prompt, 4, False)
    # 10 + 4 > 12: the prompt loses its first 2 tokens, the completion keeps all 4
    assert formats.truncate(prompt, [4], 12) == (prompt[2:], 4, True)
    # 10 + 9 > 12: the prompt keeps half of max_length (6), the completion gets the other 6
    assert formats.truncate(prompt, [9, 3], 12) == (prompt[4:], 6, True)


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return str(path)


GOOD = json.dumps({"prompt": "p", "completion": "c"})


@pytest.mark.parametrize("bad, message", [
    ("{not json", "data.jsonl:2: not valid JSON"),
    (json.dumps({"prompt": "p"}), "data.jsonl:2: missing field 'completion'"),
    (json.dumps({"prompt": "p", "completion": ""}), "data.jsonl:2: field 'completion' is empty"),
    (json.dumps({"prompt": "p", "completion": 3}), "data.jsonl:2: field 'completion' must be a string"),
    (json.dumps({"prompt": [{"role": "user"}], "completion": "c"}), "data.jsonl:2: field 'prompt' must be a list of"),
    (json.dumps([1, 2]), "data.jsonl:2: expected a JSON object"),
    (b'{"prompt": "p", "completion": "\xff"}', "data.jsonl:2: not valid UTF-8"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, [GOOD, bad])
    with pytest.raises(common.UserError, match=message.replace("(", r"\(")):
        formats.read_jsonl(path, ["prompt", "completion"])


def test_label_must_be_boolean_and_empty_file_is_an_error(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "p", "completion": "c", "label": "yes"})])
    with pytest.raises(common.UserError, match="data.jsonl:1: field 'label' must be true or false"):
        formats.read_jsonl(path, ["prompt", "completion", "label"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(common.UserError, match="empty.jsonl: no examples"):
        formats.read_jsonl(str(empty), ["prompt"])


def test_micro_batches_shard_one_global_batch_across_ranks(monkeypatch):
    """Two ranks with batch_size 2 see exactly the 4 examples one rank with batch_size 4 sees."""
    class Args:
        batch_size, grad_accum, seed, data = 4, 1, 0, "x"
    examples = list(range(10))
    single = batching.micro_batches(examples, 3, Args)[0]
    Args.batch_size = 2
    monkeypatch.setattr(batching, "world", lambda: 2)
    shards = []
    for r in range(2):
        monkeypatch.setattr(batching, "rank", lambda r=r: r)
        shards += batching.micro_batches(examples, 3, Args)[0]
    assert shards == single and len(set(single)) == 4
    Args.batch_size = 6
    with pytest.raises(common.UserError, match="fewer than one global batch"):
        batching.micro_batches(examples, 0, Args)


def test_pad_token_falls_back_to_eos(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(os.path.join(TINY_MODEL_DIR, "config.json"), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # check_model_path only looks for the file
    reloaded = models.load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == reloaded.eos_token == "</s>"


def test_stop_ids_join_the_tokenizer_eos_and_the_declared_ones(tokenizer):
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    assert common.stop_ids(GenerationConfig(eos_token_id=None), tokenizer) == [eos]
    assert common.stop_ids(GenerationConfig(eos_token_id=eos), tokenizer) == [eos]
    assert common.stop_ids(GenerationConfig(eos_token_id=7), tokenizer) == [eos, 7]
    assert common.stop_ids(GenerationConfig(eos_token_id=[7, eos, 9]), tokenizer) == [eos, 7, 9]


def test_a_run_that_ends_well_ends_torch_distributed(tiny_model, tmp_path):
    # bf16 on CPU runs as one FSDP2 rank (an in-memory process group); gloo's threads left running at exit
    # can abort a finished rank, so common.run destroys the group once main returns
    import torch.distributed as dist

    import sft

    during = []

    def main():
        sft.main(["--model", tiny_model, "--max_steps", "1", "--batch_size", "2", "--dtype", "bfloat16",
                  "--output_dir", str(tmp_path / "run")])
        during.append(dist.is_initialized())
    common.run(main)
    assert during == [True] and not dist.is_initialized()
