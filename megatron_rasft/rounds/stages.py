"""Rank 0's stages of a round: serve the round's export → sample → verify → weigh → result.

Every stage reads and writes the run directory's records (`rollouts/`, `verdicts/`, see
`rundir.py`) and is resumable by itself; the round's `train_sequence` records
(`train_seqs/round_R.jsonl`) and, last, its `round_result` (`rounds/round_R.json`: the queue items
with their weights, the one record of the weights the trainer trains with) mark it finished.
The weights are computed again from the verdicts whenever a round is finished, so a round killed
after its verification loses nothing.
"""
from __future__ import annotations

import time

from megatron_rasft.methods.sequences import grpo_sequences, rasft_sequences
from megatron_rasft.methods.weighting import round_summary, weight_records
from megatron_rasft.records import (ProblemVerdicts, Rollout, RoundResult, RoundStart, Verdict, read_records,
                                    write_records)


def stage_times() -> dict:
    """Seconds per stage of one round (its `RoundResult.stage_times`)."""
    return {"export": 0.0, "refresh": 0.0, "rollout": 0.0, "verify": 0.0}


def write_problems(run, data, prompt_template) -> None:
    """RUN/problems.jsonl (once per run): the problems with their prompts rendered as the model
    sees them (`data.tokenize.render_prompt` with the tokenizer of `data`)."""
    from megatron_rasft.data.tokenize import render_prompt

    if run.problems.is_file():
        return
    tok = data.tokenizer
    write_records(run.problems, [type(p)(p.id, render_prompt(tok, p.prompt, prompt_template), p.response, p.answer,
                                         p.tests, p.meta) for p in data.problems.values()])


def verdicts_in_order(run, r: int, problem_ids: list) -> list:
    """Round `r`'s `ProblemVerdicts` of `problem_ids`, in that order. The verdict file is in the
    order generations finished (it varies with server batching and timing); what the trainer
    builds from it must not, or two runs of one seed train their rollouts in different orders."""
    order = {pid: i for i, pid in enumerate(problem_ids)}
    pvs = [pv for pv in read_records(run.verdicts(r), ProblemVerdicts) if pv.problem_id in order]
    return sorted(pvs, key=lambda pv: order[pv.problem_id])


class RoundStages:
    """The server and the stages of a run's rounds, on rank 0.

    run: the `RunDir`; data: the dataset (`tokenizer`, `prompt_ids`, `eos_id`); rollout: the
    `RolloutConfig` (server, sampling, verifier); weighting: the `WeightingConfig`; grpo: the
    `GRPOConfig` when the loss is grpo, else None; max_len: model.seq_length + 1.
    """

    def __init__(self, run, data, rollout, weighting, *, grpo=None, max_len: int):
        self.run, self.data, self.rollout, self.weighting, self.grpo = run, data, rollout, weighting, grpo
        self.max_len = max_len
        self.session = None  # the `rollout.session.RolloutSession`, opened by the first round
        self.served_round = None  # the round whose export the server was last refreshed to

    def serve(self, start: RoundStart, times: dict) -> None:
        """Make the server (started or attached at the first call) serve round `start.round`'s
        export, proven by its probe; nothing when it already does (an overlapped round is served at
        its window boundary). Raises what `RolloutSession.open` / `.serve` raise."""
        if self.served_round == start.round:
            return
        t0 = time.time()
        self._open(start)
        self.session.serve(start.hf_dir, start.probe_ids, start.probe_logp)
        self.served_round = start.round
        times["refresh"] += time.time() - t0

    def _open(self, start: RoundStart) -> None:
        from megatron_rasft.rollout.session import RolloutSession

        if self.session is None:
            sc = self.rollout.server
            self.session = RolloutSession.open(sc.url or start.hf_dir, sc, log_file=self.run.server_log,
                                               label="[round] ")

    def begin_transfer(self, start: RoundStart):
        """`weight_sync = "transfer"`, before the collective stream: the server (started on the
        export `start.hf_dir` at the first call) paused and ready -> the `rollout.transfer.WeightSender`
        the stream feeds. Raises what `RolloutSession.begin_transfer` raises."""
        self._open(start)
        return self.session.begin_transfer(start.probe_ids)

    def end_transfer(self, start: RoundStart, stats: dict) -> None:
        """After the stream: finish the transfer and prove it with the round's probe
        (`RolloutSession.serve`); the round is then served. `stats`: the stream's."""
        self.session.transfer_stream_stats = stats
        self.session.serve(start.hf_dir, start.probe_ids, start.probe_logp)
        self.served_round = start.round

    def run_round(self, start: RoundStart, times: dict) -> None:
        """The stages of the round `start` describes, up to its records (`times` gets their
        seconds). Raises what the server raises (`rollout.session.server_errors`) when it is lost."""
        r, ids = start.round, start.rollout
        verdicts, weights, rollouts = [], [], {}
        if ids:  # the `released` selection can leave a window without rollouts
            self.serve(start, times)
            self._sample_and_verify(r, ids, times)
            verdicts = verdicts_in_order(self.run, r, ids)
            for pv in verdicts:
                weights += weight_records(pv, self.weighting.scheme, self.weighting)
            if not self.weighting.add_rollouts:
                weights = [w for w in weights if w.kind == "expert"]
            rollouts = {(x.problem_id, x.sample_index): x for x in read_records(self.run.rollouts(r), Rollout)}
        if self.grpo is not None:
            self._grpo_result(start, verdicts, weights, rollouts, times)
        else:
            self._rasft_result(start, weights, rollouts, times)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()

    def _sample_and_verify(self, r: int, ids: list, times: dict) -> None:
        from megatron_rasft.rollout.stage import rollout_round
        from megatron_rasft.verify.stage import verify_round

        rc, t0 = self.rollout, time.time()
        # The round's seed and stop tokens are the rollout stage's rules (the `rollout` command's too).
        stats = rollout_round(self.run.root, r, self.session.generate, rc.sampling, tokenizer=self.data.tokenizer,
                              problem_ids=ids)
        print(f"[round {r}] rollouts of {stats['problems']} problems generated, {stats['skipped']} kept from "
              f"an earlier attempt ({self.session.client.stats['restarts']} server restarts so far)", flush=True)
        times["rollout"] += time.time() - t0
        t0 = time.time()
        verify_round(self.run.root, r, verifier=rc.verifier.kind, workers=rc.verifier.workers,
                     timeout_s=rc.verifier.timeout_s, progress=True)
        times["verify"] += time.time() - t0

    def _rasft_result(self, start: RoundStart, weights: list, rollouts: dict, times: dict) -> None:
        """RASFT: the trained rollouts' sequences, the window's items with their weights."""
        r = start.round
        seqs, items = rasft_sequences(r, start.problem_ids, weights, rollouts, self.data.prompt_ids,
                                      self.data.eos_id, self.max_len, start.probes_retrain, start.probes_rollout)
        solved = {w.problem_id for w in weights if w.kind == "expert" and w.k > 0}
        hard_pool = {pid: n for pid, n in start.hard_pool.items() if pid not in solved}
        summary = {"round": r, **round_summary(weights), "rolled_out": len(start.rollout),
                   "probes": len(start.probes_retrain) + len(start.probes_rollout), "hard_pool": len(hard_pool)}
        self._write(RoundResult(r, items, hard_pool, summary, stage_times=dict(times)), seqs)
        hist = " ".join(str(h) for h in summary["p_hist"])
        print(f"[round {r}] {summary['problems']} problems, {summary['rollouts_added']} rollouts added, "
              f"mean A_E {summary['mean_expert_weight']:.3f}, k=0 {summary['frac_k0']:.0%}, "
              f"k=K {summary['frac_kK']:.0%}, p-hist [{hist}], ESS {summary['ess']:.1f}", flush=True)

    def _grpo_result(self, start: RoundStart, verdicts: list, weights: list, rollouts: dict, times: dict) -> None:
        """GRPO: every rollout of the trained groups, with its advantage (`methods/sequences.py`)."""
        r, ids = start.round, start.rollout
        flat = [Verdict(pv.problem_id, r, x["sample_index"], bool(x["correct"]), x["reason"])
                for pv in verdicts for x in sorted(pv.rollouts, key=lambda x: x["sample_index"])]
        seqs, items, stats = grpo_sequences(r, ids, flat, rollouts, self.data.prompt_ids, self.data.eos_id,
                                            self.max_len, self.grpo)
        summary = {"round": r, **round_summary(weights), "rolled_out": len(ids), "probes": 0,
                   "hard_pool": 0, **{f"grpo_{k}": v for k, v in stats.items()}}
        self._write(RoundResult(r, items, {}, summary, stage_times=dict(times)), seqs)
        print(f"[round {r}] {stats['groups']} groups, mean reward {stats['mean_reward']:.3f}, zero-variance "
              f"{stats['zero_variance_frac']:.0%}, {stats['groups_trained']} groups ({stats['sequences']} rollouts) "
              f"trained", flush=True)

    def _write(self, result: RoundResult, seqs: list) -> None:
        write_records(self.run.train_seqs(result.round), seqs)
        # Written last (atomically): its presence marks the round finished.
        write_records(self.run.round_result(result.round), [result])
