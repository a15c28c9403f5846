"""Overlapped rounds (`rollout.overlap = true`): window w+1's round runs while window w trains.

At the boundary before window w trains, the stream (`train/stream.py`) takes round w's result, then
`start`s round w+1: the export, the probe's expected log-probs and the selection (collective, from
the weights of this boundary), the round's start record and the server's refresh (rank 0). Rank 0
then finishes the round (generation, verification, weighting, its records) in a thread while every
rank trains window w; `result` takes it at the next boundary, waiting without a deadline if it is
not done. The rollouts trained in window w+1 therefore come from the policy one window old.

Resume: the start record (`RUN/rounds/start_R.json`) fixes everything the rest of the round needs
(the export it samples from, the probe that proves the server serves it, the selection), so a run
killed during a background round restarts it from that record and the stages' own records:
nothing finished is redone, and the rollouts still missing come from the same weights. The export
stays valid because the next export happens only after this round's result is taken.
"""
from __future__ import annotations

import threading
import time

from megatron_rasft.parallel.groups import rank0
from megatron_rasft.records import RoundResult, RoundStart
from megatron_rasft.rounds.coordination import RoundFailed, failure_of, is_server_error
from megatron_rasft.rounds.round import Rounds


class OverlappedRounds:
    """At most one round in the background. Collective methods: every rank calls `start`,
    `resume` and `result` in the same order; the thread and the server exist on rank 0 only."""

    def __init__(self, rounds: Rounds):
        self.rounds = rounds
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, r: int, problem_ids: list, step: int, hard_pool: dict) -> dict:
        """Begin round `r` on `problem_ids` from the current weights (the selection from `step` and
        `hard_pool`) and leave the rest to rank 0's thread. -> {"export": s, "refresh": s}, the
        seconds spent at the boundary. Raises RoundFailed when the server cannot be refreshed."""
        start, seconds = self.rounds.begin(r, problem_ids, step, hard_pool)
        self._launch(start)
        return seconds

    def resume(self, r: int, in_flight: bool) -> None:
        """A resumed run whose round `r` was in the background when it stopped (`in_flight`):
        refresh the server to that round's export again and finish the round in the background
        (nothing to do when it had finished, or when no round was in flight)."""
        run = self.rounds.run
        if not in_flight or run.round_result(r).is_file():
            return
        start: RoundStart | None = None
        if rank0():
            start = self.rounds.read_start(r)
            print(f"[round {r}] resuming in the background from {run.round_start(r)}", flush=True)
        self.rounds.refresh_together(r, start)
        self._launch(start)

    def result(self, r: int) -> tuple[RoundResult, dict]:
        """Round `r`'s (RoundResult, {key: Seq}), once rank 0's thread has finished it. Raises
        RoundFailed on every rank when the rollout server failed it; any other error of the thread
        is re-raised on rank 0."""
        failure, error, t0 = None, None, time.time()
        if rank0():
            if self._thread is not None:
                self._thread.join()
                self._thread, error, self._error = None, self._error, None
            elif not self.rounds.run.round_result(r).is_file():
                error = RuntimeError(f"round {r} was never started in the background")
            if error is not None:
                failure = failure_of(r, error)
        try:
            self.rounds.coordination.wait(r, failure, t0)
        except RoundFailed:
            if error is not None and not is_server_error(error):
                raise error
            raise
        return self.rounds.read_result(r)

    def close(self) -> None:
        """Let a round still in the background write its records (a run never ends with one in
        flight unless it stops early)."""
        if self._thread is not None:
            self._thread.join()

    def _launch(self, start: RoundStart | None) -> None:
        if not rank0():
            return

        def work() -> None:
            try:
                self.rounds.finish(start)
            except BaseException as e:  # handed to `result` on the trainer's thread
                self._error = e

        self._error = None
        self._thread = threading.Thread(target=work, name=f"round-{start.round}", daemon=True)
        self._thread.start()
