"""parallel/wait.py in 2 real gloo processes whose collectives time out after 4 s: rank 0 works for
10 s while rank 1 waits in `rank0_done` (a barrier times out there), then both learn whether rank 0
failed, twice in a row (the second call uses a new store key). The store itself gets a long
timeout, so that a slow start of one process on a loaded machine does not fail the rendezvous."""
import os
import time

from megatron_rasft.testing.distributed import spawn

TIMEOUT_S, WORK_S = 4, 10.0


def _ranks(rank, world_size):
    from datetime import timedelta

    import torch.distributed as dist

    from megatron_rasft.parallel.wait import rank0_done

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, rank == 0,
                          timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=TIMEOUT_S))
    dist.barrier()  # both ranks start the clock together
    out = []
    for failure in (None, "server gone"):
        t0 = time.monotonic()
        if rank == 0:
            time.sleep(WORK_S)
        out.append((rank0_done(failure if rank == 0 else None, what="test", note_every_s=5.0),
                    time.monotonic() - t0))
    dist.destroy_process_group()
    return out


def test_rank0_done_outlasts_the_process_group_timeout():
    results = spawn(_ranks, 2, timeout_s=300)
    for rank_out in results:
        (ok_flag, ok_s), (fail_flag, fail_s) = rank_out
        assert ok_flag is False and fail_flag is True  # rank 0's outcome, on every rank
        assert ok_s >= WORK_S - 1 and fail_s >= WORK_S - 1  # 2.5x the collective timeout, nothing timed out
