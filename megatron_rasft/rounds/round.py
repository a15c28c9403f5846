"""One rollout round per window of problems: export → refresh the server → sample → verify →
weigh → the round's queue items and training sequences.

The window-boundary part (export, refresh probe, selection: `probe.py`) is collective; rank 0
drives the server and the stages (`stages.py`) while every rank waits (`coordination.py`). A
synchronous round does both at once (`run_round`); an overlapped one (`overlap.py`) calls `begin`
at the boundary and `finish` in rank 0's background thread.

Resume: every stage is resumable from its own records, and the round's `RoundResult`
(`rounds/round_R.json`) marks a finished round, so a resumed run never redoes a finished round and
a round killed half-way picks up where its stages stopped. A server that dies mid-round is
restarted (trainer-started) or waited for (external, at most `rollout.server.startup_timeout_s`);
only the prompts it lost are resubmitted, after the server has been made to serve the round's
weights again. If it cannot come back, `RoundFailed` is raised on every rank and the loop saves a
checkpoint from which `--resume` redoes nothing already written.
"""
from __future__ import annotations

import time

from megatron_rasft.methods.sequences import to_seq
from megatron_rasft.parallel.groups import barrier, rank0
from megatron_rasft.records import RecordError, RoundResult, RoundStart, TrainSequence, read_records, write_records
from megatron_rasft.rounds.coordination import Coordination
from megatron_rasft.rounds.stages import stage_times, write_problems
from megatron_rasft.rundir import StaleRunDir, parse_key


class Rounds:
    """The rollout rounds of one run. run: the `RunDir`; data: the dataset; probe: the
    `probe.PolicyProbe` (collective parts); stages: the `stages.RoundStages` (rank 0's part);
    prompt_template: `train.data.prompt_template`, for RUN/problems.jsonl. `summaries`: the
    finished rounds' summaries; `wait_s`: seconds the ranks waited for rank 0's parts."""

    def __init__(self, run, data, probe, stages, *, prompt_template):
        self.run, self.probe, self.stages = run, probe, stages
        self.coordination = Coordination()
        self.summaries: list = []
        if rank0():
            write_problems(run, data, prompt_template)
        barrier()

    @classmethod
    def build(cls, cfg, run, data, models, groups) -> "Rounds":
        """The rounds of the run `cfg` (a `RunConfig`) describes, each part given the sections it
        reads. models / groups: the run's models and `ParallelGroups`. Collective."""
        from megatron_rasft.rounds.probe import PolicyProbe
        from megatron_rasft.rounds.stages import RoundStages

        sched = cfg.train.schedule
        probe = PolicyProbe(models, groups, data, run, cfg.model, tokenizer_dir=cfg.train.data.tokenizer,
                            micro_batch_size=sched.micro_batch_size, selection=cfg.rollout.selection,
                            seed=cfg.train.seed, train_iters=sched.train_iters, server=cfg.rollout.server)
        stages = RoundStages(run, data, cfg.rollout, cfg.weighting, max_len=cfg.model.seq_length + 1,
                             grpo=cfg.grpo if cfg.loss.method == "grpo" else None)
        return cls(run, data, probe, stages, prompt_template=cfg.train.data.prompt_template)

    @property
    def wait_s(self) -> float:
        return self.coordination.wait_s

    # -- resume --------------------------------------------------------------------------------
    def restore(self, summaries: list, queue: list) -> dict:
        """A resumed run: its round `summaries`; -> the rollout sequences still in its `queue`
        (`{key: Seq}`), read back from the rounds' `train_sequence` records."""
        self.summaries = list(summaries)
        wanted = {it.key for group in queue for it in group if not parse_key(it.key).is_expert}
        pool: dict = {}
        for path in self.run.all_train_seqs() if wanted else []:
            for ts in read_records(path, TrainSequence):
                if ts.key in wanted:
                    pool[ts.key] = to_seq(ts)
        return pool

    # -- one round -----------------------------------------------------------------------------
    def run_round(self, r: int, problem_ids: list, step: int, hard_pool: dict) -> tuple[RoundResult, dict]:
        """Round `r` on the window `problem_ids` (the selection from `step` and `hard_pool`), or its
        result when a resumed run already finished it -> (its `RoundResult`, `{key: Seq}` of its
        new rollouts). Raises RoundFailed on every rank when the server failed it. Collective."""
        if not self.run.round_result(r).is_file():
            times = stage_times()
            start, times["export"] = self.probe.start(r, problem_ids, step, hard_pool)
            self.transfer(r, start, times)
            self.coordination.together(r, lambda: self.stages.run_round(start, times))
        return self.read_result(r)

    # -- the halves an overlapped round (overlap.py) calls separately ---------------------------
    def begin(self, r: int, problem_ids: list, step: int, hard_pool: dict) -> tuple[RoundStart, dict]:
        """The window-boundary half of round `r`: export, probe, selection, and, on rank 0, its
        start record (RUN/rounds/start_R.json: what the rest of the round needs, so that a resumed
        run can finish it without the weights it started from) and the server's refresh to the
        export -> (the `RoundStart`, {"export": s, "refresh": s}). Raises RoundFailed when the
        server cannot be refreshed. Collective."""
        start, export_s = self.probe.start(r, problem_ids, step, hard_pool)
        t0 = time.time()
        if rank0():
            write_records(self.run.round_start(r), [start])
        self.refresh_together(r, start)
        return start, {"export": export_s, "refresh": time.time() - t0}

    def refresh_together(self, r: int, start: RoundStart | None) -> None:
        """Every rank: make the server serve round `r`'s weights (`start` on rank 0, None
        elsewhere): by transfer from the current weights, or rank 0's reload of the export.
        Raises RoundFailed on every rank when the server cannot be refreshed. Collective."""
        if self.probe.transfer:
            self.transfer(r, start, stage_times())
        else:
            self.coordination.together(r, lambda: self.refresh_for(start))

    def transfer(self, r: int, start: RoundStart | None, times: dict) -> None:
        """`weight_sync = "transfer"`: stream the current weights into the server and prove them
        with `start`'s probe (rank 0's part: `stages.begin_transfer` / `end_transfer`). Done at
        the window boundary by every rank before the next step, so the weights cannot move during
        it. Nothing with `weight_sync = "disk"`. Raises RoundFailed on every rank. Collective."""
        if not self.probe.transfer:
            return
        t0 = time.time()
        box: dict = {}
        self.coordination.together(r, lambda: box.update(sender=self.stages.begin_transfer(start)))
        box["stats"] = self._push(box.get("sender"))
        self.coordination.together(r, lambda: self.stages.end_transfer(start, box["stats"]))
        times["refresh"] += time.time() - t0

    def _push(self, sender) -> dict:
        """The policy into the server by `rollout.transfer.stream_policy`: `sender` (rank 0's
        `WeightSender`, None elsewhere) receives the buckets. -> the stream's stats. Collective."""
        from megatron_rasft.rollout.transfer import stream_policy

        p = self.probe
        return stream_policy(p.models.policy, p.model_cfg, p.groups, p.bucket_mib,
                             sink=sender.send if sender is not None else None)

    def refresh_for(self, start: RoundStart) -> None:
        """Rank 0: make the server serve the export of a started round (no server is needed when
        the selection left the window without rollouts)."""
        if start.rollout:
            self.stages.serve(start, stage_times())

    def finish(self, start: RoundStart) -> None:
        """Rank 0: the rest of a started round (generation, verification, weighting, the round's
        records); its own thread may run it. Raises what the stages raise."""
        self.stages.run_round(start, stage_times())

    def read_start(self, r: int) -> RoundStart:
        """Round `r`'s start record. Raises `StaleRunDir` for one of an older format."""
        return _read_one(self.run.round_start(r), RoundStart)

    def read_result(self, r: int) -> tuple[RoundResult, dict]:
        """Round `r`'s result and `{key: Seq}` of its rollouts, from its finished records. Raises
        `StaleRunDir` for a result of an older format."""
        result = _read_one(self.run.round_result(r), RoundResult)
        seqs = {ts.key: to_seq(ts) for ts in read_records(self.run.train_seqs(r), TrainSequence)}
        if len(self.summaries) <= r:
            self.summaries.append(result.summary)
        return result, seqs

    def close(self) -> None:
        self.stages.close()

    def export_final(self) -> None:
        """With `weight_sync = "transfer"`, RUN/hf/policy holds only the server's start-up weights
        (the rounds stream theirs): at the end of a run it is rewritten with the final policy, so the
        run leaves its latest weights in HF form with either path. Collective."""
        if self.probe.transfer:
            out = self.probe.export()
            if rank0():
                print(f"[round] final policy exported to {out}", flush=True)


def _read_one(path, cls):
    """The one record of `path` (written whole by `write_records`, so it ends with a newline). A
    record of an older format (a round result with `rollout_items`; a start record that is a bare
    JSON object without a newline) is refused as `StaleRunDir`; other errors propagate."""
    try:
        records = list(read_records(path, cls)) if path.read_bytes().endswith(b"\n") else []
        if len(records) == 1:
            return records[0]
        problem = "not one record of this version"
    except RecordError as e:
        if "rollout_items" not in str(e) and "schema_version must be" not in str(e):
            raise
        problem = str(e)
    raise StaleRunDir(f"{path}: written by an older version ({problem}); this version cannot continue this run "
                      f"directory: start the run in a new train.run_dir")
