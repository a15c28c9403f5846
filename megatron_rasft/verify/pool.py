"""A small process pool with a hard per-task wall-clock timeout.

`concurrent.futures.ProcessPoolExecutor` cannot cancel a running task, and math-verify's own
timeouts (signal.alarm) only work in a process's main thread and only between Python bytecodes.
Here each worker is a plain `multiprocessing.Process` talking over a pipe, running one task at a
time in its main thread; a task past its deadline gets its worker SIGKILLed and replaced, and is
reported as `timeout`. A worker that dies (segfault, OOM kill) is replaced and its task reported
as `error`. Workers come from a forkserver whose preloaded modules make replacements cheap
(a fork, not a fresh interpreter importing sympy).
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Optional, Sequence


@dataclass
class Outcome:
    status: str  # "ok" | "timeout" | "error"
    value: Any = None
    error: Optional[str] = None


def _worker_main(conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, fn, arg = msg
        try:
            reply = (idx, "ok", fn(arg), None)
        except BaseException as e:  # noqa: BLE001 - the task's failure is data, not ours
            reply = (idx, "error", None, f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result
            conn.send((idx, "error", None, f"result could not be sent back: {e}"))


_WARMUP = -1  # task index of a worker's warm-up call


class _Worker:
    def __init__(self, ctx, warmup: Optional[tuple], warmup_timeout_s: float):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.task: Optional[int] = None
        self.deadline = 0.0
        if warmup is not None:
            # First calls pay lazy imports and parser compilation (seconds on a loaded machine):
            # not charged to any item's deadline.
            self.conn.send((_WARMUP, warmup[0], warmup[1]))
            self.task, self.deadline = _WARMUP, time.monotonic() + warmup_timeout_s

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class TimeoutPool:
    """`num_workers` processes; `map(fn, items, timeout_s)` returns one `Outcome` per item, in
    order. `fn` must be picklable (a module-level function)."""

    def __init__(self, num_workers: int = 2, preload: Sequence[str] = (), warmup: Optional[tuple] = None,
                 warmup_timeout_s: float = 120.0):
        """`warmup`: an optional `(fn, arg)` each new worker runs before its first item."""
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        try:
            self._ctx = mp.get_context("forkserver")
            if preload:
                self._ctx.set_forkserver_preload(list(preload))
        except ValueError:  # no forkserver on this platform
            self._ctx = mp.get_context("spawn")
        self.num_workers = num_workers
        self.warmup, self.warmup_timeout_s = warmup, warmup_timeout_s
        self._workers: list[_Worker] = []
        self.restarts = 0

    def _ensure_workers(self, warm: bool = True) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.warmup if warm else None, self.warmup_timeout_s))

    def _replace(self, w: _Worker, warm: bool = True) -> None:
        w.kill()
        self._workers.remove(w)
        self.restarts += 1
        self._ensure_workers(warm)

    def map(self, fn: Callable, items: Sequence, timeout_s: float,
            on_result: Optional[Callable[[int, Outcome], None]] = None) -> list[Outcome]:
        self._ensure_workers()
        results: list[Optional[Outcome]] = [None] * len(items)
        todo = list(range(len(items)))[::-1]
        done = 0

        def finish(idx: int, out: Outcome) -> None:
            nonlocal done
            results[idx] = out
            done += 1
            if on_result is not None:
                on_result(idx, out)

        while done < len(items):
            for w in self._workers:
                if w.task is None and todo:
                    idx = todo.pop()
                    w.conn.send((idx, fn, items[idx]))
                    w.task, w.deadline = idx, time.monotonic() + timeout_s
            busy = [w for w in self._workers if w.task is not None]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            for w in busy:
                if w.conn in ready:
                    try:
                        idx, status, value, error = w.conn.recv()
                    except (EOFError, OSError):
                        idx = w.task
                        w.proc.join(1)
                        code = w.proc.exitcode
                        self._replace(w, warm=idx != _WARMUP)
                        if idx != _WARMUP:
                            finish(idx, Outcome("error", error=f"worker died (exit code {code})"))
                        continue
                    w.task = None
                    if idx != _WARMUP:
                        finish(idx, Outcome(status, value, error))
                elif time.monotonic() >= w.deadline:
                    idx = w.task
                    if idx == _WARMUP:  # a warm-up that hangs: replace the worker, without one
                        self._replace(w, warm=False)
                        continue
                    self._replace(w)
                    finish(idx, Outcome("timeout", error=f"no result after {timeout_s:g} s"))
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            w.proc.join(2)
            w.kill()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
