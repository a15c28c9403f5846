"""Code verifier: the candidate runs contained; the verdict is computed where it cannot reach.

A check (`run_tests`) follows the problem's `Plan` (plan.py):
- pairs path: one sandboxed interpreter runs the program (code prefix + completion) under
  `harness_candidate.py` and answers call requests with plain data (plain.py); the trusted parent
  compares each output with the expected value (`plain.same`, strict types; the benchmark's
  `atol` for floats). Expected values never enter the sandbox.
- driver path (tests that are not literal (call, expected) pairs): a second sandboxed interpreter,
  which the candidate's code never touches, runs the problem's test code (`harness_checker.py`)
  and calls the candidate's functions through pipes; what comes back is decoded as plain data.
  The tests live only in that interpreter's own directory.

Containment of every sandboxed interpreter (what this machine allows is probed once,
`isolation()`; `SandboxConfig.require_isolation` refuses to run without it):
- its own fresh directory, removed afterwards;
- as root: a private mount + network namespace; the root directory replaced by a fresh tmpfs that
  holds only read-only binds of /usr (and the interpreter's prefix), the work dir at /work, a
  private /tmp and /dev/{null,zero,random,urandom} -- no /proc, /sys, /etc, /home, /root, no other
  files of the machine (the benchmark data, the run directory); no network (a down loopback);
  then a random unprivileged uid, so RLIMIT_NPROC really bounds fork bombs, other processes
  cannot be signalled or traced, and every process of that uid is killed afterwards (even ones
  that left the process group);
- resource limits (CPU, address space, file size, processes, no core files) set in preexec_fn;
- a wall-clock deadline that kills the process groups; output read up to a byte cap;
- `python -I -B` with a minimal environment.

Verdict reasons: passed | failed_test | timeout | crash | syntax_error | memory | output_limit.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_rasft.verify import plain
from megatron_rasft.verify.plan import Pair, Plan, make_plan

REASONS = ("passed", "failed_test", "timeout", "crash", "syntax_error", "memory", "output_limit")
_EXIT = {4: "syntax_error", 5: "memory", 6: "crash"}
_HERE = Path(__file__).resolve().parent


def _program_text(harness: str) -> str:
    return (_HERE / "plain.py").read_text() + "\n" + (_HERE / harness).read_text()


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


def extract_code(text: str) -> str:
    """The last ```python (or ```py / bare ```) fenced block, else the text itself."""
    blocks = re.findall(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", text, re.DOTALL)
    return blocks[-1] if blocks else text


def build_program(tests: dict, code_prefix: str, completion: str) -> str:
    """The program the candidate's interpreter runs. HumanEval / io: the problem's code prefix (its
    signature / stub, never a rendered prompt) + the completion's code, on a new line when the
    completion restates the whole function; MBPP: the completion's code alone."""
    if not isinstance(tests, dict) or tests.get("format") not in ("humaneval", "mbpp", "io"):
        raise ValueError("problem.tests must be a dict with format 'humaneval', 'mbpp' or 'io'")
    code = extract_code(completion)
    if tests["format"] == "mbpp":
        return code
    entry = tests.get("entry_point")
    if not isinstance(entry, str):
        raise ValueError(f"{tests['format']} tests need 'entry_point'")
    prefix = code_prefix or ""
    sep = "\n" if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M) else ""
    return prefix + sep + code if prefix else code


# ---- isolation ------------------------------------------------------------------------------
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


def _make_preexec(cfg: SandboxConfig, uid: Optional[int], info: dict, root: str, work: str):
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


_ISOLATION: Optional[dict] = None


def isolation() -> dict:
    """What containment this machine allows (probed once per process): {"uid_switch",
    "namespaces" (new root, no network, private /tmp), "python"}."""
    global _ISOLATION
    if _ISOLATION is not None:
        return _ISOLATION
    root = os.geteuid() == 0
    pythons = [p for p in ("/usr/bin/python3", os.path.realpath(sys.executable), shutil.which("python3"))
               if p and os.path.exists(p)]
    options = [(True, True), (True, False)] if root else [(False, False)]
    cfg = SandboxConfig(timeout_s=20)
    for use_uid, use_ns in options:
        for python in dict.fromkeys(pythons):
            info = {"uid_switch": use_uid, "namespaces": use_ns, "python": python}
            if _probe(cfg, info):
                _ISOLATION = info
                return info
    _ISOLATION = {"uid_switch": False, "namespaces": False, "python": pythons[0]}
    print("warning: the code sandbox runs WITHOUT containment here (needs root and mount/network "
          "namespaces): limits and the plain-data boundary only; see docs/verify_and_weighting.md",
          file=sys.stderr, flush=True)
    return _ISOLATION


def _probe(cfg: SandboxConfig, info: dict) -> bool:
    try:
        res = _call_outputs("def f():\n    return 1\n", [Pair("f", [], "eq", 1)], cfg, info)
    except (OSError, subprocess.SubprocessError):
        return False
    return res["outputs"] == [("ok", 1)]


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


class _Run:
    """The sandboxed processes of one check: spawned into their own directories, read until they
    finish, the deadline or a byte cap, then killed (with every process of their uids) and their
    directories removed."""

    def __init__(self, cfg: SandboxConfig, info: dict):
        self.cfg, self.info = cfg, info
        if cfg.scratch_dir:
            os.makedirs(cfg.scratch_dir, exist_ok=True)
        self.base = tempfile.mkdtemp(prefix="rasft-sbx-", dir=cfg.scratch_dir)  # 0700, owned by us
        self.procs: list = []  # [(proc, uid)]
        self.fds: dict = {}  # fd -> (name, cap)
        self.uids: list = []

    def spawn(self, files: dict, harness: str, args: tuple = (), pass_fds: tuple = (), stdin=subprocess.PIPE,
              log_name: str = "log", extra_fds: Optional[dict] = None,
              harness_text: Optional[str] = None) -> subprocess.Popen:
        n = len(self.procs)
        work, root = os.path.join(self.base, f"work{n}"), os.path.join(self.base, f"root{n}")
        os.mkdir(work)
        os.mkdir(root)
        uid = random.SystemRandom().randint(100_000, 2**31 - 2) if self.info["uid_switch"] else None
        if uid is not None:
            os.chown(work, uid, uid)
        os.chmod(work, 0o700)
        text = _program_text(harness) if harness_text is None else harness_text
        for name, text in dict(files, **{"harness.py": text}).items():
            with open(os.path.join(work, name), "w") as f:
                f.write(text)
            os.chmod(os.path.join(work, name), 0o644)
        log_r, log_w = os.pipe()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "HOME": "/work" if self.info["namespaces"] else work}
        try:
            proc = subprocess.Popen([self.info["python"], "-I", "-B", "harness.py", *map(str, args)], cwd=work,
                                    env=env, stdin=stdin, stdout=log_w, stderr=log_w, pass_fds=pass_fds,
                                    start_new_session=True, close_fds=True,
                                    preexec_fn=_make_preexec(self.cfg, uid, self.info, root, work))
        finally:
            os.close(log_w)
        self.procs.append((proc, uid))
        self.fds[log_r] = (log_name, self.cfg.max_output_bytes)
        for fd, name in (extra_fds or {}).items():
            self.fds[fd] = (name, 8 * self.cfg.max_output_bytes)
        return proc

    def collect(self, write_stdin: Optional[dict] = None) -> dict:
        """Read every registered fd until EOF, the deadline, or a cap -> {name: bytes, "over":
        name or None, "timed_out": bool}. `write_stdin`: {proc: text}, written by a thread."""
        writers = []
        for proc, text in (write_stdin or {}).items():
            def write(p=proc, t=text):
                try:
                    p.stdin.write(t.encode())
                    p.stdin.close()
                except (BrokenPipeError, OSError, ValueError):
                    pass
            th = threading.Thread(target=write, daemon=True)
            th.start()
            writers.append(th)
        deadline = time.monotonic() + self.cfg.timeout_s
        bufs = {fd: bytearray() for fd in self.fds}
        sel = selectors.DefaultSelector()
        for fd in self.fds:
            sel.register(fd, selectors.EVENT_READ)
        over, timed_out, exited = None, False, False
        while sel.get_map() and over is None:
            now = time.monotonic()
            if now >= deadline:
                timed_out = not exited
                break
            for key, _ in sel.select(min(deadline - now, 0.05)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                name, cap = self.fds[key.fd]
                if len(bufs[key.fd]) + len(chunk) > cap:
                    over = name
                    break
                bufs[key.fd] += chunk
            if not exited and all(p.poll() is not None for p, _ in self.procs):
                # Leftover children may hold the pipes open: drain briefly, then they get killed.
                exited, deadline = True, min(deadline, time.monotonic() + 0.5)
        sel.close()
        out = {name: bytes(bufs[fd]) for fd, (name, _) in self.fds.items()}
        out.update(over=over, timed_out=timed_out)
        return out

    def close(self) -> None:
        for proc, uid in self.procs:
            _kill_all(proc, uid)
            for f in (proc.stdin,):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}
        shutil.rmtree(self.base, ignore_errors=True)


def _exit_reason(proc: subprocess.Popen, timed_out: bool) -> Optional[str]:
    if timed_out or proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    return _EXIT.get(proc.returncode)


def _tail(b: bytes, n: int = 2000) -> str:
    return b.decode("utf-8", "replace")[-n:]


# ---- the pairs path -------------------------------------------------------------------------
def _call_outputs(program: str, pairs: list, cfg: SandboxConfig, info: dict, setup: str = "") -> dict:
    """Run `program` and call it on each pair's arguments -> {"status": None or a reason,
    "outputs": [("ok", value) | ("exc", name) | None per pair], "log", "returncode", "uid"}."""
    run = _Run(cfg, info)
    try:
        rep_r, rep_w = os.pipe()
        try:
            files = {"solution.py": program, **({"setup.py": setup} if setup.strip() else {})}
            proc = run.spawn(files, "harness_candidate.py", args=(rep_w,), pass_fds=(rep_w,),
                             extra_fds={rep_r: "replies"})
        finally:
            os.close(rep_w)
        requests = "".join(json.dumps({"i": i, "fn": p.fn, "args": plain.to_plain(list(p.args))}) + "\n"
                           for i, p in enumerate(pairs))
        out = run.collect(write_stdin={proc: requests})
    finally:
        run.close()
    status = "output_limit" if out["over"] else _exit_reason(proc, out["timed_out"])
    outputs: list = [None] * len(pairs)
    lines = out["replies"].split(b"\n")
    ready = False
    for line in lines:
        if not line:
            continue
        try:
            j = json.loads(line)
        except (ValueError, RecursionError):
            break
        if not ready:
            ready = type(j) is dict and "ready" in j
            if not ready:
                break
            continue
        i = j.get("i") if type(j) is dict else None
        if type(i) is not int or not 0 <= i < len(pairs) or outputs[i] is not None:
            break  # a malformed or repeated reply ends what we accept
        try:
            outputs[i] = ("ok", plain.from_plain(j["ok"])) if "ok" in j else ("exc", str(j.get("exc"))[:60])
        except (plain.PlainDataError, KeyError):
            outputs[i] = ("exc", "not plain data")
    return {"status": status, "ready": ready, "outputs": outputs, "log": out["log"],
            "returncode": proc.returncode, "uid": run.procs[0][1]}


def call_in_sandbox(program: str, fn: str, args_list: list, cfg: Optional[SandboxConfig] = None) -> dict:
    """Run `program` contained and call `fn` on each argument list -> {"outputs": [("ok", value) |
    ("exc", name) | None], "status": None or a reason, "log": bytes, "uid"}. No checking: the
    containment tests and the benchmark's baseline use it."""
    cfg = cfg or SandboxConfig()
    info = _checked_isolation(cfg)
    return _call_outputs(program, [Pair(fn, list(a), "eq") for a in args_list], cfg, info)


def run_bare(program: str, cfg: Optional[SandboxConfig] = None) -> dict:
    """Baseline for the benchmark: one contained interpreter runs `program` as its main script,
    nothing checked -> {"returncode", "status"}."""
    cfg = cfg or SandboxConfig()
    run = _Run(cfg, _checked_isolation(cfg))
    try:
        proc = run.spawn({}, "", harness_text=program, stdin=subprocess.DEVNULL)
        out = run.collect()
    finally:
        run.close()
    status = "output_limit" if out["over"] else _exit_reason(proc, out["timed_out"])
    return {"returncode": proc.returncode, "status": status}


def _checked_isolation(cfg: SandboxConfig) -> dict:
    info = dict(isolation())
    if cfg.require_isolation and not (info["namespaces"] and info["uid_switch"]):
        raise RuntimeError(f"sandbox: no containment on this machine ({info}); run as root with namespaces")
    if cfg.python:
        info["python"] = cfg.python
    return info


def _judge(pair, output, atol: float, expected=None) -> Optional[str]:
    """None when the output satisfies the pair, else why not."""
    if output is None:
        return "no output"
    if output[0] == "exc":
        return f"raised {output[1]}"
    got = output[1]
    if pair.kind == "ref":
        # EvalPlus's rule: rtol 1e-7, and atol 1e-6 when the benchmark gives 0.
        ok = plain.same(got, expected, atol or 1e-6, 1e-7)
        return None if ok else f"got {got!r:.200}, expected {expected!r:.200}"
    if pair.kind == "eq":
        ok = plain.same(got, pair.expected)  # an assert's `==`: exact
    elif pair.kind == "truthy":
        ok = bool(got)
    elif pair.kind == "falsy":
        ok = not got
    else:
        num = type(got) in (int, float)
        if pair.kind == "close":
            tol, strict = pair.tol
            ok = num and (abs(got - pair.expected) < tol if strict else abs(got - pair.expected) <= tol)
        else:
            import math
            ok = num and math.isclose(got, pair.expected, rel_tol=pair.tol[0], abs_tol=pair.tol[1])
    return None if ok else f"got {got!r:.200}"


_REFERENCE: dict = {}
_REFERENCE_LOCK = threading.Lock()


def reference_outputs(plan: Plan, cfg: SandboxConfig, info: dict) -> list:
    """The reference solution's outputs on the plan's inputs (run once in the sandbox, cached by
    content). Raises RuntimeError when the reference itself fails."""
    key = hashlib.sha256(json.dumps([plan.reference, [p.args for p in plan.pairs]]).encode()).hexdigest()
    with _REFERENCE_LOCK:
        if key in _REFERENCE:
            return _REFERENCE[key]
    res = _call_outputs(plan.reference, plan.pairs, cfg, info)
    if res["status"] or not all(o is not None and o[0] == "ok" for o in res["outputs"]):
        bad = next((i for i, o in enumerate(res["outputs"]) if o is None or o[0] != "ok"), None)
        raise RuntimeError(f"the reference solution fails ({res['status'] or 'input #%s' % bad}): "
                           f"{_tail(res['log'], 300)}")
    values = [o[1] for o in res["outputs"]]
    with _REFERENCE_LOCK:
        _REFERENCE[key] = values
    return values


def _pairs_check(program: str, plan: Plan, cfg: SandboxConfig, info: dict) -> dict:
    expected = [None] * len(plan.pairs)
    if plan.reference is not None:
        try:
            expected = reference_outputs(plan, cfg, info)
        except RuntimeError as e:
            return {"correct": False, "reason": "crash", "detail": f"bad problem: {e}", "uid": None}
    res = _call_outputs(program, plan.pairs, cfg, info, plan.setup)
    base = {"returncode": res["returncode"], "uid": res["uid"], "path": "pairs"}
    if res["status"] in ("output_limit", "timeout", "syntax_error", "memory") or (res["status"] and not res["ready"]):
        return dict(base, correct=False, reason=res["status"], detail=_tail(res["log"]))
    if not res["ready"]:
        return dict(base, correct=False, reason="crash",
                    detail="the program ended before defining its functions\n" + _tail(res["log"]))
    for i, (pair, out) in enumerate(zip(plan.pairs, res["outputs"])):
        why = _judge(pair, out, plan.atol, expected[i])
        if why is not None:
            if out is None:  # no answer: the process ended early (exit, kill, crash)
                return dict(base, correct=False, reason=res["status"] or "crash",
                            detail=f"no output for call #{i} ({pair.fn})\n" + _tail(res["log"]))
            return dict(base, correct=False, reason="failed_test",
                        detail=f"call #{i}: {pair.fn}{tuple(pair.args)!r:.200}: {why}")
    return dict(base, correct=True, reason="passed", detail="")


# ---- the driver path ------------------------------------------------------------------------
def _driver_check(program: str, plan: Plan, cfg: SandboxConfig, info: dict) -> dict:
    run = _Run(cfg, info)
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    ver_r, ver_w = os.pipe()
    try:
        files = {"solution.py": program, **({"setup.py": plan.setup} if plan.setup.strip() else {})}
        cand = run.spawn(files, "harness_candidate.py", args=(rep_w,), pass_fds=(rep_w,), stdin=req_r)
        spec = dict(plan.driver, req_fd=req_w, rep_fd=rep_r, verdict_fd=ver_w)
        run.spawn({"check.json": json.dumps(spec)}, "harness_checker.py", pass_fds=(req_w, rep_r, ver_w),
                  stdin=subprocess.DEVNULL, log_name="checker_log", extra_fds={ver_r: "verdict"})
    finally:
        for fd in (req_r, req_w, rep_r, rep_w, ver_w):
            os.close(fd)
    try:
        out = run.collect()
    finally:
        run.close()
    status = "output_limit" if out["over"] == "log" else _exit_reason(cand, out["timed_out"])
    base = {"returncode": cand.returncode, "uid": run.procs[0][1], "path": "driver"}
    try:
        verdict = json.loads(out["verdict"])
        reason = verdict["reason"]
    except (ValueError, KeyError, TypeError):
        verdict, reason = {}, None
    if reason == "passed" and status is None:
        return dict(base, correct=True, reason="passed", detail="")
    if status is not None:
        return dict(base, correct=False, reason=status, detail=_tail(out["log"]))
    if reason in ("failed_test", "output_limit"):
        return dict(base, correct=False, reason=reason, detail=verdict.get("detail", "") + _tail(out["log"], 500))
    detail = verdict.get("detail") or "the checker gave no verdict\n" + _tail(out["checker_log"], 500)
    return dict(base, correct=False, reason="crash", detail=detail + "\n" + _tail(out["log"]))


def run_tests(tests: dict, code_prefix: str, completion: str, cfg: Optional[SandboxConfig] = None) -> dict:
    """Check one completion against `tests` -> {"correct", "reason", "detail", "path", "uid", ...}.
    `code_prefix`: the program's start for HumanEval-style problems (signature / stub), "" for MBPP.
    Raises RuntimeError when `cfg.require_isolation` and the machine gives no containment."""
    cfg = cfg or SandboxConfig()
    try:
        plan = make_plan(tests)
        program = build_program(tests, code_prefix, completion)
    except ValueError as e:
        return {"correct": False, "reason": "crash", "detail": f"bad problem tests: {e}"}
    info = _checked_isolation(cfg)
    try:
        if plan.path == "pairs":
            return _pairs_check(program, plan, cfg, info)
        if plan.driver["format"] == "humaneval":
            plan.driver["prefix"] = code_prefix or ""  # the problem's helpers, defined in the checker too
        return _driver_check(program, plan, cfg, info)
    except (OSError, subprocess.SubprocessError) as e:
        return {"correct": False, "reason": "crash", "detail": f"could not start the sandbox: {e}"}


def run_many(jobs: list, cfg: Optional[SandboxConfig] = None, workers: int = 2, on_result=None) -> list:
    """jobs: [(tests, code_prefix, completion), ...] -> verdict dicts in order, `workers` at a time."""
    isolation()  # probe once before the threads start

    def one(i_job):
        i, job = i_job
        v = run_tests(*job, cfg=cfg)
        if on_result is not None:
            on_result(i)
        return v
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(one, enumerate(jobs)))
