"""Containment of one sandboxed interpreter (the package docstring lists it): the resource limits
(`SandboxConfig`), the private root / no-network mount namespace and the uid switch applied in the
child before exec (`make_preexec`), and killing every process of a sandbox uid afterwards."""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Optional


@dataclass
class SandboxConfig:
    timeout_s: float = 10.0  # wall clock for the whole check
    cpu_s: int = 10  # RLIMIT_CPU (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE
    max_procs: int = 32  # RLIMIT_NPROC (effective with the uid switch)
    max_output_bytes: int = 1 << 20  # the candidate's stdout+stderr, and separately its replies (x8)
    python: Optional[str] = None  # interpreter; None = probed (must be runnable by the sandbox uid)
    scratch_dir: Optional[str] = None  # where the per-run directories go (None: the system temp dir)
    require_isolation: bool = False  # refuse to run (RuntimeError) without namespaces + uid switch

    def __post_init__(self):
        if self.timeout_s <= 0 or self.cpu_s <= 0 or self.memory_mb <= 0 or self.max_procs <= 0:
            raise ValueError("sandbox timeout_s, cpu_s, memory_mb and max_procs must be > 0")


_CLONE_NEWNS, _CLONE_NEWNET = 0x00020000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _unshare, _mount = _libc.unshare, _libc.mount
except (OSError, AttributeError):
    _unshare = _mount = None

_DEVICES = ("null", "zero", "random", "urandom")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(ctypes.get_errno(), what)


def _bind(src: str, dst: str, readonly: bool) -> None:
    _check(_mount(src.encode(), dst.encode(), None, _MS_BIND | _MS_REC, None), f"bind {src}")
    if readonly:
        _check(_mount(None, dst.encode(), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID, None),
               f"read-only {src}")


def _namespace_setup(root: str, work: str, ro_paths: tuple) -> None:
    """In the child, before exec: private mounts, no network, and a new root holding only
    `ro_paths` (read-only), `work` at /work, a private /tmp and a few devices; then chroot."""
    _check(_unshare(_CLONE_NEWNS | _CLONE_NEWNET), "unshare")
    _check(_mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
    _check(_mount(b"tmpfs", root.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=16m,mode=755"), "tmpfs root")
    for path in ro_paths:
        dst = root + path
        os.makedirs(dst, exist_ok=True)
        _bind(path, dst, readonly=True)
    for name in ("bin", "lib", "lib64", "sbin"):  # merged-/usr symlinks
        if os.path.islink("/" + name):
            os.symlink(os.readlink("/" + name), f"{root}/{name}")
    os.makedirs(root + "/work")
    _bind(work, root + "/work", readonly=False)
    os.makedirs(root + "/tmp")
    _check(_mount(b"tmpfs", (root + "/tmp").encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=64m,mode=1777"),
           "tmpfs /tmp")
    os.makedirs(root + "/dev")
    for dev in _DEVICES:
        if os.path.exists("/dev/" + dev):
            open(f"{root}/dev/{dev}", "w").close()
            _bind("/dev/" + dev, f"{root}/dev/{dev}", readonly=False)
    _check(_mount(None, root.encode(), None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None),
           "read-only root")
    os.chroot(root)
    os.chdir("/work")


def _ro_paths(python: str) -> tuple:
    """/usr, plus the interpreter's installation prefix when it lives elsewhere."""
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    return ("/usr",) if prefix == "/usr" or prefix.startswith("/usr/") else ("/usr", prefix)


def make_preexec(cfg: SandboxConfig, uid: Optional[int], info: dict, root: str, work: str):
    limits = [(resource.RLIMIT_CPU, (cfg.cpu_s, cfg.cpu_s + 1)),
              (resource.RLIMIT_AS, (cfg.memory_mb << 20,) * 2),
              (resource.RLIMIT_FSIZE, (cfg.file_size_mb << 20,) * 2),
              (resource.RLIMIT_CORE, (0, 0))]
    if uid is not None:  # per-user: only meaningful for a uid of our own
        limits.append((resource.RLIMIT_NPROC, (cfg.max_procs,) * 2))
    ro = _ro_paths(info["python"])

    def preexec():
        if info["namespaces"]:
            _namespace_setup(root, work, ro)
        for which, value in limits:
            resource.setrlimit(which, value)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    return preexec


def live_pids_of_uid(uid: int) -> list:
    """Processes (not zombies) whose real uid is `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(status.get("Uid", "-1 ").split()[0]) == uid and not status.get("State", "").strip().startswith(("Z", "X")):
            pids.append(int(entry))
    return pids


def kill_all(proc: subprocess.Popen, uid: Optional[int]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if uid is not None:  # processes that left the group (setsid) still carry our uid
        for _ in range(50):
            pids = live_pids_of_uid(uid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
    proc.wait()
