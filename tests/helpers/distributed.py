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


def megatron_logits(model_chunks: list, tokens: torch.Tensor, first_replica_only: bool = False):
    """Full-vocab fp32 logits [b, s, Vp] of `model_chunks` (this rank's Megatron chunks, after
    `init_distributed`) on `tokens` [b, s], through Megatron's forward-only schedule; the TP shards are
    all-gathered. Returned on the last pipeline stage's TP rank 0 (of data-parallel rank 0 only with
    `first_replica_only`), None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rasft.engine.step import forward_backward

    captured = []
    tp_group = ps.get_tensor_model_parallel_group()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None)

        def loss_func(logits_BSv):
            parts = [torch.empty_like(logits_BSv) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, logits_BSv.contiguous(), group=tp_group)
            captured.append(torch.cat(parts, dim=-1))
            return logits_BSv.sum() * 0, torch.tensor(1, dtype=torch.int), {}

        return out, loss_func

    b, s = tokens.shape
    batch = {"tokens": tokens, "position_ids": torch.arange(s).expand(b, s).contiguous()}
    with torch.no_grad():
        forward_backward(model_chunks, forward_step, [batch], seq_length=s, forward_only=True)
    keep = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    if first_replica_only:
        keep = keep and ps.get_data_parallel_rank() == 0
    return captured[0] if keep and captured else None
