"""The benchmark workload, built offline: a ~20M-parameter Llama with a 32k word-level vocabulary,
and fixed-length data (prompt 64 tokens with BOS, completions 128 tokens with EOS).

Every row has the same length, so every implementation sees exactly the same tokens and no
padding: the comparison is of the training step, not of the collators.

The realistic workload (build_realistic_data, in out_dir/realistic) has the length spread of public
chat preference sets instead: lognormal prompt and response lengths (medians 90 and 220 tokens,
long tails, at most 384 + 640 tokens so nothing is truncated at max_length 1024), seeded.
"""
import json
import math
import os
import random

PROMPT_TOKENS, COMPLETION_TOKENS = 64, 128  # BOS + 63 words; 127 words + EOS
N_PAIRS = 64
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def memory_mb(field):
    """This process's /proc/self/status `field` (VmRSS: resident now, VmHWM: the peak so far) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**10


def model_config(vocab_size=32000, hidden_size=256, layers=4):
    """Llama-style: 4 layers, hidden 256, 4 heads, SwiGLU 704; 19.6M parameters at 32k vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=704, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def build_model(out_dir, seed=0):
    """Random weights and a word-level tokenizer ("w4" .. "w31999") saved as a HF directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    config = model_config()
    vocab = {w: i for i, w in enumerate(SPECIALS + [f"w{i}" for i in range(len(SPECIALS), config.vocab_size)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def words(rng, n):
    return " ".join(f"w{rng.randrange(len(SPECIALS), 32000)}" for _ in range(n))


def build_data(out_dir, seed=0):
    """pairs.jsonl (DPO), sft.jsonl and unpaired.jsonl (KTO, half desirable) from the same texts.

    Completions start with a space: TRL tokenizes prompt + completion as one string."""
    rng = random.Random(seed)
    pairs = [{"prompt": words(rng, PROMPT_TOKENS - 1), "chosen": " " + words(rng, COMPLETION_TOKENS - 1),
              "rejected": " " + words(rng, COMPLETION_TOKENS - 1)} for _ in range(N_PAIRS)]
    write_data(out_dir, pairs)


def write_data(out_dir, pairs):
    single = [{"prompt": p["prompt"], "completion": p[k]} for p in pairs for k in ("chosen", "rejected")]
    files = {
        "pairs.jsonl": pairs,
        "sft.jsonl": single,
        "unpaired.jsonl": [dict(row, label=i % 2 == 0) for i, row in enumerate(single)],
    }
    for name, rows in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


PROMPT_MEDIAN, RESPONSE_MEDIAN, SIGMA = 90, 220, 0.6  # lognormal: p95 = 2.7 x median, p99 = 4 x median
PROMPT_MAX, RESPONSE_MAX, MAX_LENGTH = 384, 640, 1024


def lognormal_length(rng, median, longest):
    return max(2, min(longest, round(rng.lognormvariate(math.log(median), SIGMA))))


def build_realistic_data(out_dir, seed=0):
    """The three files of build_data, with realistic lengths (counted in tokens, BOS and EOS included)."""
    rng = random.Random(seed)

    def response():
        return " " + words(rng, lognormal_length(rng, RESPONSE_MEDIAN, RESPONSE_MAX) - 1)

    pairs = [{"prompt": words(rng, lognormal_length(rng, PROMPT_MEDIAN, PROMPT_MAX) - 1), "chosen": response(),
              "rejected": response()} for _ in range(N_PAIRS)]
    write_data(out_dir, pairs)


def build(out_dir):
    """The model in out_dir/model and the data files in out_dir, unless already there."""
    model_dir = os.path.join(out_dir, "model")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        os.makedirs(model_dir, exist_ok=True)
        build_model(model_dir)
        build_data(out_dir)
    if not os.path.exists(os.path.join(out_dir, "realistic", "pairs.jsonl")):
        os.makedirs(os.path.join(out_dir, "realistic"), exist_ok=True)
        build_realistic_data(os.path.join(out_dir, "realistic"))
    return model_dir


def build_97m(work, dtype="float32"):
    """A 97M-parameter Llama (model_config with hidden 768, 12 layers; random weights stored in `dtype`, the toy
    tokenizer) in work/model, and the first 64 rows of the toy SFT and pair data in work/sft.jsonl and work/pairs.jsonl.
    Returns the model directory and its parameter count."""
    import sys

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from toy.task import DATA_DIR, TINY_MODEL_DIR, build_tiny_model

    if not os.path.exists(TINY_MODEL_DIR):
        build_tiny_model(TINY_MODEL_DIR)
    model_dir = os.path.join(work, "model")
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(vocab_size=32000, hidden_size=768, layers=12))
    model.to(getattr(torch, dtype)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(model_dir)
    for name in ("sft.jsonl", "pairs.jsonl"):
        with open(os.path.join(DATA_DIR, name)) as f, open(os.path.join(work, name), "w") as out:
            out.writelines(f.readlines()[:64])
    return model_dir, sum(p.numel() for p in model.parameters())
