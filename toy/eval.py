"""The toy task's evaluation, which every script calls at the start and end of training."""
import os

import torch

import batching
import common
import formats
from toy.task import DATA_DIR, gold_score


@torch.no_grad()
def evaluate(model, tokenizer, args, device, max_new_tokens=32):
    """Sampled generations (T=1, seeded) on the toy eval prompts: `eval/gold_score` and `eval/mean_length`
    (tokens, with EOS). Sampling, not greedy: the score is then a property of the whole policy."""
    rows = formats.read_jsonl(os.path.join(DATA_DIR, "eval_prompts.jsonl"), ["prompt"])
    mine = rows[common.rank()::common.world()]
    batch = batching.collate_prompts(formats.tokenize(mine, tokenizer, args.max_length, ()), tokenizer.pad_token_id, device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    stop = common.stop_ids(model.generation_config, tokenizer)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1234 + common.rank())  # the same samples every time; training RNG untouched
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True, top_k=0,
            top_p=1.0, temperature=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop,
            synced_gpus=common.world() > 1, use_cache=True,
        )[:, ids.shape[1]:]
    model.train(was_training)
    gold = length = 0.0
    for row, response in zip(mine, common.completions_from(out, stop)):
        length += len(response)
        gold += gold_score(row["prompt"], tokenizer.decode(response, skip_special_tokens=True))
    gold, length, n = common.all_sum([gold, length, len(mine)], device)
    return {"eval/gold_score": gold / n, "eval/mean_length": length / n}


def is_toy(args):
    """Whether --data is a bundled toy file, so the toy eval applies."""
    return os.path.abspath(os.path.dirname(args.data)) == os.path.abspath(DATA_DIR)
