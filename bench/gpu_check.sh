#!/usr/bin/env bash
# The GPU check (issue 17): what only a GPU can show, in at most 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh              # on a GPU: a 0.5B model (Qwen2.5-0.5B's shape, random weights), bf16
#   bash bench/gpu_check.sh --dry-run    # on CPU: the same stages on a tiny model, a step each
#
# Stages, in order, each under `timeout` and all within one deadline (GPU_CHECK_BUDGET seconds, 465 by
# default), each logged to DIR/logs/STAGE.log. A failed stage does not stop the next; the exit status is 1
# if any failed, timed out or found no time left.
#   env        torch, transformers and the device (no CUDA device, no GPU check: it stops here)
#   tests      the device-aware tests, tests/test_logps.py and tests/test_packing.py, with TEST_DEVICE=cuda
#   build      DIR/model (float32), DIR/rm (its reward model) and DIR/data, once: bench/gpu_check.py build
#   sft dpo grpo ppo   a few steps each in bf16: tokens/s, peak memory, MFU (bench/gpu_check.py explains them)
#   precision  bench/precision.py: the share of parameters one DPO step at lr 5e-7 changes, bf16 against fp32
#   logps      packed against padded log-probs and forward + backward time, packed_sdpa and sdpa (float32,
#              bf16), flash-attention 2 if installed
# then the summary table. DIR: GPU_CHECK_DIR, default out/gpu_check (out/gpu_check_dry for --dry-run); the
# model stays there for the next run. GPU_PEAK_TFLOPS: the bf16 peak MFU is taken against (default: by
# device name, else an H200's 989). To keep the logs: cp -r DIR/logs DIR/results DIR/stages.tsv somewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") DRY=0 ;;
  --dry-run) DRY=1 ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

if ((DRY)); then
  DIR=${GPU_CHECK_DIR:-out/gpu_check_dry} DEVICE=cpu TINY=--tiny
  LEN=64 STEPS=1 RL_STEPS=1 NEW=8 SFT_BS=2 DPO_BS=2 GRPO_BS=2 G=2 PPO_BS=2 MINI=1 EPOCHS=1
else
  DIR=${GPU_CHECK_DIR:-out/gpu_check} DEVICE=cuda TINY=
  LEN=512 STEPS=6 RL_STEPS=3 NEW=64 SFT_BS=16 DPO_BS=8 GRPO_BS=4 G=4 PPO_BS=8 MINI=2 EPOCHS=2
fi
rm -rf "$DIR/logs" "$DIR/results" "$DIR/runs"
mkdir -p "$DIR/logs"
: >"$DIR/stages.tsv"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-465}))
FAILED=0

stage() {  # stage NAME CAP COMMAND...: run under timeout (CAP, or what is left of the budget), log, record
  local name=$1 cap=$2 start=$SECONDS status rc
  shift 2
  local limit=$((DEADLINE - SECONDS < cap ? DEADLINE - SECONDS : cap))
  if ((limit < 5)); then
    status=SKIP FAILED=1  # an incomplete check does not pass
    echo "no time left in the budget" >"$DIR/logs/$name.log"
  else
    echo "== $name (at most ${limit} s): ${*//$'\n'/ }"
    if timeout -k 5 "$limit" "$@" >"$DIR/logs/$name.log" 2>&1; then
      status=ok
    else
      rc=$?
      status=$([[ $rc == 124 || $rc == 137 ]] && echo TIMEOUT || echo "FAIL($rc)")
      FAILED=1
      tail -n 15 "$DIR/logs/$name.log" | sed 's/^/    /'
    fi
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - start)) \
    "$(tail -n 1 "$DIR/logs/$name.log" | tr '\t' ' ' | cut -c 1-90)" >>"$DIR/stages.tsv"
  echo "   $name: $status in $((SECONDS - start)) s"
}

stage env 60 python -c "
import sys, torch, transformers
cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if cuda else 'CPU')
sys.exit(None if cuda or '$DEVICE' == 'cpu' else 'no CUDA device: bash bench/gpu_check.sh --dry-run runs on CPU')"
if [[ $(cut -f 2 "$DIR/stages.tsv") != ok ]]; then
  exit 1
fi

stage tests 120 env TEST_DEVICE=$DEVICE python -m pytest -q tests/test_logps.py tests/test_packing.py
stage build 120 python bench/gpu_check.py build "$DIR" $TINY

common=(--model "$DIR/model" --dtype bfloat16 --max_length $LEN --log_every 1 --overwrite_output_dir)
rl=(--data "$DIR/data/prompts.jsonl" --reward_model "$DIR/rm" --max_new_tokens $NEW --max_steps $RL_STEPS --lr 1e-6
    --num_sample_generations 0)
run() {  # run SCRIPT CAP FLAGS...: SCRIPT.py in bench/gpu_check.py's measuring wrapper
  stage "$1" "$2" python bench/gpu_check.py run "$1" "$DIR" -- "${common[@]}" --output_dir "$DIR/runs/$1" "${@:3}"
}
run sft 60 --data "$DIR/data/sft.jsonl" --batch_size $SFT_BS --max_steps $STEPS --lr 1e-5
run dpo 60 --data "$DIR/data/pairs.jsonl" --batch_size $DPO_BS --max_steps $STEPS --lr 5e-7
run grpo 75 "${rl[@]}" --batch_size $GRPO_BS --num_generations $G --beta 0.04
run ppo 90 "${rl[@]}" --batch_size $PPO_BS --num_mini_batches $MINI --ppo_epochs $EPOCHS

stage precision 120 python bench/precision.py --model "$DIR/model" --data "$DIR/data/pairs.jsonl" --lr 5e-7
stage logps 120 python bench/gpu_check.py logps "$DIR" $TINY

echo
timeout 60 python bench/gpu_check.py summary "$DIR"
exit $FAILED
