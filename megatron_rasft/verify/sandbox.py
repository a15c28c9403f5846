"""Code verifier: run a completion against a problem's tests in a contained subprocess.

Containment, strongest first (what this machine allows is probed once, see `isolation()`):
- a fresh temporary working directory per run, removed afterwards;
- run as root: a private mount + network namespace (no network; fresh private tmpfs on /tmp,
  /var/tmp, /dev/shm with the work dir bind-mounted at /tmp/work), then a random unprivileged uid,
  so RLIMIT_NPROC really bounds fork bombs, root-owned files are read-only, and every process of
  that uid can be found and killed afterwards (even ones that left the process group);
- resource limits (CPU, address space, file size, processes, no core files) set in preexec_fn;
- a wall-clock deadline that kills the whole process group; stdout+stderr read up to a byte cap;
- `python -I -B` with a minimal environment; without a network namespace, the harness replaces
  `socket.socket` (best effort only).
The harness prints a random nonce (sent on stdin) only after every test passed, so exiting early
(`sys.exit(0)`, `os._exit(0)`) is a failure. Code that introspects the harness's own frames could
still find the nonce: this is a guard against accidental or lazy reward hacks, not a security
boundary against a determined adversary.

Verdict reasons: passed | failed_test | timeout | crash | syntax_error | memory | output_limit.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

REASONS = ("passed", "failed_test", "timeout", "crash", "syntax_error", "memory", "output_limit")
_MARK = "__RASFT_PASS__"
_EXIT = {3: "failed_test", 4: "syntax_error", 5: "memory", 6: "crash"}

HARNESS = r'''
import json, os, sys, traceback
def _main():
    nonce = sys.stdin.readline().strip()
    with open("spec.json") as f:
        spec = json.load(f)
    with open("solution.py") as f:
        src = f.read()
    if spec.get("block_socket"):
        import socket
        def _no_network(*a, **k):
            raise OSError("network access is disabled in the sandbox")
        socket.socket = socket.create_connection = socket.socketpair = _no_network
    try:
        code = compile(src, "solution.py", "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc()
        os._exit(4)
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(code, ns)
        if spec.get("setup"):
            exec(spec["setup"], ns)
    except MemoryError:
        os._exit(5)
    except Exception:
        traceback.print_exc()
        os._exit(6)
    try:
        if spec["format"] == "humaneval":
            exec(spec["test"], ns)
            ns["check"](ns[spec["entry_point"]])
        else:
            for a in spec["asserts"]:
                exec(a, ns)
    except MemoryError:
        os._exit(5)
    except Exception:
        traceback.print_exc()
        os._exit(3)
    os.write(1, ("\n%s " + nonce + "\n").encode())
    os._exit(0)
_main()
''' % _MARK


@dataclass
class SandboxConfig:
    timeout_s: float = 10.0  # wall clock for the whole run
    cpu_s: int = 10  # RLIMIT_CPU (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE
    max_procs: int = 32  # RLIMIT_NPROC (effective with the uid switch)
    max_output_bytes: int = 1 << 20  # stdout + stderr
    python: Optional[str] = None  # interpreter; None = probed (must be runnable by the sandbox uid)

    def __post_init__(self):
        if self.timeout_s <= 0 or self.cpu_s <= 0 or self.memory_mb <= 0 or self.max_procs <= 0:
            raise ValueError("sandbox timeout_s, cpu_s, memory_mb and max_procs must be > 0")


def extract_code(text: str) -> str:
    """The last ```python (or ```py / bare ```) fenced block, else the text itself."""
    blocks = re.findall(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", text, re.DOTALL)
    return blocks[-1] if blocks else text


def build_program(tests: dict, prompt: str, completion: str) -> tuple:
    """-> (program source, harness spec). HumanEval: prompt + completion (the prompt's imports and
    stub kept even when the completion restates the whole function); MBPP: the completion."""
    if not isinstance(tests, dict) or tests.get("format") not in ("humaneval", "mbpp"):
        raise ValueError("problem.tests must be a dict with format 'humaneval' or 'mbpp'")
    code = extract_code(completion)
    if tests["format"] == "humaneval":
        for key in ("test", "entry_point"):
            if key not in tests:
                raise ValueError(f"humaneval tests need {key!r}")
        sep = "\n" if re.search(rf"^\s*def\s+{re.escape(tests['entry_point'])}\s*\(", code, re.M) else ""
        return prompt + sep + code, {"format": "humaneval", "test": tests["test"],
                                     "entry_point": tests["entry_point"]}
    if not isinstance(tests.get("asserts"), list):
        raise ValueError("mbpp tests need 'asserts': a list of assert statements")
    return code, {"format": "mbpp", "asserts": tests["asserts"], "setup": tests.get("setup", "")}


# ---- isolation ------------------------------------------------------------------------------
_CLONE_NEWNS, _CLONE_NEWNET = 0x00020000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _unshare, _mount = _libc.unshare, _libc.mount
except (OSError, AttributeError):
    _unshare = _mount = None


def _namespace_setup() -> None:
    """In the child, before exec: private mounts + no network; fresh tmpfs on the shared scratch
    dirs; the work dir (the current directory) re-mounted at /tmp/work and entered."""
    if _unshare(_CLONE_NEWNS | _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare failed")
    if _mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "making / private failed")
    for d in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(d) and _mount(b"tmpfs", d, b"tmpfs", _MS_NOSUID | _MS_NODEV,
                                       b"size=64m,mode=1777") != 0:
            raise OSError(ctypes.get_errno(), f"tmpfs on {d!r} failed")
    os.mkdir(b"/tmp/work")
    if _mount(b".", b"/tmp/work", None, _MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "bind-mounting the work dir failed")
    os.chdir(b"/tmp/work")


def _make_preexec(cfg: SandboxConfig, uid: Optional[int], namespaces: bool):
    limits = [(resource.RLIMIT_CPU, (cfg.cpu_s, cfg.cpu_s + 1)),
              (resource.RLIMIT_AS, (cfg.memory_mb << 20,) * 2),
              (resource.RLIMIT_FSIZE, (cfg.file_size_mb << 20,) * 2),
              (resource.RLIMIT_CORE, (0, 0))]
    if uid is not None:  # per-user: only meaningful for a uid of our own
        limits.append((resource.RLIMIT_NPROC, (cfg.max_procs,) * 2))

    def preexec():
        if namespaces:
            _namespace_setup()
        for which, value in limits:
            resource.setrlimit(which, value)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    return preexec


_ISOLATION: Optional[dict] = None


def isolation() -> dict:
    """What containment this machine allows (probed once per process): {"uid_switch",
    "namespaces" (no network + private tmp), "python"}."""
    global _ISOLATION
    if _ISOLATION is not None:
        return _ISOLATION
    root = os.geteuid() == 0
    pythons = [os.path.realpath(sys.executable)] + [p for p in ("/usr/bin/python3", shutil.which("python3"))
                                                     if p and os.path.exists(p)]
    options = [(True, True), (True, False)] if root else [(False, False)]
    cfg = SandboxConfig(timeout_s=20)
    for use_uid, use_ns in options:
        for python in dict.fromkeys(pythons):
            info = {"uid_switch": use_uid, "namespaces": use_ns, "python": python}
            probe = _run(cfg, "print('ok')", {"format": "mbpp", "asserts": []}, info)
            if probe["reason"] == "passed":
                _ISOLATION = info
                return info
    _ISOLATION = {"uid_switch": False, "namespaces": False, "python": pythons[0]}
    return _ISOLATION


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


def _kill_all(proc: subprocess.Popen, uid: Optional[int]) -> None:
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


def _run(cfg: SandboxConfig, program: str, spec: dict, info: dict) -> dict:
    base = tempfile.mkdtemp(prefix="rasft-sbx-")  # 0700, owned by us
    work = os.path.join(base, "work")
    os.mkdir(work)
    uid = random.SystemRandom().randint(100_000, 2**31 - 2) if info["uid_switch"] else None
    if uid is not None:
        os.chown(work, uid, uid)
    os.chmod(work, 0o700)
    spec = dict(spec, block_socket=not info["namespaces"])
    for name, text in (("harness.py", HARNESS), ("solution.py", program), ("spec.json", json.dumps(spec))):
        with open(os.path.join(work, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(work, name), 0o644)
    nonce = secrets.token_hex(16)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "HOME": "/tmp/work" if info["namespaces"] else work}
    try:
        proc = subprocess.Popen([info["python"], "-I", "-B", "harness.py"], cwd=work, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True,
                                preexec_fn=_make_preexec(cfg, uid, info["namespaces"]))
    except (OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(base, ignore_errors=True)
        return {"correct": False, "reason": "crash", "detail": f"could not start the sandbox: {e}"}
    try:
        proc.stdin.write((nonce + "\n").encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out, err, over, timed_out = _collect(proc, cfg)
    _kill_all(proc, uid)
    shutil.rmtree(base, ignore_errors=True)
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    detail = stderr[-2000:]
    if over:
        reason = "output_limit"
    elif timed_out or proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        reason = "timeout"
    elif proc.returncode == 0 and f"{_MARK} {nonce}\n" in stdout:
        reason = "passed"
    elif proc.returncode in _EXIT:
        reason = _EXIT[proc.returncode]
    elif "MemoryError" in stderr:
        reason = "memory"
    else:
        reason = "crash"
        if proc.returncode == 0:
            detail = "exited before the tests completed (no pass marker)\n" + detail
    return {"correct": reason == "passed", "reason": reason, "returncode": proc.returncode,
            "detail": detail, "uid": uid}


def _collect(proc: subprocess.Popen, cfg: SandboxConfig) -> tuple:
    """Read stdout/stderr until EOF, the deadline, or the byte cap (whichever first)."""
    deadline = time.monotonic() + cfg.timeout_s
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    total, over, timed_out, exited = 0, False, False, False
    while sel.get_map() and not over:
        now = time.monotonic()
        if now >= deadline:
            timed_out = not exited
            break
        for key, _ in sel.select(min(deadline - now, 0.05)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
                continue
            total += len(chunk)
            if total > cfg.max_output_bytes:
                over = True
                break
            bufs[key.fd] += chunk
        if not exited and proc.poll() is not None:
            # Leftover children may hold the pipes open: drain briefly, then they get killed.
            exited, deadline = True, min(deadline, time.monotonic() + 0.5)
    sel.close()
    proc.stdout.close()
    proc.stderr.close()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), over, timed_out


def run_tests(tests: dict, prompt: str, completion: str, cfg: Optional[SandboxConfig] = None) -> dict:
    """Run one completion against `tests` -> {"correct", "reason", "returncode", "detail"}."""
    cfg = cfg or SandboxConfig()
    try:
        program, spec = build_program(tests, prompt, completion)
    except ValueError as e:
        return {"correct": False, "reason": "crash", "detail": f"bad problem tests: {e}"}
    info = dict(isolation())
    if cfg.python:
        info["python"] = cfg.python
    return _run(cfg, program, spec, info)


def run_many(jobs: list, cfg: Optional[SandboxConfig] = None, workers: int = 2, on_result=None) -> list:
    """jobs: [(tests, prompt, completion), ...] -> verdict dicts in order, `workers` at a time."""
    isolation()  # probe once before the threads start

    def one(i_job):
        i, job = i_job
        v = run_tests(*job, cfg=cfg)
        if on_result is not None:
            on_result(i)
        return v
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(one, enumerate(jobs)))
