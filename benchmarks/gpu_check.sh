#!/usr/bin/env bash
# First-run check of one CUDA GPU (≤ 6 minutes): loss kernels vs float64, KL kernel memory, a ~1.24B
# training step through `python -m megatron_rasft train` (tokens/s, MFU, peak memory, rasft/sft),
# CUDA checkpoint/resume exactness, conversion/export round trips. Writes OUT/gpu_check.json and
# OUT/gpu_check.log (plus OUT/logs/ of every run). See benchmarks/gpu_check.py for each section.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels          # here (with a package index): bring megatron-core
#                                                         # and psutil as cp312 wheels into benchmarks/wheels/
#   bash benchmarks/gpu_check.sh [--out DIR]              # on the GPU host (no index needed)
#   bash benchmarks/gpu_check.sh --cpu-dry-run [--out DIR]   # tiny shapes, gloo, on CPU (tests/test_gpu_check.py);
#                                                         # --smoke is the same
#
# On a host without megatron-core the brought wheels are installed with
#   pip install --no-index --no-deps --target $GPU_CHECK_SITE benchmarks/wheels/*.whl
# and put on PYTHONPATH; nothing else is installed. Transformer Engine / FP8 and vLLM are not
# installed there: the script says so and does not run them.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT=""
FETCH=0
LIMIT=${GPU_CHECK_TIME_LIMIT:-360}
MCORE=${GPU_CHECK_MCORE:-megatron-core==0.16.1}
PYVER=${GPU_CHECK_PYVER:-3.12}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-dry-run|--smoke) DRY=1 ;;  # --smoke: the name every benchmark answers to
        --out) OUT="$2"; shift ;;
        --fetch-wheels) FETCH=1 ;;
        --time-limit) LIMIT="$2"; shift ;;
        *) echo "usage: gpu_check.sh [--cpu-dry-run|--smoke] [--out DIR] [--time-limit S] | --fetch-wheels" >&2; exit 2 ;;
    esac
    shift
done
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python && "$PYTHON" == python3 ]] && PYTHON=.venv/bin/python

if [[ $FETCH == 1 ]]; then
    mkdir -p benchmarks/wheels
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" \
        --platform manylinux_2_28_x86_64 -d benchmarks/wheels "$MCORE" psutil
fi

OUT=${OUT:-benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)$([[ $DRY == 1 ]] && echo _cpu_dry_run)}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), out $OUT, python $($PYTHON -c 'import sys; print(sys.version.split()[0])')"

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
missing=$($PYTHON -c "import importlib.util as u; print(' '.join(m for m in ('megatron.core', 'psutil') if u.find_spec(m.split('.')[0]) is None))")
if [[ -n "$missing" ]]; then
    shopt -s nullglob
    wheels=(benchmarks/wheels/*.whl)
    if [[ ${#wheels[@]} == 0 ]]; then
        echo "error: $missing not importable and no wheels in benchmarks/wheels/ (run --fetch-wheels where an index is reachable)" >&2
        exit 2
    fi
    SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    echo "installing ${wheels[*]} into $SITE (no index, no deps)"
    $PYTHON -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}" || exit 2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PYTHON -c "import importlib.util as u
for m, why in (('transformer_engine', 'Transformer Engine spec and FP8'), ('vllm', 'vLLM rollout server (stays CPU-tested)')):
    print(f'{\"available\" if u.find_spec(m) else \"NOT AVAILABLE, not run\"}: {why}')"

args=(--out "$OUT")
[[ $DRY == 1 ]] && args+=(--cpu-dry-run)
# Hard cap: a hung NCCL initialisation must not hold the machine; the JSON is written after each section.
timeout --signal=TERM --kill-after=10 "$LIMIT" "$PYTHON" -W ignore benchmarks/gpu_check.py "${args[@]}"
rc=$?
[[ $rc == 124 ]] && echo "error: gpu_check.py ran past ${LIMIT}s; $OUT/gpu_check.json holds the sections that finished"
exit $rc
