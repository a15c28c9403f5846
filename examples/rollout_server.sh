#!/usr/bin/env bash
# Serve HF_DIR with vLLM on this machine's visible GPUs, for a trainer that attaches to it with
# `--set rollout.server.url=http://HOST:PORT`. Runs in the foreground until SIGTERM / Ctrl-C.
#
#   CUDA_VISIBLE_DEVICES=6,7 bash examples/rollout_server.sh hf/Qwen2.5-Math-1.5B 8000
#
# Environment (default in brackets):
#   HOST           bind address [127.0.0.1]; 0.0.0.0 when the trainer is on another node. The weight
#                  refresh endpoints are on: expose them to a trusted network only.
#   ROLLOUT_TP     tensor-parallel size of one vLLM engine [1]; the visible GPUs / ROLLOUT_TP engines
#                  serve as data-parallel replicas behind the one endpoint
#   KV_GIB         KV-cache GiB per engine, an integer [40]
#   MAX_MODEL_LEN  context (prompt + new tokens) [4096]
#   LOG_FILE       vLLM log of the one-GPU server [a temporary file, printed at start]
#   PYTHON         [python]
# One GPU: `python -m megatron_rasft serve` (the project's server wrapper). Several: vLLM's own
# entry point with the environment and arguments that wrapper uses (it has no TP/DP flags).
# The trainer writes each new policy to RUN_DIR/hf/policy and asks the server to reload it from
# that path: RUN_DIR must be on a filesystem this machine sees at the same absolute path.
set -euo pipefail

HF_DIR=${1:?usage: $0 HF_DIR [PORT]}
PORT=${2:-8000}
HOST=${HOST:-127.0.0.1}
ROLLOUT_TP=${ROLLOUT_TP:-1}
KV_GIB=${KV_GIB:-40}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
PYTHON=${PYTHON:-python}

if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    NGPUS=$(echo "$CUDA_VISIBLE_DEVICES" | tr , '\n' | grep -c .)
else
    NGPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -c . || true)
fi
if (( NGPUS < 1 )); then
    echo "error: no GPU visible (CUDA_VISIBLE_DEVICES / nvidia-smi); on a CPU machine let the trainer" \
         "start its own server (leave rollout.server.url unset)" >&2
    exit 2
fi
if (( NGPUS % ROLLOUT_TP )); then
    echo "error: $NGPUS visible GPUs are not a multiple of ROLLOUT_TP=$ROLLOUT_TP" >&2
    exit 2
fi
DP=$(( NGPUS / ROLLOUT_TP ))

if (( NGPUS == 1 )); then
    exec "$PYTHON" -m megatron_rasft serve --model "$HF_DIR" --set "rollout.server.host=\"$HOST\"" \
        --set "rollout.server.port=$PORT" --set "rollout.server.kv_cache_gib=$KV_GIB" \
        --set "rollout.server.max_model_len=$MAX_MODEL_LEN" ${LOG_FILE:+--log-file "$LOG_FILE"}
fi
# VLLM_SERVER_DEV_MODE: /pause, /collective_rpc (reload_weights), /reset_prefix_cache, /resume.
# With data-parallel replicas vLLM sends the reload to every engine; the trainer's probe after the
# refresh reads one of them.
export VLLM_SERVER_DEV_MODE=1 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m vllm.entrypoints.launchers.api_server.entry --model "$HF_DIR" \
    --host "$HOST" --port "$PORT" --dtype auto --generation-config vllm \
    --max-model-len "$MAX_MODEL_LEN" --kv-cache-memory-bytes $(( KV_GIB << 30 )) \
    --tensor-parallel-size "$ROLLOUT_TP" --data-parallel-size "$DP"
