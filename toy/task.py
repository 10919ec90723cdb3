"""The bundled toy alignment task: a task whose quality a few lines of code can judge.

A prompt asks for words on one or two topics ("tell me about animals and fruits :"); a
response is a list of words. The gold reward is the fraction of response words that are
on a requested topic. It is a rate, so it does not depend on length: length growth shows
up in `eval/mean_length`, quality in `eval/gold_score`, separately.

The data mimics real preference data:
- SFT responses are mediocre (about half the words on topic), so preference training
  has room to improve on the SFT policy.
- Chosen responses are better *and* about 1.4x longer than rejected ones, the length
  confound that makes DPO lengthen its outputs.

`python -m toy.task` regenerates toy/data/ deterministically; `build_tiny_model` writes the
tiny Llama-style model and word-level tokenizer that scripts use when `--model` is omitted.
"""
import json
import os
import random
import shutil

TOPICS = {
    "animals": "cat dog horse cow sheep goat mouse lion tiger bear wolf fox",
    "colors": "red blue green yellow purple orange pink brown black white grey gold",
    "fruits": "apple pear plum grape lemon lime mango peach cherry melon kiwi fig",
    "tools": "hammer saw drill wrench chisel file rake spade axe knife ruler clamp",
    "places": "city town beach forest desert island valley river lake hill farm port",
    "weather": "rain snow wind storm fog hail sun cloud frost thunder mist breeze",
    "music": "drum flute piano violin guitar harp horn bass song choir tune banjo",
    "sports": "tennis golf rugby chess boxing rowing skiing polo cricket judo darts yoga",
}
TOPIC_WORDS = {t: ws.split() for t, ws in TOPICS.items()}
WORD_TOPIC = {w: t for t, ws in TOPIC_WORDS.items() for w in ws}
PROMPT_WORDS = ["tell", "me", "about", "and", ":"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")
TINY_MODEL_DIR = os.path.join(HERE, "tiny-llama")
SFT_MODEL_DIR = "out/sft"  # where `python sft.py` leaves the toy SFT policy the other scripts start from


def topics_of(prompt):
    return [w for w in prompt.split() if w in TOPICS]


def gold_score(prompt, response):
    """Fraction of response words on a requested topic; 0 for an empty response."""
    wanted = set(topics_of(prompt))
    words = response.split()
    if not words:
        return 0.0
    return sum(WORD_TOPIC.get(w) in wanted for w in words) / len(words)


def make_prompt(rng):
    topics = rng.sample(sorted(TOPICS), rng.choice([1, 2]))
    return "tell me about " + " and ".join(topics) + " :"


def make_response(rng, prompt, n_words, on_topic_rate):
    """n_words words, each on a requested topic with probability on_topic_rate."""
    wanted = topics_of(prompt)
    others = [t for t in TOPICS if t not in wanted]
    words = []
    for _ in range(n_words):
        topic = rng.choice(wanted) if rng.random() < on_topic_rate else rng.choice(others)
        words.append(rng.choice(TOPIC_WORDS[topic]))
    return " ".join(words)


def sft_example(rng):
    prompt = make_prompt(rng)
    return {"prompt": prompt, "completion": make_response(rng, prompt, rng.randint(3, 12), rng.uniform(0.2, 0.8))}


def pair_example(rng):
    """Chosen: 6-14 words, mostly on topic. Rejected: 4-10 words, mostly off. Chosen always scores higher."""
    prompt = make_prompt(rng)
    while True:
        chosen = make_response(rng, prompt, rng.randint(6, 14), rng.uniform(0.45, 0.95))
        rejected = make_response(rng, prompt, rng.randint(4, 10), rng.uniform(0.05, 0.55))
        if gold_score(prompt, chosen) > gold_score(prompt, rejected):
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def unpaired_example(rng):
    pair = pair_example(rng)
    label = rng.random() < 0.5
    return {"prompt": pair["prompt"], "completion": pair["chosen" if label else "rejected"], "label": label}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def generate_data(out_dir=DATA_DIR, seed=0):
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "sft.jsonl"), [sft_example(rng) for _ in range(4000)])
    write_jsonl(os.path.join(out_dir, "pairs.jsonl"), [pair_example(rng) for _ in range(2000)])
    write_jsonl(os.path.join(out_dir, "unpaired.jsonl"), [unpaired_example(rng) for _ in range(2000)])
    write_jsonl(os.path.join(out_dir, "prompts.jsonl"), [{"prompt": make_prompt(rng)} for _ in range(1000)])
    write_jsonl(os.path.join(out_dir, "eval_prompts.jsonl"), [{"prompt": make_prompt(rng)} for _ in range(256)])
    write_jsonl(os.path.join(out_dir, "eval_pairs.jsonl"), [pair_example(rng) for _ in range(200)])


def build_tiny_model(out_dir=TINY_MODEL_DIR, seed=0):
    """A ~0.9M-parameter Llama with a word-level tokenizer, saved as a HF directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # save_pretrained's "Writing model shards" bar: noise in test and script output

    words = SPECIALS + PROMPT_WORDS + sorted(TOPICS) + [w for ws in TOPIC_WORDS.values() for w in ws]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart: ':cat' is ':' 'cat'
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_tokens(["<|system|>", "<|user|>", "<|assistant|>"])  # whole, not split at | (not special)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = f"{out_dir}.tmp{os.getpid()}"  # several torchrun ranks may build it at once: the first rename wins
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not os.path.isdir(out_dir):
            raise
        shutil.rmtree(tmp)


def ensure_model(path):
    """The scripts' default models: build the tiny model on first use; out/sft comes from `python sft.py`."""
    from common import UserError

    if path == TINY_MODEL_DIR and not os.path.exists(path):
        build_tiny_model(path)
    if path == SFT_MODEL_DIR and not os.path.exists(path):
        raise UserError(f"{path} does not exist: run `python sft.py` first, or pass --model")


if __name__ == "__main__":
    generate_data()
    print(f"wrote {DATA_DIR}")
