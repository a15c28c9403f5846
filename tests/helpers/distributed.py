"""Spawn N real processes on CPU (gloo), run a function in each, and collect results — with a timeout.

`fn(rank, world_size, *args)` must be a module-level function (it is pickled by name). Each process
gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set and the CPU shim applied, as torchrun would; `fn`
calls `init_distributed` itself (so it can choose TP/PP). A failing rank's traceback is re-raised in
the caller; a run that exceeds `timeout_s` is killed and reported, so no test can hang.
"""
from __future__ import annotations

import io
import os
import queue
import traceback

import torch
import torch.multiprocessing as mp

from megatron_rasft.parallel.net import free_port


def _entry(fn, rank, world_size, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.simplefilter("ignore")
    try:
        import torch

        torch.set_num_threads(1)
        from megatron_rasft.parallel import cpu

        cpu.enable()
        out = fn(rank, world_size, *args)
        # Serialise by value: tensors sent through a multiprocessing queue are shared-memory handles
        # that die with this process.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_rasft.parallel.groups import destroy_distributed

            destroy_distributed()
        except Exception:  # noqa: BLE001
            pass


def spawn(fn, world_size: int, *args, timeout_s: float = 300.0) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes; return results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    import time

    deadline = time.monotonic() + timeout_s
    out: dict = {}
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"spawned job did not finish within {timeout_s:.0f}s "
                                   f"(ranks done: {sorted(out)})")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in out]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died with exit code(s) "
                                       f"{[procs[i].exitcode for i in dead]} before reporting")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]
