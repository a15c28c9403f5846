"""One rollout round per window of problems: export → refresh the server → roll out → verify →
weigh → the correct rollouts become training sequences.

Every stage reads and writes the run directory's records (`rollouts/`, `verdicts/`, `weights/`,
see `rundir.py`), each stage resumable by itself; the round's `RoundResult` record
(`rounds/round_R.json`) marks a finished round and holds what the trainer needs from it, and
`train_seqs/round_R.jsonl` holds the rollouts' `TrainSequence`s. A resumed run never redoes a
finished round, and a round killed half-way picks up where its stages stopped.
Rank 0 drives the server and the stages; the export and the reference pass are collective.
A server that dies mid-round is restarted (trainer-started) or waited for (external, at most
`rollout.server.startup_timeout_s`); only the prompts it lost are resubmitted, after the server has been
made to serve the round's weights again. If it cannot come back, `RoundFailed` is raised on every
rank and the loop saves a checkpoint from which `--resume` redoes nothing already written.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

from megatron_rasft.data.batching import Seq
from megatron_rasft.model.provider import unwrap
from megatron_rasft.parallel.groups import barrier, rank0
from megatron_rasft.parallel.wait import rank0_done
from megatron_rasft.records import ProblemVerdicts, RoundResult, TrainSequence, read_records, write_records
from megatron_rasft.rundir import RunDir, expert_key, parse_key, rollout_key
from megatron_rasft.train.grpo_round import grpo_sequences, to_seq


def _stage_times() -> dict:
    """Seconds per stage of one round (its `RoundResult.stage_times`)."""
    return {"export": 0.0, "refresh": 0.0, "rollout": 0.0, "verify": 0.0}


class RoundFailed(RuntimeError):
    """A round could not finish (its rollout server died and did not come back, or would not serve
    the trainer's weights). Raised on every rank; the loop then saves a checkpoint to resume from."""


# What a dead or unusable server raises inside a round; anything else is a bug and propagates.
def _server_errors() -> tuple:
    from megatron_rasft.rollout.client import RolloutError
    from megatron_rasft.rollout.refresh import RefreshError
    from megatron_rasft.rollout.server import ServerError

    return ServerError, RolloutError, RefreshError


class Rounds:
    """The rollout rounds of one run. `run`: the `RunDir`; `groups`: the run's `ParallelGroups`."""

    def __init__(self, cfg, run: RunDir, data, models, groups):
        if data.tokenizer is None:
            raise ValueError("rollout rounds need real problems: set train.data.path and train.data.tokenizer")
        self.cfg, self.run, self.data, self.models, self.groups = cfg, run, data, models, groups
        self.server = self.client = None
        self.served_round = None  # the round whose export the server was last refreshed to
        self.summaries: list = []
        self.wait_s = 0.0  # seconds the trainer's ranks were held by rank 0's part of the rounds
        if rank0():
            self._write_problems()
        barrier()

    def _write_problems(self) -> None:
        """RUN/problems.jsonl: the problems with their prompts rendered as the model sees them."""
        path = self.run.problems
        if path.is_file():
            return
        tok, tmpl = self.data.tokenizer, self.cfg.train.data.prompt_template
        from megatron_rasft.data.tokenize import render_prompt

        recs = [type(p)(p.id, render_prompt(tok, p.prompt, tmpl), p.response, p.answer, p.tests, p.meta)
                for p in self.data.problems.values()]
        write_records(path, recs)

    # -- resume --------------------------------------------------------------------------------
    def restore(self, state) -> dict:
        """Rollout sequences still in the queue of a resumed run (`{key: Seq}`); also the round
        summaries."""
        self.summaries = list(state.rounds)
        wanted = {key for group in state.queue for key, _ in group if not parse_key(key).is_expert}
        pool: dict = {}
        for path in self.run.all_train_seqs() if wanted else []:
            for ts in read_records(path, TrainSequence):
                if ts.key in wanted:
                    pool[ts.key] = to_seq(ts)
        return pool

    # -- one round -----------------------------------------------------------------------------
    def run_round(self, r: int, problem_ids: list, state) -> tuple[RoundResult, dict]:
        """Round `r` on the window `problem_ids` (or its result, when a resumed run already
        finished it) -> (its `RoundResult`, `{key: Seq}` of its new rollouts). Collective."""
        if not self.run.round_result(r).is_file():
            times = _stage_times()
            t0 = time.time()
            hf_dir = self._export()
            times["export"] += time.time() - t0
            probe = self._probe_expectation()
            sel = self._select(r, problem_ids, state)
            failure = None
            t0 = time.time()
            if rank0():
                failure = self.on_rank0(r, lambda: self._stages(r, sel, hf_dir, probe, times))
            self.wait_for_rank0(r, failure, t0)
        return self.read_result(r)

    # -- the parts an overlapped round (overlap.py) calls separately ------------------------------
    def begin(self, r: int, problem_ids: list, state) -> dict:
        """The window-boundary part of round `r`: export, the probe's expected log-probs, the
        selection (from `state.step`, `state.hard_pool`), and, on rank 0, the start record
        (`RUN/rounds/start_R.json`: what the rest of the round needs, so that a resumed run can
        finish it without the weights it started from) and the refresh of the server to the
        export. -> the start record (with `export_s` and `refresh_s`: the seconds each part took).
        Raises RoundFailed when the server cannot be refreshed. Collective."""
        t0 = time.time()
        hf_dir = self._export()
        t_export = time.time()
        probe = self._probe_expectation()
        sel = self._select(r, problem_ids, state)
        start = {"round": r, "problem_ids": list(problem_ids), "hf_dir": str(hf_dir), "probe": list(probe),
                 "selection": sel, "export_s": t_export - t0, "refresh_s": 0.0}
        failure = None
        t1 = time.time()
        if rank0():
            path = self.run.round_start(r)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(start))
            tmp.replace(path)
            failure = self.on_rank0(r, lambda: self.refresh_for(start))
        self.wait_for_rank0(r, failure, t1)
        start["refresh_s"] = time.time() - t1  # the server's refresh, as synchronous rounds count it
        return start

    def refresh_for(self, start: dict) -> None:
        """Rank 0: make the server serve the export of a started round (no server is needed when
        the selection left the window without rollouts)."""
        if start["selection"]["rollout"]:
            self._ensure_server(Path(start["hf_dir"]), start["probe"], {"refresh": 0.0}, start["round"])

    def finish(self, start: dict) -> None:
        """Rank 0: the rest of a started round (generation, verification, weighting, the round's
        records); its own thread may run it. Raises what the stages raise."""
        times = _stage_times()
        self._stages(start["round"], start["selection"], Path(start["hf_dir"]), start["probe"], times)

    def read_result(self, r: int) -> tuple[RoundResult, dict]:
        """Round `r`'s result and `{key: Seq}` of its rollouts, from its finished records."""
        (result,) = read_records(self.run.round_result(r), RoundResult)
        seqs = {ts.key: to_seq(ts) for ts in read_records(self.run.train_seqs(r), TrainSequence)}
        if len(self.summaries) <= r:
            self.summaries.append(result.summary)
        return result, seqs

    @staticmethod
    def on_rank0(r: int, work) -> str | None:
        """Run `work()` (rank 0's part of round `r`) -> None, or the failure message when the
        rollout server failed it (any other error propagates)."""
        try:
            work()
        except _server_errors() as e:
            failure = f"round {r} stopped: {type(e).__name__}: {e}"
            print(f"[round {r}] {failure}", flush=True)
            return failure
        return None

    def wait_for_rank0(self, r: int, failure: str | None, since: float) -> None:
        """Every rank: wait without a deadline (a round outlasts any collective timeout) until
        rank 0 is done with round `r`; raises RoundFailed on every rank when it failed."""
        failed = rank0_done(failure, what=f"round {r}")
        self.wait_s += time.time() - since
        if failed:
            raise RoundFailed(failure or f"round {r} failed on rank 0 (see its output)")

    def _export(self):
        from megatron_rasft.convert.export import export_to_hf

        out = self.run.policy_export
        export_to_hf(unwrap(self.models.policy), out, self.cfg.model, self.groups,
                     hf_config=self.models.hf_config, tokenizer_dir=self.cfg.train.data.tokenizer)
        return out

    def _probe_expectation(self):
        """(probe token ids, their log-probs under the policy just exported), by our own forward
        pass: the refreshed server must reproduce them (proof that the new weights are live)."""
        from megatron_rasft.engine.refpass import score

        pid = sorted(self.data.prompt_ids)[0]
        ids = list(self.data.prompt_ids[pid])[: self.cfg.model.seq_length]
        got = score(unwrap(self.models.policy), [Seq("probe", ids, 0)], self.groups, micro_batch_size=1,
                    seq_length=self.cfg.model.seq_length, pad_id=self.data.pad_id,
                    vocab_size=self.cfg.model.vocab_size)
        return ids, got["probe"]

    def _score_nll(self, chunks, ids: list) -> dict:
        """Mean response NLL of the expert demonstrations of `ids` under `chunks` (collective)."""
        from megatron_rasft.engine.refpass import score
        from megatron_rasft.methods.selection import mean_nll

        seqs = [self.data.experts[expert_key(i)] for i in ids]
        got = score(chunks, seqs, self.groups, micro_batch_size=self.cfg.train.schedule.micro_batch_size,
                    seq_length=self.cfg.model.seq_length, pad_id=self.data.pad_id,
                    vocab_size=self.cfg.model.vocab_size)
        return {i: mean_nll(got[s.key], s.prompt_len) for i, s in zip(ids, seqs)}

    def _band(self):
        """NLL thresholds from the initial model (the frozen reference), computed once per run."""
        from megatron_rasft.methods.selection import Band

        path = self.run.nll_band
        if path.is_file():
            return Band(**json.loads(path.read_text()))
        initial = self.models.reference or unwrap(self.models.policy)  # no reference: before any step
        ids = sorted(self.data.prompt_ids)
        ids = random.Random(self.cfg.train.seed).sample(ids, min(len(ids), 1000))  # as calibrated (ref)
        band = Band.calibrate(list(self._score_nll(initial, ids).values()))
        if rank0():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(band)))
        barrier()
        return band

    def _select(self, r: int, problem_ids: list, state) -> dict:
        if self.cfg.rollout.selection.rule == "all":
            return {"rollout": list(problem_ids), "probes_retrain": [], "probes_rollout": [],
                    "hard_pool": dict(state.hard_pool)}
        from megatron_rasft.methods.selection import select

        band = self._band()
        pool = dict(state.hard_pool)
        sel = select(problem_ids, lambda ids: self._score_nll(unwrap(self.models.policy), ids), band,
                     state.step, self.cfg.train.schedule.train_iters, pool, seed=f"{self.cfg.train.seed}/select/{r}",
                     rollout_fraction=self.cfg.rollout.selection.rollout_fraction,
                     probe_fraction=self.cfg.rollout.selection.probe_fraction)
        return {**sel, "hard_pool": pool}

    def _ensure_server(self, hf_dir: Path, probe, times: dict, r: int) -> None:
        from megatron_rasft.rollout.client import RolloutClient
        from megatron_rasft.rollout.refresh import refresh_weights
        from megatron_rasft.rollout.server import RolloutServer

        sc = self.cfg.rollout.server
        if self.served_round == r:  # refreshed at the window boundary (an overlapped round)
            return
        t0 = time.time()
        if self.server is None:
            if sc.url:
                self.server = RolloutServer.attach(sc.url, sc)
            else:
                self.server = RolloutServer(hf_dir, sc, log_file=self.run.server_log).start()
            self.client = RolloutClient(self.server, sc)

        def refresh():
            res = refresh_weights(self.server, hf_dir, self.client, probe=probe[0], expected=probe[1])
            print(f"[round] server serves the step's weights ({res.method}, {res.seconds:.1f}s, "
                  f"probe |Δ| {res.max_abs_diff_expected:.2e})", flush=True)

        refresh()
        self.served_round = r
        # A server that died mid-round comes back on whatever it loads at start-up (an external one
        # on its own checkpoint): it must serve this round's weights again before any resubmission.
        self.client.on_recover = refresh
        times["refresh"] += time.time() - t0

    def _sample_verify_weigh(self, r: int, problem_ids: list, hf_dir: Path, probe, times: dict):
        from megatron_rasft.records import Rollout
        from megatron_rasft.rollout.stage import rollout_round
        from megatron_rasft.verify.stage import verify_round
        from megatron_rasft.methods.weighting import weight_records

        rc = self.cfg.rollout
        self._ensure_server(hf_dir, probe, times, r)
        t0 = time.time()
        # The round's seed and stop tokens are the rollout stage's rules (the `rollout` command's too).
        stats = rollout_round(self.run.root, r, self.client.generate, rc.sampling, tokenizer=self.data.tokenizer,
                              problem_ids=problem_ids)
        print(f"[round {r}] rollouts of {stats['problems']} problems generated, {stats['skipped']} kept from "
              f"an earlier attempt ({self.client.stats['restarts']} server restarts so far)", flush=True)
        times["rollout"] += time.time() - t0
        t0 = time.time()
        verify_round(self.run.root, r, verifier=rc.verifier.kind, workers=rc.verifier.workers,
                     timeout_s=rc.verifier.timeout_s, progress=True)
        times["verify"] += time.time() - t0
        weights = []
        for pv in self._verdicts_in_order(r, problem_ids):
            weights += weight_records(pv, self.cfg.weighting.scheme, self.cfg.weighting)
        if not self.cfg.weighting.add_rollouts:
            weights = [w for w in weights if w.kind == "expert"]
        rollouts = {(x.problem_id, x.sample_index): x
                    for x in read_records(self.run.rollouts(r), Rollout)}
        return weights, rollouts

    def _verdicts_in_order(self, r: int, problem_ids: list) -> list:
        """The round's `ProblemVerdicts` of `problem_ids`, in that order. The verdict file is in the
        order generations finished (it varies with server batching and timing); what the trainer
        builds from it must not, or two runs of one seed train their rollouts in different orders."""
        order = {pid: i for i, pid in enumerate(problem_ids)}
        pvs = [pv for pv in read_records(self.run.verdicts(r), ProblemVerdicts) if pv.problem_id in order]
        return sorted(pvs, key=lambda pv: order[pv.problem_id])

    def _stages(self, r: int, sel: dict, hf_dir: Path, probe, times: dict) -> None:
        from megatron_rasft.methods.weighting import round_summary

        problem_ids = sel["rollout"]
        weights, rollouts = [], {}
        if problem_ids:  # the `released` selection can leave a window without rollouts
            weights, rollouts = self._sample_verify_weigh(r, problem_ids, hf_dir, probe, times)
        write_records(self.run.weights(r), weights)
        if self.cfg.loss.method == "grpo":
            return self._grpo_result(r, problem_ids, weights, rollouts, times)
        seqs, items = [], []
        max_len = self.cfg.model.seq_length + 1
        for w in weights:
            if w.kind != "rollout":
                continue
            ro = rollouts[(w.problem_id, w.sample_index)]
            ids = list(ro.token_ids)
            if ro.finish_reason == "stop" and (not ids or ids[-1] != self.data.eos_id):
                ids.append(self.data.eos_id)
            prompt = list(self.data.prompt_ids[w.problem_id])
            tokens = (prompt + ids)[:max_len]
            if len(tokens) <= len(prompt):
                continue
            key = rollout_key(r, w.problem_id, w.sample_index)
            seqs.append(TrainSequence(key, tokens, len(prompt)))
            items.append([key, w.weight])
        expert_weight = {w.problem_id: w.weight for w in weights if w.kind == "expert"}
        # Probed hard-pool problems come from earlier windows: their demonstrations are inserted
        # again (A = 1 when they became easy, their new A_E when rolled out).
        items += [[expert_key(pid), 1.0] for pid in sel["probes_retrain"]]
        items += [[expert_key(pid), expert_weight[pid]] for pid in sel["probes_rollout"]]
        solved = {w.problem_id for w in weights if w.kind == "expert" and w.k > 0}
        hard_pool = {pid: n for pid, n in sel["hard_pool"].items() if pid not in solved}
        summary = {"round": r, **round_summary(weights),
                   "rolled_out": len(problem_ids), "probes": len(sel["probes_retrain"]) + len(sel["probes_rollout"]),
                   "hard_pool": len(hard_pool)}
        write_records(self.run.train_seqs(r), seqs)
        # Written last (atomically): its presence marks the round finished.
        result = RoundResult(r, expert_weight, items, hard_pool, summary, stage_times=dict(times))
        write_records(self.run.round_result(r), [result])
        hist = " ".join(str(h) for h in summary["p_hist"])
        print(f"[round {r}] {summary['problems']} problems, {summary['rollouts_added']} rollouts added, "
              f"mean A_E {summary['mean_expert_weight']:.3f}, k=0 {summary['frac_k0']:.0%}, "
              f"k=K {summary['frac_kK']:.0%}, p-hist [{hist}], ESS {summary['ess']:.1f}", flush=True)

    def _grpo_result(self, r: int, problem_ids: list, weights: list, rollouts: dict, times: dict) -> None:
        """Under grpo: every rollout of the trained groups, with its advantage (`grpo_round.py`)."""
        from megatron_rasft.records import Verdict
        from megatron_rasft.methods.weighting import round_summary

        verdicts = [Verdict(pv.problem_id, r, x["sample_index"], bool(x["correct"]), x["reason"])
                    for pv in (self._verdicts_in_order(r, problem_ids) if problem_ids else [])
                    for x in sorted(pv.rollouts, key=lambda x: x["sample_index"])]
        seqs, items, stats = grpo_sequences(r, problem_ids, verdicts, rollouts, self.data.prompt_ids,
                                            self.data.eos_id, self.cfg.model.seq_length + 1, self.cfg.grpo)
        summary = {"round": r, **round_summary(weights), "rolled_out": len(problem_ids), "probes": 0,
                   "hard_pool": 0, **{f"grpo_{k}": v for k, v in stats.items()}}
        write_records(self.run.train_seqs(r), seqs)
        write_records(self.run.round_result(r), [RoundResult(r, {}, items, {}, summary, stage_times=dict(times))])
        print(f"[round {r}] {stats['groups']} groups, mean reward {stats['mean_reward']:.3f}, zero-variance "
              f"{stats['zero_variance_frac']:.0%}, {stats['groups_trained']} groups ({stats['sequences']} rollouts) "
              f"trained", flush=True)

    def close(self) -> None:
        if self.server is not None and self.server.managed:
            self.server.stop()
