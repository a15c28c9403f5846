"""Run the `train` command as a user would (a subprocess, optionally under torchrun) and read back
its per-step losses: shared by the training-loop tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import tomli_w

from megatron_rasft.demo.run import merge_tables
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


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`'s process group (it was started with `start_new_session=True`) and every
    descendant: torchrun starts each rank in a session of its own, and a rank's checkpoint writer
    or vLLM server may sit in yet another group. The tree is listed first (a killed parent's
    children are re-parented and could no longer be found)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)


def run_train(config, run_dir, *sets: str, nproc: int = 1, timeout_s: float = 900) -> tuple:
    """(exit code, console output) of a finished training run. Raises `TimeoutError` (with the
    console's tail) after `timeout_s` seconds, once the run's whole process group is killed."""
    proc = start_train(config, run_dir, *sets, nproc=nproc)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        # A survivor holding the console pipe would block a plain communicate(): bounded.
        out, _ = proc.communicate(timeout=30)
        raise TimeoutError(f"train run {run_dir} did not finish within {timeout_s:.0f}s; its process "
                           f"group was killed. Console tail:\n{(out or '')[-3000:]}") from None
    except BaseException:  # KeyboardInterrupt, a failing caller: never leave the run behind
        kill_group(proc)
        proc.communicate(timeout=30)
        raise
    return proc.returncode, out


def run_trains(jobs: dict, workers: int = 2, timeout_s: float = 900) -> dict:
    """Several independent `run_train`s, at most `workers` at a time: {name: (config, run_dir,
    sets)} -> {name: Future of (exit code, console output)}, every one finished (`.result()`
    re-raises a run's `TimeoutError`). Each run has OMP_NUM_THREADS=1 (`start_train`), so on a
    2-core machine two at a time take about half the time of one after the other. Only for runs
    that share nothing: no rollout rounds (a round refreshes the server's weights to its own
    export, which would change what a concurrent run samples)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run_train, config, run_dir, *sets, timeout_s=timeout_s)
                   for name, (config, run_dir, sets) in jobs.items()}
    return futures


def step_records(run_dir) -> dict:
    """step -> the `train` record of RUN/metrics.jsonl, keeping the last record of each step (a
    resumed run rewrites the steps it redid)."""
    out = {}
    for line in RunDir(run_dir).metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec
    return out


def step_losses(run_dir) -> dict:
    """step -> loss from RUN/metrics.jsonl (the last record of each step, as `step_records`)."""
    return {step: rec["loss"] for step, rec in step_records(run_dir).items()}


def loop_config(path, *, server_url: str | None, problems, tokenizer, load, overrides: dict | None = None) -> Path:
    """Write the run config the loop tests share to `path` and return it: `rasft` with a real round
    before every step (`rollout.batches_per_round` 1) on a checkpoint converted from the served tiny model,
    K = 2 rollouts of 40 tokens, plain prompts, 2 steps of 4 problems. `server_url` None: the trainer
    starts its own server. `overrides` is a nested dict merged into it table by table
    (`{"rollout": {"sampling": {"n": 4}}}`)."""
    values = {
        "model": {"seq_length": 64},
        "loss": {"method": "rasft"},
        "rollout": {"server": {"url": server_url} if server_url else {}, "batches_per_round": 1,
                    "sampling": {"n": 2, "max_tokens": 40, "temperature": 1.0}},
        "train": {"data": {"path": str(problems), "tokenizer": str(tokenizer), "prompt_template": "plain"},
                  "optim": {"lr": 1e-3},
                  "schedule": {"train_iters": 2, "global_batch_size": 4, "micro_batch_size": 2}},
        "checkpoint": {"load": str(load)},
    }
    merge_tables(values, overrides or {})
    Path(path).write_text(tomli_w.dumps(values))
    return Path(path)


def vllm_children(pid: int) -> list:
    """[(pid, port)] of the vLLM servers that process `pid` started (a trainer's server, or a
    fleet's replicas), found by their parent pid and command line in /proc."""
    import re

    from megatron_rasft.rollout.server import SERVER_MODULE

    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
        if ppid == pid and SERVER_MODULE in argv:
            out.append((int(entry), int(argv[argv.index("--port") + 1])))
    return sorted(out)
