"""Chat model directories laid out like two real releases, built offline (tokenizers trainer, a transformers
config, a small random Llama), for the tests that score chat data against the whole conversation:

- Gemma-it style: byte-level BPE, `<bos>` written by the template, EOS `<eos>`, but a turn ends with
  `<end_of_turn>` and a newline; the generation config stops on both. The published Gemma template.
- Phi-3 style: a SentencePiece-style tokenizer that puts `▁` before each input it is given (Llama-2's and
  Phi-3's normalizer: prepend ▁, spaces to ▁), EOS `<|endoftext|>`, turns ending `<|end|>` and a newline, and a template that ends
  every render without a generation prompt with an EOS. The published Phi-3-mini template.
"""
import os

from chat_model import corpus

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
FAMILIES = {  # specials (pad first), bos, eos, the end-of-turn token, template, the assistant's opener and closer
    "gemma": (["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>",
              GEMMA, "<start_of_turn>model\n", "<end_of_turn>"),
    "phi3": (["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>",
             "<|endoftext|>", "<|end|>", PHI3, "<|assistant|>\n", "<|end|>"),
}


def build_family_model(family, out_dir, vocab_size=400, seed=0):
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials, bos, eos, end_of_turn, template, _, _ = FAMILIES[family]
    backend = Tokenizer(models.BPE())
    if family == "gemma":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # Llama-2's and Phi-3's normalizer: ▁ before every input, spaces as ▁; pieces split before each ▁
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        alphabet = ["▁", "\n"]
    backend.train_from_iterator(corpus() + ["model\n"], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=specials[0],
                                        extra_special_tokens=[t for t in specials if t not in (bos, eos, specials[0])])
    tokenizer.chat_template = template
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=ids(bos), eos_token_id=ids(eos), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=ids(bos), eos_token_id=[ids(eos), ids(end_of_turn)],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return os.fspath(out_dir)
