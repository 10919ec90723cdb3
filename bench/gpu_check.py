"""The Python side of bench/gpu_check.sh: the model it trains, the runs it measures, packed against padded
log-probs, and the summary table.

    python bench/gpu_check.py build DIR [--tiny]       # DIR/model, DIR/rm, DIR/data (once)
    python bench/gpu_check.py run SCRIPT DIR -- ARGS   # SCRIPT.main(ARGS) in this process, measured
    python bench/gpu_check.py logps DIR [--tiny]       # packed vs padded token_logps and their speed, per attention
    python bench/gpu_check.py summary DIR              # the table of DIR/stages.tsv and DIR/results

The model has Qwen2.5-0.5B's shape (Qwen2ForCausalLM, 494M parameters, tied embeddings, rope theta 1e6,
vocabulary 151936) and random weights, saved in float32: the precision check compares a bf16 step with
an fp32 one from the same weights; the runs load it in bf16. `--tiny`: the same architecture at 0.1M
parameters, for the CPU dry run. The tokenizer is Qwen-style (build_tokenizer); ids it does not have,
which a random model samples, decode to nothing, so grpo is rewarded by the reward model (DIR/rm:
the model's backbone and a random head, rm.py's layout), as ppo is. The data is random toy words,
a token each, with spread lengths (prompts 32-160, responses 64-320 tokens), so batches pack.

Each run reports, from OUTPUT_DIR/metrics.jsonl (--log_every 1): tokens/s, the median over the steps
after the first (the first pays for warm-up), non-padding tokens as the scripts count them (ppo: its
update phase, tokens/s/update, with its rollout's tokens/s in the note); peak memory (CUDA: max
allocated; CPU: max RSS); MFU = model FLOPs per counted token x tokens/s / the GPU's dense bf16 peak
(GPU_PEAK_TFLOPS, else PEAK_TFLOPS by device name, else 989: an H200's). Model FLOPs, approximate:
2 N per token per forward and 4 N per backward, N = the matmul parameters (all but the input embedding,
plus the LM head: a tied one counts as the head), ignoring attention's T^2 term and that the head only
projects completion positions. Per counted token: sft 6 N; dpo 8 N (with the reference's forward);
grpo 6 N (+2 N for the reference when --beta > 0) over the whole step, the reward model's forward and
sampling uncounted, so its MFU is a lower bound; ppo's update 6 N_policy + 6 N_value (the value model:
the backbone and a scalar head).
"""
import glob
import importlib
import json
import os
import random
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from toy.task import PROMPT_WORDS, TOPIC_WORDS, TOPICS  # noqa: E402

PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "L4": 121}  # dense bf16
WORDS = PROMPT_WORDS + sorted(TOPICS) + [w for ws in TOPIC_WORDS.values() for w in ws]


# ---------------------------------------------------------------- the model and the data

def qwen_config(tiny=False):
    """Qwen2.5-0.5B's shape, or a tiny one of the same architecture (its vocabulary still above the tokenizer's)."""
    from transformers import Qwen2Config

    shape = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936)
    if tiny:
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=640)
    return Qwen2Config(**shape, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=None)


def build_tokenizer():
    """Qwen-style: byte-level BPE, no BOS, <|im_end|> EOS, trained on the toy task's words so that each word
    after a space is one token (572 tokens). Byte-level because AutoTokenizer loads any qwen2 directory's
    tokenizer as Qwen2Tokenizer, which rebuilds it as byte-level BPE: a word-level one would encode nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([" ".join(WORDS)] * 2 + [" " + w for w in WORDS], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_model(out_dir, tiny=False, seed=0):
    """A Qwen2ForCausalLM with random weights (float32) and build_tokenizer's tokenizer as a HF directory.
    Initialised on the GPU when there is one: seconds instead of a minute of CPU time."""
    from transformers import Qwen2ForCausalLM
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # save_pretrained's shard bar
    tokenizer = build_tokenizer()
    config = qwen_config(tiny)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def build_reward_model(model_dir, out_dir):
    """rm.py's layout (backbone + value_head.safetensors) from the model's backbone, as tests/test_grpo.py makes one."""
    from transformers import AutoModel

    import models
    import reward_models

    backbone = models.load_model(model_dir, torch.device("cpu"), "float32", auto_class=AutoModel)
    reward_models.save_reward_model(reward_models.RewardModel(backbone), models.load_tokenizer(model_dir), out_dir)


def build_data(out_dir, tiny=False, n=64, seed=0):
    """sft.jsonl, pairs.jsonl and prompts.jsonl of random toy words (a token each), lengths drawn uniformly."""
    rng = random.Random(seed)
    (p_lo, p_hi), (c_lo, c_hi) = ((4, 16), (4, 24)) if tiny else ((32, 160), (64, 320))

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    prompts = [text(p_lo, p_hi) for _ in range(n)]
    files = {"sft.jsonl": [{"prompt": p, "completion": text(c_lo, c_hi)} for p in prompts],
             "pairs.jsonl": [{"prompt": p, "chosen": text(c_lo, c_hi), "rejected": text(c_lo, c_hi)} for p in prompts],
             "prompts.jsonl": [{"prompt": p} for p in prompts]}
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def build(directory, tiny=False):
    """DIR/model, DIR/rm and DIR/data, unless DIR/built says they are there."""
    if os.path.exists(os.path.join(directory, "built")):
        print(f"{directory}: built already")
        return
    t = time.perf_counter()
    model = build_model(os.path.join(directory, "model"), tiny)
    print(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"float32 ({time.perf_counter() - t:.0f} s)")
    del model
    build_reward_model(os.path.join(directory, "model"), os.path.join(directory, "rm"))
    build_data(os.path.join(directory, "data"), tiny)
    open(os.path.join(directory, "built"), "w").close()
    print(f"built {directory} in {time.perf_counter() - t:.0f} s")


# ---------------------------------------------------------------- measured runs

def matmul_params(model_dir):
    """(N of the causal LM, N of a value model on its backbone): see the docstring's FLOPs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = config.vocab_size * config.hidden_size
    body = sum(p.numel() for p in model.base_model.parameters()) - embedding
    return body + embedding, body + config.hidden_size


def peak_gib():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_tflops():
    """The GPU's dense bf16 peak (GPU_PEAK_TFLOPS, else by name, else an H200's); None on CPU unless set."""
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 989)


def steady_rate(rows, key):
    rates = [r[key] for r in rows if key in r]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def run(name, directory, argv):
    """SCRIPT.main(argv) in this process; writes DIR/results/SCRIPT.json."""
    script = importlib.import_module(name)
    args = script.parse_args(argv)
    t = time.perf_counter()
    script.main(argv)
    seconds = time.perf_counter() - t
    with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    lm, value = matmul_params(args.model)
    flops = {"sft": 6 * lm, "dpo": (8 - 2 * getattr(args, "precompute_ref", False)) * lm,
             "grpo": (6 + 2 * (getattr(args, "beta", 0) > 0)) * lm, "ppo": 6 * (lm + value)}[name]
    rate = steady_rate(rows, "tokens/s/update" if name == "ppo" else "tokens/s")
    peak = peak_tflops()
    losses = [r[k] for r in rows for k in ("loss", "loss/policy_avg") if k in r]
    note = f"{len(rows)} step{'s' * (len(rows) > 1)}"
    if losses:
        note += f", loss {losses[0]:.4g} -> {losses[-1]:.4g}"
    if "grad_norm" in rows[-1]:  # grpo's loss is 0 at ratio 1 with equal lengths; its gradient is not
        note += f", grad_norm {rows[-1]['grad_norm']:.3g}"
    if name == "ppo":
        note += f", rollout {steady_rate(rows, 'tokens/s/rollout'):.0f} tokens/s"
    result = dict(tokens_per_s=rate, peak_gib=peak_gib(), mfu=peak and flops * rate / (peak * 1e12),
                  seconds=seconds, note=note)
    write_result(directory, name, result)
    print(json.dumps(result))


def write_result(directory, name, result):
    os.makedirs(os.path.join(directory, "results"), exist_ok=True)
    with open(os.path.join(directory, "results", name + ".json"), "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------- packed vs padded

def packed_vs_padded(model_dir, attn_implementation, dtype, device, tiny):
    """|packed - padded| of token_logps over the scored tokens of one batch of spread lengths, no grad;
    with the start-up check's verdict (logprobs.packing_check), the largest |logp| for scale, and the time of
    a forward + backward of a GRPO-sized batch (32 sequences of spread lengths) each way (step_seconds)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.logging import disable_progress_bar

    import batching
    import logprobs
    import models

    disable_progress_bar()  # from_pretrained's loading bar
    models.register_packed_sdpa()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [(5, 7), (1, 2), (12, 1), (3, 20)] if tiny else [(200, 300), (13, 40), (90, 1), (1, 250), (160, 160)]
    ids = [torch.randint(model.config.vocab_size, (p + c,), generator=g).tolist() for p, c in lengths]
    batch = batching.collate([s[:p] for s, (p, _) in zip(ids, lengths)], [s[p:] for s, (p, _) in zip(ids, lengths)],
                             0, device)
    scored = batch["labels"] != -100
    out = {}
    with torch.no_grad():
        for packed in (False, True):
            model.padding_free = packed  # read by logprobs.packs, as --padding_free sets it
            out[packed] = logprobs.token_logps(model, batch)[scored].float()
        model.padding_free = None
        check = logprobs.packing_check(model)
    gap = (out[True] - out[False]).abs()
    many = [(random.Random(i).randint(32, 160), random.Random(-i).randint(16, 400)) for i in range(8 if tiny else 32)]
    ids = [torch.randint(model.config.vocab_size, (p + c,), generator=g).tolist() for p, c in many]
    timed = batching.collate([s[:p] for s, (p, _) in zip(ids, many)], [s[p:] for s, (p, _) in zip(ids, many)],
                             0, device)
    seconds = {layout: step_seconds(model, timed, layout == "packed") for layout in ("padded", "packed")}
    return dict(max_abs_diff=float(gap.max()), mean_abs_diff=float(gap.mean()),
                max_abs_logp=float(out[False].abs().max()), packs=check, tokens=int(scored.sum()),
                padded_s=seconds["padded"], packed_s=seconds["packed"], timed_sequences=len(many))


def step_seconds(model, batch, packed, reps=5):
    """Median seconds of one token_logps forward + backward of `batch`, packed or padded, after one warm-up."""
    import logprobs

    model.padding_free, times = packed, []
    for _ in range(reps + 1):
        synchronize()
        start = time.perf_counter()
        logprobs.token_logps(model, batch).sum().backward()
        synchronize()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    model.padding_free = None
    return statistics.median(times[1:])


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def logps(directory, tiny):
    """packed_vs_padded under packed_sdpa (the scripts' default for this model) and sdpa (float32 and bf16), and
    flash_attention_2 (bf16) if flash_attn is installed."""
    import importlib.util

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [(name, dtype) for name in ("packed_sdpa", "sdpa") for dtype in (torch.float32, torch.bfloat16)]
    if importlib.util.find_spec("flash_attn") is not None:
        cases.append(("flash_attention_2", torch.bfloat16))
    else:
        print("flash_attn is not installed: flash_attention_2 is not compared")
    results = {}
    for impl, dtype in cases:
        key = f"{impl} {str(dtype).removeprefix('torch.')}"
        results[key] = packed_vs_padded(os.path.join(directory, "model"), impl, dtype, device, tiny)
        print(key, json.dumps(results[key]))
    write_result(directory, "logps", results)


# ---------------------------------------------------------------- summary

def summary(directory):
    """One row per stage (DIR/stages.tsv, from gpu_check.sh) with its measurements, then packed vs padded
    and the end of the precision check's output."""
    results = {}
    for path in glob.glob(os.path.join(directory, "results", "*.json")):
        with open(path) as f:
            results[os.path.basename(path)[:-len(".json")]] = json.load(f)
    lines = [f"{'stage':<10} {'status':<8} {'s':>4} {'tokens/s':>9} {'peak GiB':>8} {'MFU':>6}  note"]
    with open(os.path.join(directory, "stages.tsv")) as f:
        for stage, status, seconds, note in (line.rstrip("\n").split("\t") for line in f):
            r = results.get(stage, {}) if stage != "logps" else {"note": "below"} if "logps" in results else {}
            rate = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
            peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            lines.append(f"{stage:<10} {status:<8} {seconds:>4} {rate:>9} {peak:>8} {mfu:>6}  {r.get('note', note)}")
    for key, r in results.get("logps", {}).items():
        lines.append(f"packed vs padded log-probs, {key}: max |diff| {r['max_abs_diff']:.3g}, "
                     f"mean {r['mean_abs_diff']:.2g} ({r['tokens']} tokens, max |logp| {r['max_abs_logp']:.3g}); "
                     f"the start-up check packs: {'yes' if r['packs'] else 'no'}; forward + backward of "
                     f"{r['timed_sequences']} sequences: padded {r['padded_s']:.3f} s, packed {r['packed_s']:.3f} s "
                     f"({r['packed_s'] / r['padded_s']:.2f}x)")
    precision = os.path.join(directory, "logs", "precision.log")
    if os.path.exists(precision):  # bench/precision.py's own report, as it printed it
        with open(precision) as f:
            lines += ["precision (bench/precision.py):"] + ["    " + line.rstrip() for line in f.readlines()[-8:]]
    print("\n".join(lines))


def main():
    command, *rest = sys.argv[1:] or [""]
    if command == "run" and rest[2:3] == ["--"]:
        run(rest[0], rest[1], rest[3:])
    elif command in ("build", "logps") and rest and rest[1:] in ([], ["--tiny"]):
        (build if command == "build" else logps)(rest[0], tiny=rest[1:] == ["--tiny"])
    elif command == "summary" and len(rest) == 1:
        summary(rest[0])
    else:
        sys.exit("usage:\n" + __doc__.split("\n\n")[1])


if __name__ == "__main__":
    main()
