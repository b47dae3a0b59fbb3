#!/usr/bin/env bash
# The GPU checks in one run (about 5 minutes on one H200; every part has its own time limit):
#   1. the gpt package's tests with that machine's torch (they need torch, tiktoken, numpy, safetensors only);
#   2. benchmarks/gpu_check.py: fused loss, batched generation and dropout on CUDA, then short bf16
#      pretraining runs with fused AdamW, eager and compiled;
#   3. the benchmark table on CUDA (bench_gpt.py, as `make bench BENCH_ARGS="--device cuda"` runs it,
#      without make's virtual-environment set-up): gpt2-small, bf16 autocast, MFU against the bf16 peak;
#   4. one-process torchrun over nccl.
# Usage: benchmarks/gpu_check.sh [LOG_DIR]  (default /tmp/gpu_check; $PYTHON picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG_DIR=${1:-/tmp/gpu_check}
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=()

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to LOG_DIR/NAME.log, remember failures
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; failed+=("$name"); }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG_DIR/device.log"
# --noconftest: tests/conftest.py imports the pipeline (MLflow, DVC), which that machine lacks; the two
# deselected tests need the BPE files of the dataset mirror, which does not travel.
part tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest tests/test_model.py tests/test_attention.py \
  tests/test_loss.py tests/test_dropout.py tests/test_generate.py tests/test_train.py tests/test_checkpoint.py \
  --deselect tests/test_generate.py::test_generate_text_round_trip \
  --deselect tests/test_generate.py::test_generate_texts_names_the_empty_prompt
part checks 180 "$PYTHON" benchmarks/gpu_check.py
part bench 150 "$PYTHON" benchmarks/bench_gpt.py --device cuda --presets mini,gpt2-small \
  --train-shape gpt2-small=16x1024 --skip tokenize,dvc
part torchrun 60 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/gpu_check.py --ddp

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]} (logs in $LOG_DIR)"
  exit 1
fi
echo "gpu_check: all parts passed (logs in $LOG_DIR)"
