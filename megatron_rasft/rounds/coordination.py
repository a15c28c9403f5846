"""Rank coordination of a round: rank 0 works, every rank waits, one failure type.

Rank 0 alone drives a round's server and stages; the other ranks wait for it without a deadline
(`parallel.wait.rank0_done`: a round outlasts any collective timeout). A server that dies and does
not come back (`rollout.session.server_errors`) fails the round on every rank with `RoundFailed`;
any other error is a bug and propagates.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from megatron_rasft.parallel.groups import rank0
from megatron_rasft.parallel.wait import rank0_done
from megatron_rasft.rollout.session import server_errors


class RoundFailed(RuntimeError):
    """A round could not finish (its rollout server died and did not come back, or would not serve
    the trainer's weights). Raised on every rank; the loop then saves a checkpoint to resume from."""


def failure_of(r: int, error: BaseException) -> str:
    """The one-line message of round `r` stopped by `error`."""
    return f"round {r} stopped: {type(error).__name__}: {error}"


def is_server_error(error: BaseException) -> bool:
    """Whether `error` is a dead or unusable server's (a `RoundFailed` on every rank), not a bug."""
    return isinstance(error, server_errors())


class Coordination:
    """Rank 0's part of each round and every rank's wait for it. `wait_s`: seconds the trainer's
    ranks were held by rank 0's part of the rounds so far."""

    def __init__(self):
        self.wait_s = 0.0

    def work(self, r: int, work: Callable[[], None]) -> Optional[str]:
        """On rank 0, run `work()` (its part of round `r`) -> None, or the failure message when the
        rollout server failed it; on other ranks None. Any other error propagates."""
        if not rank0():
            return None
        try:
            work()
        except server_errors() as e:
            return failure_of(r, e)
        return None

    def wait(self, r: int, failure: Optional[str], since: float) -> None:
        """Every rank: wait without a deadline until rank 0 is done with round `r` (its part began at
        `since`, time.time()); raises RoundFailed on every rank when it failed. `failure`: rank 0's
        message (printed here), None elsewhere or when it succeeded."""
        if failure is not None:
            print(f"[round {r}] {failure}", flush=True)
        failed = rank0_done(failure, what=f"round {r}")
        self.wait_s += time.time() - since
        if failed:
            raise RoundFailed(failure or f"round {r} failed on rank 0 (see its output)")

    def together(self, r: int, work: Callable[[], None]) -> None:
        """Rank 0 runs `work()`, every rank waits for it (`work` then `wait`). Collective."""
        t0 = time.time()
        self.wait(r, self.work(r, work), t0)
