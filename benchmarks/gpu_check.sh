#!/usr/bin/env bash
# First-run check of one CUDA GPU, one shot (default 480 s): loss kernels vs float64, KL kernel memory,
# a ~1.24B training step through `python -m megatron_rasft train` (tokens/s, MFU, peak memory,
# rasft/sft), CUDA checkpoint/resume exactness, conversion/export round trips. See
# benchmarks/gpu_check.py for each section, and docs/launch.md ("The one-GPU check") for the device call.
#
#   bash benchmarks/gpu_check.sh --plan                   # sections, shapes, time/memory estimates with
#                                                         # their inputs, and the wheels to carry; runs nothing
#   bash benchmarks/gpu_check.sh --fetch-wheels          # here (with a package index): bring megatron-core
#                                                         # and psutil as cp312 wheels into benchmarks/wheels/
#   bash benchmarks/gpu_check.sh [--out DIR] [--time-limit S]   # on the GPU host (no index needed)
#   bash benchmarks/gpu_check.sh --cpu-dry-run [--out DIR]   # tiny shapes, gloo, on CPU (tests/test_gpu_check.py);
#                                                         # --smoke is the same
#
# Results: OUT/gpu_check.json, OUT/gpu_check.log (this console) and OUT/gpu_check_logs.tar.gz (every
# run's log), three files, whatever happens (the tar is made after the check ends or is killed).
# OUT is --out, else the environment's $OUT (kept as it is: the device tool collects it), else
# benchmarks/results/gpu_check_<date>.
# --time-limit S (default 480, GPU_CHECK_TIME_LIMIT): the whole script ends within S seconds; the
# check starts no section that its plan says would end after S − 45 s, and `timeout` kills it at S − 15 s.
#
# On a host without megatron-core the brought wheels are installed with
#   pip install --no-index --no-deps --target $GPU_CHECK_SITE benchmarks/wheels/*.whl
# and put on PYTHONPATH; nothing else is installed. Transformer Engine / FP8 and vLLM are not
# installed there: the script says so and does not run them.
set -uo pipefail
cd "$(dirname "$0")/.."
STARTED=$(date +%s.%N)
DRY=0
PLAN=0
OUT_DIR=""
FETCH=0
SECTIONS=""
LIMIT=${GPU_CHECK_TIME_LIMIT:-480}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-dry-run|--smoke) DRY=1 ;;  # --smoke: the name every benchmark answers to
        --out) OUT_DIR="$2"; shift ;;
        --fetch-wheels) FETCH=1 ;;
        --plan) PLAN=1 ;;
        --sections) SECTIONS="$2"; shift ;;  # e.g. train,convert (a rerun of what failed)
        --time-limit) LIMIT="$2"; shift ;;
        *) echo "usage: gpu_check.sh [--plan] [--cpu-dry-run|--smoke] [--out DIR] [--time-limit S] [--sections LIST] | --fetch-wheels" >&2; exit 2 ;;
    esac
    shift
done
source benchmarks/_gpu_env.sh  # PYTHON, gpu_env_install, gpu_env_wheels_line

if [[ $FETCH == 1 ]]; then
    mkdir -p benchmarks/wheels
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$GPU_ENV_PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d benchmarks/wheels "$GPU_ENV_MCORE" psutil
fi

if [[ $PLAN == 1 ]]; then
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -W ignore benchmarks/gpu_check.py --plan \
        --time-limit "$LIMIT" ${OUT_DIR:+--out "$OUT_DIR"} ${SECTIONS:+--sections "$SECTIONS"}
    rc=$?
    gpu_env_wheels_line
    exit $rc
fi

OUT=${OUT_DIR:-${OUT:-benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)$([[ $DRY == 1 ]] && echo _cpu_dry_run)}}
mkdir -p "$OUT"
# The per-run logs live outside OUT (the device tool returns at most 8 files) and are tarred into it.
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_logs.XXXXXX")
finish() {
    tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$LOGS" . 2>/dev/null && rm -rf "$LOGS"
}
trap finish EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), out $OUT, time limit ${LIMIT}s, python $($PYTHON -c 'import sys; print(sys.version.split()[0])')"
gpu_env_wheels_line

if [[ $DRY == 0 ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "error: no NVIDIA GPU here (nvidia-smi missing or failing); use --cpu-dry-run on CPU" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
else
    export CUDA_VISIBLE_DEVICES=""
    # The CPU shim's device-check mode: a tensor that would stay on the host on a GPU fails here too.
    export MEGATRON_RASFT_DEVICE_CHECK=${MEGATRON_RASFT_DEVICE_CHECK:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# megatron-core (and psutil, without which dist_checkpointing.save hangs) from the brought wheels.
gpu_env_install || exit 2
$PYTHON -c "import importlib.util as u
for m, why in (('transformer_engine', 'Transformer Engine spec and FP8'), ('vllm', 'vLLM rollout server (stays CPU-tested)')):
    print(f'{\"available\" if u.find_spec(m) else \"NOT AVAILABLE, not run\"}: {why}')"

args=(--out "$OUT" --logs "$LOGS" --time-limit "$LIMIT" --started-at "$STARTED" ${SECTIONS:+--sections "$SECTIONS"})
[[ $DRY == 1 ]] && args+=(--cpu-dry-run)
# Hard cap 15 s before the limit (the tar and the tee still have to finish): a hung NCCL
# initialisation must not hold the machine; the JSON is written after each section.
CAP=$(awk -v l="$LIMIT" -v s="$STARTED" -v n="$(date +%s.%N)" 'BEGIN { c = l - 15 - (n - s); print (c < 10 ? 10 : int(c)) }')
timeout --signal=TERM --kill-after=5 "$CAP" "$PYTHON" -W ignore benchmarks/gpu_check.py "${args[@]}"
rc=$?
[[ $rc == 124 ]] && echo "error: gpu_check.py ran past ${CAP}s; $OUT/gpu_check.json holds the sections that finished"
exit $rc
