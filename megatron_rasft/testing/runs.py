"""Run the `train` command as a user would (a subprocess, optionally under torchrun) and read back
its per-step losses: shared by the training-loop tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_rasft.parallel.net import free_port
from megatron_rasft.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


def start_train(config, run_dir, *sets: str, nproc: int = 1, stdout=subprocess.PIPE) -> subprocess.Popen:
    """`python -m megatron_rasft train --config CONFIG --set train.run_dir=RUN_DIR --set ...` in its
    own session (so a test can kill the whole group); stdout and stderr merged into `stdout` (a
    pipe the caller must drain, or an open file for a run that is only watched and killed)."""
    args = ["-m", "megatron_rasft", "train", "--config", str(config), "--set", f"train.run_dir={run_dir}"]
    for s in sets:
        args += ["--set", s]
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port", str(free_port())]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(prefix + args, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run_train(config, run_dir, *sets: str, nproc: int = 1, timeout_s: float = 900) -> tuple:
    """(exit code, console output) of a finished training run."""
    proc = start_train(config, run_dir, *sets, nproc=nproc)
    out, _ = proc.communicate(timeout=timeout_s)
    return proc.returncode, out


def step_losses(run_dir) -> dict:
    """step -> loss from RUN/metrics.jsonl, keeping the last record of each step (a resumed run
    rewrites the steps it redid)."""
    out = {}
    for line in RunDir(run_dir).metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out
