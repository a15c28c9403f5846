"""Peak memory of a command's process tree, split into the vLLM server's processes (api server,
engine core, worker) and all others (for a training stage: the trainer and its helpers), sampled
while the command runs.

Two figures per group:
- peak PSS: the largest sum, at one sampling instant, of the group's proportional set sizes
  (/proc/PID/smaps_rollup `Pss`: a page shared by n processes counts 1/n in each, so sums do not
  double-count what forked helpers share with their parent, as summed RSS does);
- peak RSS of the largest process: the largest `VmHWM` (the kernel's own high-water mark of the
  process's resident set, exact, not sampled) over the group's processes.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

GIB = 2**30


def _proc_kib(pid: int, path: str, key: str) -> int:
    """The `key:` line of /proc/PID/PATH in kB, 0 when the process or line is gone."""
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _is_vllm(p) -> bool:
    name, cmd = p.name(), " ".join(p.cmdline())
    return "vllm" in cmd or "VLLM" in name or "EngineCore" in name


def tree_memory(proc) -> dict:
    """PSS summed per group and the largest VmHWM per group of `proc`'s tree, bytes:
    {"main_pss", "vllm_pss", "main_hwm", "vllm_hwm"}. `proc` is a `psutil.Process`; processes that
    exit while being read are left out; a tree that has exited gives zeros."""
    import psutil

    out = {"main_pss": 0, "vllm_pss": 0, "main_hwm": 0, "vllm_hwm": 0}
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            group = "vllm" if _is_vllm(p) else "main"
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out[f"{group}_pss"] += _proc_kib(p.pid, "smaps_rollup", "Pss") * 1024
        out[f"{group}_hwm"] = max(out[f"{group}_hwm"], _proc_kib(p.pid, "status", "VmHWM") * 1024)
    return out


def run_sampled(cmd: list, *, interval_s: float = 0.5, on_line=None, **popen_kwargs) -> tuple[int, dict]:
    """Run `cmd` (subprocess.Popen arguments) to completion, sampling its tree's memory.

    `on_line`: if given, the command's stdout and stderr are read line by line (text) and each line
    is passed to it (from a reader thread), instead of going where `popen_kwargs` say.

    Returns (exit code, {"peak_pss_main_gib", "peak_pss_vllm_gib", "peak_hwm_main_gib",
    "peak_hwm_vllm_gib", "load1_mean", "load1_max", "wall_s"}); "hwm" is the largest single process's VmHWM of the group
    (see the module docstring), "main" every process except the vLLM server's.
    """
    import psutil

    t0 = time.time()
    reader = None
    if on_line is not None:
        popen_kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    proc = subprocess.Popen(cmd, **popen_kwargs)
    if on_line is not None:
        reader = threading.Thread(target=lambda: [on_line(line) for line in proc.stdout], daemon=True)
        reader.start()
    ps = psutil.Process(proc.pid)
    peak = {"main_pss": 0, "vllm_pss": 0, "main_hwm": 0, "vllm_hwm": 0}
    loads = []  # the machine's 1-minute load average: how contended the timings were
    while proc.poll() is None:
        for key, value in tree_memory(ps).items():
            peak[key] = max(peak[key], value)
        loads.append(os.getloadavg()[0])
        time.sleep(interval_s)
    if reader is not None:
        reader.join(timeout=30)  # the pipe closes when the command's last process exits
    return proc.returncode, {"peak_pss_main_gib": round(peak["main_pss"] / GIB, 3),
                             "peak_pss_vllm_gib": round(peak["vllm_pss"] / GIB, 3),
                             "peak_hwm_main_gib": round(peak["main_hwm"] / GIB, 3),
                             "peak_hwm_vllm_gib": round(peak["vllm_hwm"] / GIB, 3),
                             "load1_mean": round(sum(loads) / max(len(loads), 1), 1),
                             "load1_max": round(max(loads, default=0.0), 1), "wall_s": round(time.time() - t0, 1)}
