"""Run every benchmark in turn (`make bench`). Each prints its own ratios against a baseline
measured in the same run; run them on a quiet machine and copy the numbers into docs/performance.md (with the command, date and commit).

    python benchmarks/run_all.py [--smoke] [SCRIPT ...]

`--smoke` runs each in its smoke mode (tiny shapes, one repeat: a check that it still runs).
`gpu_mfu.sh` and `gpu_check.sh` measure a GPU; without one they run their smoke mode (the same code path, tiny, on CPU).
tests/test_benchmarks.py checks that this list names every script in benchmarks/.
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ["bench_loss_kernels.py", "--tokens", "256", "--repeats", "5"],
    ["bench_step.py", "--repeats", "5"],
    ["bench_moe.py", "--repeats", "3"],  # the trainer's MoE step (aux, routing hooks) at EP=2 vs EP=1, dispatch fwd+bwd
    ["bench_recompute.py", "--repeats", "3"],  # recompute full / selective vs none: step time and peak memory
    ["bench_attention.py"],  # one layer's core attention at seq 4096: Megatron's local vs sdpa (~7 GB peak on CPU)
    ["bench_train_vs_hf.py"],
    ["bench_verify.py"],
    ["bench_rollout.py"],
    ["bench_eval.py"],
    ["bench_convert.py"],  # needs ~6 GB of free disk and a few minutes
    ["gpu_mfu.sh"],  # runs gpu_mfu.py
    ["gpu_check.sh"],  # runs gpu_check.py; the one-GPU first-run check (docs/launch.md)
    ["bench_real_model.py"],  # SmolLM2-135M: prepares the model and data once (~1 GB), then ~15 min
    # First-round solvability of the real model; without --model/--problems it prepares its own (as --smoke).
    ["real_solvability.py", "--smoke"],
    ["bench_overlap.py"],  # sync vs overlapped rounds; pins the server and the trainer to one core each
    ["bench_fleet.py"],  # vllm-router: overhead, each policy's spread over 2 replicas, 2 replicas vs 1
    ["bench_refresh.py", "--model", "smollm2"],  # weight refresh, disk vs transfer, per component
]
# Scripts run through another entry of RUNS.
COVERED_BY = {"gpu_mfu.py": "gpu_mfu.sh", "gpu_check.py": "gpu_check.sh"}


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def command(script: str, args: list, smoke: bool) -> list:
    if smoke or (script in ("gpu_mfu.sh", "gpu_check.sh") and not has_gpu()):
        args = ["--smoke"]
    if script.endswith(".sh"):
        return ["bash", str(HERE / script), *args]
    return [sys.executable, str(HERE / script), *args]


if __name__ == "__main__":
    argv = sys.argv[1:]
    smoke = "--smoke" in argv
    only = {a for a in argv if a != "--smoke"}
    failed = []
    for script, *args in RUNS:
        if only and script not in only and script.rsplit(".", 1)[0] not in only:
            continue
        cmd = command(script, args, smoke)
        print(f"\n===== {' '.join(Path(c).name if i == 1 else c for i, c in enumerate(cmd[1:], 1))}", flush=True)
        if subprocess.call(cmd) != 0:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
