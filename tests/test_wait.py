"""parallel/wait.py in 2 real gloo processes whose process group times out after 2 s: rank 0 works
for 6 s while rank 1 waits in `rank0_done` (a barrier would time out there), then both learn
whether rank 0 failed, twice in a row (the second call uses a new store key)."""
import time

from megatron_rasft.testing.distributed import spawn


def _ranks(rank, world_size, work_s):
    from datetime import timedelta

    import torch.distributed as dist

    from megatron_rasft.parallel.wait import rank0_done

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=2))
    out = []
    for failure in (None, "server gone"):
        t0 = time.monotonic()
        if rank == 0:
            time.sleep(work_s)
        out.append((rank0_done(failure if rank == 0 else None, what="test", note_every_s=2.0),
                    time.monotonic() - t0))
    dist.destroy_process_group()
    return out


def test_rank0_done_outlasts_the_process_group_timeout():
    results = spawn(_ranks, 2, 6.0, timeout_s=300)
    for rank_out in results:
        (ok_flag, ok_s), (fail_flag, fail_s) = rank_out
        assert ok_flag is False and fail_flag is True  # rank 0's outcome, on every rank
        assert ok_s >= 5.0 and fail_s >= 5.0  # 2.5x the collective timeout, and nothing timed out
