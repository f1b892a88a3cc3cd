#!/usr/bin/env bash
# Everything a CUDA machine should check, in one go (not run in CI):
#   1. the tests marked `gpu` (bf16 autocast, fp16 + GradScaler and bf16 through the engine, fused SDPA, NCCL DDP);
#   2. each benchmarks/perf script on CUDA, fp32 and bf16 rows beside timm / open_clip, with achieved FLOP/s and the
#      fraction of the matmul peak measured in the same run.
# Every step writes its console output (and JSON) to one folder; summary.md gathers the tables for the README.
#
# Usage, from the repository root:  benchmarks/perf/gpu_check.sh [OUT_DIR]
#   OUT_DIR     default runs/gpu_check/<date-time>
#   PYTHON      the interpreter (default .venv/bin/python)
#   DEVICE      default cuda (cuda:N for another GPU)
#   STEP_TIMEOUT  seconds per step (default 1200)
# Exit status: 0 when every step passed, 1 otherwise (the remaining steps still run).
set -uo pipefail

OUT=${1:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "$PY sees no CUDA device: nothing to check here (the gpu tests would only skip)" >&2
    exit 1
fi
mkdir -p "$OUT"
status=0

step() {  # step NAME COMMAND...: run COMMAND, its output in $OUT/NAME.txt
    local name=$1
    shift
    echo "== $name: $*"
    if timeout "${STEP_TIMEOUT:-1200}" "$@" >"$OUT/$name.txt" 2>&1; then
        echo "   ok"
    else
        echo "   FAILED (exit $?): see $OUT/$name.txt"
        status=1
    fi
}

step device bash -c "nvidia-smi; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
torch.cuda.get_device_name(), \"available:\", torch.cuda.is_available())'"
step gpu_tests "$PY" -m pytest -m gpu tests/test_gpu.py -v -rs -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
# batch sizes that give a large GPU some work; the cases themselves (fp32 and bf16) are the scripts' own
step perf_backbone "$PY" -m florence.benchmarks.perf.backbone --device "$DEVICE" --batch 64 --warmup 3 --rounds 10 \
    --json "$OUT/perf_backbone.json"
step perf_train "$PY" -m florence.benchmarks.perf.train --device "$DEVICE" --dtypes fp32 bf16 --steps 10 \
    --batch-tiny 256 --batch-coswin-tiny 64 --json "$OUT/perf_train.json"

{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo '```'
    tail -n 3 "$OUT/gpu_tests.txt"
    echo '```'
    for name in perf_backbone perf_train; do
        echo
        echo "## $name"
        grep -E '^(\||matmul peak|CPU|UniCL|NVIDIA|[A-Z].*torch )' "$OUT/$name.txt" || echo "(no table: see $name.txt)"
    done
} >"$OUT/summary.md"
echo "outputs in $OUT (summary.md has the tables)"
exit $status
