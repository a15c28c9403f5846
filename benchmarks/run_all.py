"""Run every CPU benchmark in turn (`make bench`). Each prints its own ratios against a baseline
measured in the same run; run them on a quiet machine and copy the numbers into README.md.
GPU: `bash benchmarks/gpu_mfu.sh` on a CUDA machine."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ["bench_loss_kernels.py", "--tokens", "256", "--repeats", "5"],
    ["bench_step.py", "--repeats", "5"],
    ["bench_train_vs_hf.py"],
    ["bench_verify.py"],
    ["bench_rollout.py"],
    ["bench_eval.py"],
    ["bench_convert.py"],  # needs ~6 GB of free disk and a few minutes
    ["bench_overlap.py"],  # sync vs overlapped rounds; pins the server and the trainer to one core each
]

if __name__ == "__main__":
    only = set(sys.argv[1:])
    failed = []
    for script, *args in RUNS:
        if only and script not in only and script.removesuffix(".py") not in only:
            continue
        print(f"\n===== {script} {' '.join(args)}", flush=True)
        if subprocess.call([sys.executable, str(HERE / script), *args]) != 0:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
