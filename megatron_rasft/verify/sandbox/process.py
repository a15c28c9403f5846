"""Running contained interpreters and talking to them: a check's processes (`Run`: spawn into fresh
directories, read their pipes until exit, deadline or byte cap, kill, clean up), the pairs-path
exchange (`call_outputs`: call requests in, plain-data replies out), and what containment this
machine allows (`isolation`, probed once by running a contained interpreter)."""
from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from megatron_rasft.verify import plain
from megatron_rasft.verify.plan import Pair
from megatron_rasft.verify.sandbox.isolation import SandboxConfig, kill_all, make_preexec

_EXIT = {4: "syntax_error", 5: "memory", 6: "crash"}
_VERIFY = Path(__file__).resolve().parents[1]  # the harnesses and plain.py live in verify/


def _program_text(harness: str) -> str:
    return (_VERIFY / "plain.py").read_text() + "\n" + (_VERIFY / harness).read_text()


_ISOLATION: Optional[dict] = None  # isolation()'s answer, probed once per process


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
        res = call_outputs("def f():\n    return 1\n", [Pair("f", [], "eq", 1)], cfg, info)
    except (OSError, subprocess.SubprocessError):
        return False
    return res["outputs"] == [("ok", 1)]


class Run:
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
                                    preexec_fn=make_preexec(self.cfg, uid, self.info, root, work))
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
            kill_all(proc, uid)
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


def exit_reason(proc: subprocess.Popen, timed_out: bool) -> Optional[str]:
    if timed_out or proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    return _EXIT.get(proc.returncode)


def tail(b: bytes, n: int = 2000) -> str:
    return b.decode("utf-8", "replace")[-n:]


# ---- the pairs path -------------------------------------------------------------------------
def call_outputs(program: str, pairs: list, cfg: SandboxConfig, info: dict, setup: str = "") -> dict:
    """Run `program` and call it on each pair's arguments -> {"status": None or a reason,
    "outputs": [("ok", value) | ("exc", name) | None per pair], "log", "returncode", "uid"}."""
    run = Run(cfg, info)
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
    status = "output_limit" if out["over"] else exit_reason(proc, out["timed_out"])
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


def checked_isolation(cfg: SandboxConfig) -> dict:
    info = dict(isolation())
    if cfg.require_isolation and not (info["namespaces"] and info["uid_switch"]):
        raise RuntimeError(f"sandbox: no containment on this machine ({info}); run as root with namespaces")
    if cfg.python:
        info["python"] = cfg.python
    return info
