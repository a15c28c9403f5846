"""One stage of the study as a subprocess: its output to a log (progress lines echoed), its wall time
and CPU-seconds measured, and a way to stop it cleanly when the time budget runs out.

CPU-seconds are per process group, read from /proc through psutil every `interval_s`: the vLLM
server's processes (api server, engine core, worker: what generates the rollouts) and all others (the
trainer with its data and verification helpers). A process's last reading before it exits is what
counts, so up to `interval_s` of a short-lived helper's time can be missed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

ECHO_PREFIXES = ("step", "[round", "[resume", "done", "error", "[data", "Traceback")


def _is_vllm(p) -> bool:
    """The process or one of its ancestors is the vLLM server (its engine core and worker start as
    plain `multiprocessing` children and take their VLLM:: names only later, so they are classified
    by their ancestry, afresh at every sample)."""
    for q in [p] + p.parents():
        if "vllm" in " ".join(q.cmdline()) or "VLLM" in q.name() or "EngineCore" in q.name():
            return True
    return False


def _terminate_tree(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the command and every process under it (by pid), SIGKILL what is left after `grace_s`."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_stage(args: list, log: Path, *, tag: str, stop_when: Optional[Callable[[], bool]] = None,
              interval_s: float = 1.0, out=print) -> dict:
    """Run `python ARGS...` from the repository root to completion (or until `stop_when()` is true:
    the tree is then terminated and "stopped" is True).

    Returns {"exit", "stopped", "wall_s", "cpu_s_main", "cpu_s_vllm", "load1_mean"}: seconds of wall
    time; CPU-seconds (user + system) of the trainer side and of the vLLM server; the machine's mean
    1-minute load average while it ran (how contended the timings were)."""
    import psutil

    root = Path(__file__).resolve().parents[3]
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    cpu = {}  # pid -> (group, last cpu seconds)
    loads, stopped = [], False
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable] + [str(a) for a in args], cwd=root, env=env, text=True, bufsize=1,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def pump():
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if line.startswith(ECHO_PREFIXES):
                    out(f"   [{tag}] {line.rstrip()}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        top = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [top] + top.children(recursive=True)
            except psutil.NoSuchProcess:
                procs = []
            for p in procs:
                try:
                    t = p.cpu_times()
                    cpu[p.pid] = ("vllm" if _is_vllm(p) else "main", t.user + t.system)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            loads.append(os.getloadavg()[0])
            if stop_when is not None and not stopped and stop_when():
                stopped = True
                _terminate_tree(proc)
            time.sleep(interval_s)
        reader.join(timeout=30)
    return {"exit": proc.returncode, "stopped": stopped, "wall_s": round(time.time() - t0, 1),
            "cpu_s_main": round(sum(c for g, c in cpu.values() if g == "main"), 1),
            "cpu_s_vllm": round(sum(c for g, c in cpu.values() if g == "vllm"), 1),
            "load1_mean": round(sum(loads) / max(len(loads), 1), 2)}


def log_tail(log: Path, lines: int = 30) -> str:
    """The last `lines` lines of `log` (for an error message)."""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
