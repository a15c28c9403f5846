#!/usr/bin/env bash
# Tokens/s/GPU and MFU of a ~1B Llama-shaped training step on one GPU (at most ~5 minutes).
#
#   bash benchmarks/gpu_mfu.sh [gpu_mfu.py options, e.g. --impl local --micro-batch 4 --fp8 hybrid]
#   bash benchmarks/gpu_mfu.sh --device cpu --tiny     # check the code path on a CPU machine
#   bash benchmarks/gpu_mfu.sh --smoke                 # tiny shapes, one step, on the GPU if there is one
#
# Default shapes: Llama-3.2-1B (16 layers, hidden 2048, 32 heads / 8 KV heads, ffn 8192, vocab 128256),
# seq 2048, bf16, Transformer Engine spec when importable, else the local spec with model.attention =
# "sdpa" (--attention local: Megatron's unfused attention); see benchmarks/gpu_mfu.py for the FLOP count.
# Python: $PYTHON, else .venv/bin/python, else python3; megatron-core (and psutil) are installed from
# benchmarks/wheels/ when missing (benchmarks/_gpu_env.sh; bring them with gpu_check.sh --fetch-wheels).
# GPU_MFU_TIME_LIMIT (default 290) caps the run in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/_gpu_env.sh  # PYTHON, gpu_env_install
gpu_env_install

if [[ " $* " != *" --device cpu "* && " $* " != *" --smoke "* ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "error: no NVIDIA GPU here (nvidia-smi missing or failing). Run on a GPU node, or" \
             "'bash benchmarks/gpu_mfu.sh --device cpu --tiny' to check the code path." >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n1
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# Hard cap: a hung NCCL/TE initialisation must not hold the machine.
exec timeout --signal=TERM --kill-after=10 "${GPU_MFU_TIME_LIMIT:-290}" "$PYTHON" -W ignore benchmarks/gpu_mfu.py "$@"
