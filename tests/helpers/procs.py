"""Find the processes a test session started and left behind (Linux `/proc`).

The test session tags itself with an environment variable (`SESSION_ENV`); every process it starts
inherits it (subprocess, torchrun, multiprocessing spawn, the vLLM server and its engine workers),
so its leftovers are found by that tag even once they are re-parented away from pytest. Another
session of the same user on the same machine carries another tag and is left alone.
"""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

SESSION_ENV = "MEGATRON_RASFT_TEST_SESSION"
# What counts as a heavy leftover: trainers, torchrun, vLLM servers and their engine processes, and
# spawned gloo ranks (`helpers.distributed.spawn`).
HEAVY = re.compile(r"megatron_rasft|torch\.distributed\.run|torchrun|vllm|VLLM|multiprocessing\.spawn")
# multiprocessing's resource tracker lives as long as the session's own interpreter: not a leftover.
IGNORE = re.compile(r"multiprocessing\.resource_tracker|multiprocessing\.forkserver")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended, or belongs to someone else
        return b""


def tagged_processes(tag: str, env_key: str = SESSION_ENV) -> list[tuple[int, str]]:
    """[(pid, command line)] of live processes other than this one whose environment has
    `env_key=tag` and whose command line matches `HEAVY` (zombies and `IGNORE` left out)."""
    want = f"{env_key}={tag}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        if want not in _read(d / "environ").split(b"\0"):
            continue
        stat = _read(d / "stat").decode(errors="replace")
        if ") Z " in stat or ") X " in stat:
            continue
        cmd = _read(d / "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        if HEAVY.search(cmd) and not IGNORE.search(cmd):
            out.append((int(d.name), cmd))
    return sorted(out)


def processes_matching(text: str) -> list[tuple[int, str]]:
    """[(pid, command line)] of live (non-zombie) processes whose command line contains `text`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        cmd = _read(d / "cmdline").replace(b"\0", b" ").decode(errors="replace")
        stat = _read(d / "stat").decode(errors="replace")
        if text in cmd and ") Z " not in stat and ") X " not in stat:
            out.append((int(d.name), cmd.strip()))
    return sorted(out)


def kill_all(procs: list[tuple[int, str]]) -> None:
    """SIGKILL each listed pid (the leftovers of this session only)."""
    for pid, _ in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
