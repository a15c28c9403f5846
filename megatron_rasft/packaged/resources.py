"""Peak resident memory of a command's process tree, split into the trainer's processes and the
vLLM server's (api server, engine core, worker), sampled while the command runs.

The peaks are of the summed RSS of each group at one sampling instant (psutil, every `interval_s`),
so shared pages are counted once per process that maps them: an upper bound on the group's memory.
"""
from __future__ import annotations

import subprocess
import time

GIB = 2**30


def tree_rss(proc) -> tuple[int, int]:
    """(summed RSS of the non-vLLM processes, summed RSS of the vLLM processes) in `proc`'s tree, bytes.

    `proc` is a `psutil.Process`; verifier sandboxes (short-lived, cmdline naming `verify`) count in
    neither group. A tree that has exited gives (0, 0).
    """
    import psutil

    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    trainer = server = 0
    for p in procs:
        try:
            rss = p.memory_info().rss
            cmd = " ".join(p.cmdline())
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "vllm" in cmd or "VLLM" in name or "EngineCore" in name:
            server += rss
        elif "verify" not in cmd:
            trainer += rss
    return trainer, server


def run_sampled(cmd: list, *, interval_s: float = 0.5, **popen_kwargs) -> tuple[int, dict]:
    """Run `cmd` (subprocess.Popen arguments) to completion, sampling its tree's RSS.

    Returns (exit code, {"peak_rss_main_gib", "peak_rss_vllm_gib", "wall_s"}): "main" is every
    process of the tree except the vLLM server's (for a training stage: the trainer).
    """
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    ps = psutil.Process(proc.pid)
    peak_main = peak_vllm = 0
    while proc.poll() is None:
        main, vllm = tree_rss(ps)
        peak_main, peak_vllm = max(peak_main, main), max(peak_vllm, vllm)
        time.sleep(interval_s)
    return proc.returncode, {"peak_rss_main_gib": round(peak_main / GIB, 3),
                             "peak_rss_vllm_gib": round(peak_vllm / GIB, 3), "wall_s": round(time.time() - t0, 1)}
