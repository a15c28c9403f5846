"""parallel/wait.py in 2 real gloo processes whose collectives time out after 5 s: rank 0 works for
12.5 s while rank 1 waits in `rank0_done` (a barrier times out there), then both learn that rank 0
succeeded; a second call (a new store key) after 2 s of work carries rank 0's failure to rank 1.
The store itself gets a long timeout, so that a slow start of one process on a loaded machine does
not fail the rendezvous."""
import os
import time

from helpers.distributed import spawn

TIMEOUT_S, WORK_S = 5, 12.5


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
    for failure, work_s in ((None, WORK_S), ("server gone", 2.0)):
        t0 = time.monotonic()
        if rank == 0:
            time.sleep(work_s)
        out.append((rank0_done(failure if rank == 0 else None, what="test", note_every_s=5.0),
                    time.monotonic() - t0))
    dist.destroy_process_group()
    return out


def test_rank0_done_outlasts_the_process_group_timeout():
    results = spawn(_ranks, 2, timeout_s=300)
    for rank_out in results:
        (ok_flag, ok_s), (fail_flag, fail_s) = rank_out
        assert ok_flag is False and fail_flag is True  # rank 0's outcome, on every rank
        assert ok_s >= WORK_S - 1  # 2.5x the collective timeout, and nothing timed out
        assert fail_s >= 1.0
