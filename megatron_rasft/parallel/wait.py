"""Wait for rank 0 without a deadline.

Rank 0 alone drives a rollout round (the server, generation, verification), which can take far
longer than the process-group timeout (`parallel.distributed_timeout_minutes`): a barrier would
let NCCL's watchdog or gloo abort the job. Instead, rank 0 sets a key in torch.distributed's
default store (the TCPStore that `init_process_group` rendezvoused through) when it is done, the
other ranks poll that key (`Store.check`, which returns at once and has no deadline) and print a
progress line every minute, and then all ranks meet in one short collective that also tells them
whether rank 0 failed.
"""
from __future__ import annotations

import time
from typing import Optional

_PREFIX = "megatron_rasft/rank0_done/"


class _Counter:
    """Every rank calls `rank0_done` the same number of times in the same order: the n-th call of
    each rank uses the same key."""

    n = 0


def _store():
    import torch.distributed as dist

    # The store of the default process group; torch exposes it only under this name.
    return dist.distributed_c10d._get_default_store()


def rank0_done(failure: Optional[str], what: str, poll_s: float = 0.5, note_every_s: float = 60.0) -> bool:
    """Collective, without a deadline for rank 0's work: every rank returns once rank 0 has called
    it, True when rank 0 reported a failure (`failure` is not None there; ignored on other ranks).

    what: names the wait in the progress lines ("round 3"). poll_s: seconds between polls of the
    store. note_every_s: seconds between the waiting ranks' progress lines.
    Raises what the store or the final broadcast raise. A rank 0 that dies does not leave the others
    polling forever: under torchrun the agent stops every worker when one fails, and a store hosted
    by rank 0 itself stops answering (`check` raises)."""
    import torch
    import torch.distributed as dist

    from megatron_rasft.parallel.groups import device

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failure is not None
    _Counter.n += 1
    key = f"{_PREFIX}{_Counter.n}"
    store, rank = _store(), dist.get_rank()
    if rank == 0:
        store.set(key, "1" if failure is not None else "0")
    else:
        start = last_note = time.monotonic()
        while not store.check([key]):
            now = time.monotonic()
            if now - last_note >= note_every_s:
                print(f"[rank {rank}] waiting for rank 0 ({what}): {now - start:.0f}s", flush=True)
                last_note = now
            time.sleep(poll_s)
    # Rank 0 is done: one short collective, so that every rank leaves together and learns the outcome.
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=device())
    dist.broadcast(flag, src=0)
    return bool(flag.item())
