#!/usr/bin/env bash
# RASFT on one GPU node: convert the HF checkpoint (once), place the rollout server, train with torchrun.
#
#   HF_DIR=hf/Qwen2.5-Math-1.5B DATA=data/train.jsonl \
#       bash examples/run_single_node.sh examples/qwen2.5-math-1.5b.toml [--set section.key=value ...]
#
# Environment (default in brackets):
#   HF_DIR         Hugging Face checkpoint: converted for training, tokenizer, first weights served [required]
#   DATA           problems JSONL, one {"prompt", "response"[, "answer"]} per line [required]
#   MCORE_DIR      converted Megatron checkpoint, made if missing [ckpt/<basename HF_DIR>-mcore]
#   RUN_DIR        run directory (metrics.jsonl, checkpoints, rollouts, logs) [runs/<config name>]
#   ROLLOUT_GPUS   GPUs of an external vLLM server (examples/rollout_server.sh) [4,5,6,7]. Empty: no external
#                  server; the trainer starts one itself on rank 0's GPU (shared with training;
#                  set a small rollout.server.kv_cache_gib; fine for CPU runs, not tested on GPUs).
#   TRAIN_GPUS     GPUs of the trainer [all GPUs not in ROLLOUT_GPUS]. Their number / (TP × PP) is the
#                  data-parallel size, which must divide global_batch_size / micro_batch_size
#                  (256 / 2 = 128: 1, 2, 4 or 8 data-parallel ranks).
#   ROLLOUT_PORT   port of the external server [8000]
#   ROLLOUT_KV_GIB KV-cache GiB per vLLM engine of the external server [40]
#   ROLLOUT_TP     tensor-parallel size of one vLLM engine; ROLLOUT_GPUS / ROLLOUT_TP engines serve
#                  as data-parallel replicas behind one endpoint [1] (examples/rollout_server.sh)
#   REPLICAS       N > 1: a fleet started by the trainer instead of the external server: N vLLM
#                  replicas, one per GPU of ROLLOUT_GPUS (give exactly N), behind vllm-router, each
#                  refreshed, verified and (if it dies) restarted by the trainer's rank 0
#                  (rollout.server.replicas; docs/rollout.md, "A fleet") [1]
#   DRY_RUN=1      print the commands instead of running them
#
# A fleet on one node of 8 GPUs, 4 training (data-parallel 4) and 4 replicas:
#   REPLICAS=4 ROLLOUT_GPUS=4,5,6,7 HF_DIR=... DATA=... bash examples/run_single_node.sh examples/qwen2.5-math-1.5b.toml
# The trainer then sees CUDA_VISIBLE_DEVICES=TRAIN_GPUS,ROLLOUT_GPUS: its ranks train on the first
# ones and rank 0 starts replica i on the GPU after them (rollout/fleet.py, replica_devices).
# On CPU (no script needed): --set rollout.server.replicas=2 splits the cores between 2 replicas.
#
# Why the split: the loop is synchronous (training waits while a round rolls out), and a round
# generates up to K × batches_per_round × global_batch_size rollouts, so rollout GPUs matter. Compare
# time_rollout with time_train in RUN_DIR/metrics.jsonl and move GPUs accordingly.
set -euo pipefail

CONFIG=${1:?usage: HF_DIR=... DATA=... $0 CONFIG.toml [--set section.key=value ...]}
shift
: "${HF_DIR:?set HF_DIR to the Hugging Face checkpoint folder}"
: "${DATA:?set DATA to the problems JSONL}"
PYTHON=${PYTHON:-python}
MCORE_DIR=${MCORE_DIR:-ckpt/$(basename "$HF_DIR")-mcore}
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .toml)}
ROLLOUT_GPUS=${ROLLOUT_GPUS-4,5,6,7}
ROLLOUT_PORT=${ROLLOUT_PORT:-8000}
ROLLOUT_KV_GIB=${ROLLOUT_KV_GIB:-40}
REPLICAS=${REPLICAS:-1}

run() {  # echo, and run unless DRY_RUN=1
    echo "+ $*" >&2
    [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}

# -- GPUs --------------------------------------------------------------------------------------------
if [[ -z "${TRAIN_GPUS:-}" ]]; then
    all=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' | paste -sd, -) || true
    [[ -n "$all" ]] || all=0,1,2,3,4,5,6,7
    TRAIN_GPUS=$(echo "$all" | tr , '\n' | grep -vxF -f <(echo "${ROLLOUT_GPUS}" | tr , '\n' | grep .) \
                 | paste -sd, - || true)
    [[ -n "$ROLLOUT_GPUS" ]] || TRAIN_GPUS=$all
fi
NPROC=$(echo "$TRAIN_GPUS" | tr , '\n' | grep -c .)
(( NPROC > 0 )) || { echo "error: no GPU left for training (TRAIN_GPUS is empty)" >&2; exit 2; }

# -- Environment for Megatron-Core on NVIDIA GPUs ----------------------------------------------------
export CUDA_DEVICE_MAX_CONNECTIONS=1        # Megatron orders TP/SP communication before compute
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1    # a failed collective ends the job instead of hanging it
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}  # per rank; torchrun's default is 1 (slow data/verifier work)
export TOKENIZERS_PARALLELISM=false

# -- 1. Convert once ---------------------------------------------------------------------------------
if [[ ! -f "$MCORE_DIR/model_config.json" ]]; then
    read -r TP PP < <("$PYTHON" -c "from megatron_rasft.config import load_config as L; \
p = L('$CONFIG').parallel; print(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)")
    run "$PYTHON" tools/convert_checkpoint.py hf-to-mcore --hf-dir "$HF_DIR" --out "$MCORE_DIR" \
        --tp "$TP" --pp "$PP" --dtype bf16
fi

# -- 2. Rollout server on its own GPUs ----------------------------------------------------------------
SERVER_ARGS=()
TRAINER_GPUS=$TRAIN_GPUS
if (( REPLICAS > 1 )); then
    # A fleet the trainer starts: no server here; the replicas' GPUs follow the training ones.
    n=$(echo "$ROLLOUT_GPUS" | tr , '\n' | grep -c . || true)
    (( n == REPLICAS )) || { echo "error: REPLICAS=$REPLICAS needs one GPU each in ROLLOUT_GPUS (got '$ROLLOUT_GPUS')" >&2; exit 2; }
    (( ${ROLLOUT_TP:-1} == 1 )) || { echo "error: the trainer's replicas have one GPU each: ROLLOUT_TP must be 1 with REPLICAS" >&2; exit 2; }
    TRAINER_GPUS=$TRAIN_GPUS,$ROLLOUT_GPUS
    SERVER_ARGS=(--set "rollout.server.replicas=$REPLICAS" --set "rollout.server.kv_cache_gib=$ROLLOUT_KV_GIB")
elif [[ -n "$ROLLOUT_GPUS" ]]; then
    log="$RUN_DIR/logs/rollout_server.log"
    echo "+ CUDA_VISIBLE_DEVICES=$ROLLOUT_GPUS ROLLOUT_TP=${ROLLOUT_TP:-1} KV_GIB=$ROLLOUT_KV_GIB" \
         "bash examples/rollout_server.sh $HF_DIR $ROLLOUT_PORT > $log" >&2
    if [[ "${DRY_RUN:-0}" != 1 ]]; then
        mkdir -p "$RUN_DIR/logs"
        CUDA_VISIBLE_DEVICES=$ROLLOUT_GPUS KV_GIB=$ROLLOUT_KV_GIB LOG_FILE="$RUN_DIR/logs/vllm_external.log" \
            PYTHON=$PYTHON setsid bash "$(dirname "$0")/rollout_server.sh" "$HF_DIR" "$ROLLOUT_PORT" >>"$log" 2>&1 &
        server_pid=$!
        trap 'kill -TERM -- -"$server_pid" 2>/dev/null || true' EXIT  # its whole process group
        for _ in $(seq 1 600); do
            curl -sf "http://127.0.0.1:$ROLLOUT_PORT/health" >/dev/null 2>&1 && break
            kill -0 "$server_pid" 2>/dev/null || { echo "error: rollout server exited; $log:" >&2; tail -40 "$log" >&2; exit 1; }
            sleep 2
        done
        curl -sf "http://127.0.0.1:$ROLLOUT_PORT/health" >/dev/null \
            || { echo "error: rollout server not ready after 20 min; see $log" >&2; exit 1; }
    fi
    # The trainer exports each new policy to RUN_DIR/hf/policy and the server reloads it from there
    # (same filesystem), verified with a probe prompt.
    SERVER_ARGS=(--set "rollout.server.url=http://127.0.0.1:$ROLLOUT_PORT")
fi

# -- 3. Train ----------------------------------------------------------------------------------------
export CUDA_VISIBLE_DEVICES=$TRAINER_GPUS
echo "+ CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >&2
run torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" -m megatron_rasft train \
    --config "$CONFIG" \
    --set "checkpoint.load=$MCORE_DIR" \
    --set "train.data.path=$DATA" \
    --set "train.data.tokenizer=$HF_DIR" \
    --set "train.run_dir=$RUN_DIR" \
    "${SERVER_ARGS[@]}" "$@"
