"""The training stream: what fills the loop's queue, window by window, beside the deterministic
order of `state.py`.

For each new window of problems (when the queue cannot fill the next global batch): the window's
rollout round (`rounds/`, RASFT or GRPO with `rollout.batches_per_round > 0`), under GRPO the
π_old pass, then the reference pass that scores, under the frozen reference, every sequence the
window brings that has no cached log-probs yet (cached in RUN/ref_logp/), then the window's groups
of `QueueItem`s join the queue (under GRPO: the round's trained groups, rollouts only). `take` pops
one global batch and builds this data-parallel rank's share of it as training sequences, each with
the weight its queue item carries.

π_old (GRPO, docs/training.md "GRPO"): at the round boundary, before any optimizer step on the
round's rollouts, the trainer scores them with its own forward pass of the current policy (the one
just exported and served) and stores the result in RUN/old_logp/round_RRR.pt; every step on those
rollouts reads it from there, so a run resumed after a kill uses the same π_old.
"""
from __future__ import annotations

import time
from dataclasses import replace

from megatron_rasft.engine.refpass import RefCache, score
from megatron_rasft.engine.step import sync_params
from megatron_rasft.model.provider import unwrap
from megatron_rasft.rounds.coordination import RoundFailed
from megatron_rasft.rundir import RunDir, is_expert_key
from megatron_rasft.train.state import LoopState, expert_items, grpo_window_groups, next_window_ids, window_groups


class TrainingStream:
    """Windows, rounds and the reference pass for one run. `run`: the `RunDir`; `groups`: the run's
    `ParallelGroups`. `times` accumulates seconds per stage (export, refresh, rollout, verify, reference, train:
    the loop adds the last). Collective: every rank calls `fill` and `take` in the same order."""

    def __init__(self, cfg, run: RunDir, data, models, groups, state: LoopState, *, ref_cache: RefCache,
                 old_cache: RefCache):
        sched = cfg.train.schedule
        self.cfg, self.data, self.models, self.groups = cfg, data, models, groups
        self.batch_groups = sched.global_batch_size
        self.window_size = max(cfg.rollout.batches_per_round, 1) * sched.global_batch_size
        self.problem_ids = sorted(data.prompt_ids)
        # round_wait: seconds the trainer's ranks waited for rank 0's part of the rounds (the whole
        # of it when rounds are synchronous, what was not hidden when they overlap).
        self.times = {"export": 0.0, "refresh": 0.0, "rollout": 0.0, "verify": 0.0, "reference": 0.0, "train": 0.0,
                      "round_wait": 0.0}
        self.grpo = cfg.loss.method == "grpo"
        self._empty_rounds = 0  # consecutive GRPO rounds that gave nothing to train (dynamic sampling)
        if self.grpo:
            self.times["old_logp"] = 0.0
        # Reference log-probs: every sequence is scored once, when its window (or round) arrives.
        # `ref_cache`, `old_cache`: RUN/ref_logp and RUN/old_logp, opened (and their temperature checked)
        # by the loop before any weights load.
        self.ref_cache = ref_cache
        self.ref_logp: dict = self.ref_cache.load_all() if cfg.needs_ref_logp else {}
        # GRPO's π_old log-probs of every round's rollouts, scored at the round boundary.
        self.old_cache = old_cache
        self.old_logp: dict = self.old_cache.load_all() if self.grpo else {}
        self.rounds = None
        if cfg.rollout.batches_per_round > 0:  # RunConfig refuses it for the methods without rounds
            from megatron_rasft.rounds.round import Rounds

            self.rounds = Rounds.build(cfg, run, data, models, groups)
        # Rollout Seqs still queued (a resumed run's, read back from their rounds' records).
        self.rollouts = {} if self.rounds is None else self.rounds.restore(state.rounds, state.queue)
        self.overlap = None
        if self.rounds is not None and cfg.rollout.overlap:
            from megatron_rasft.rounds.overlap import OverlappedRounds

            self.overlap = OverlappedRounds(self.rounds)
            # A round that was in the background when the run stopped.
            self.overlap.resume(state.window, in_flight=bool(state.ahead))

    @property
    def round_summaries(self) -> list:
        return [] if self.rounds is None else self.rounds.summaries

    def fill(self, state: LoopState) -> None:
        """Add windows to `state.queue` until it holds a global batch of groups. Raises
        `RoundFailed` (on every rank) with `state` rewound to before the failed window."""
        while len(state.queue) < self.batch_groups:
            # A window exports and scores the policy: with overlap_param_gather, finish the last
            # step's parameter all-gather first (a no-op otherwise).
            sync_params(self.models.policy)
            stream_pos = (state.epoch, state.cursor)
            try:
                ids, result, new, ahead = self._next_window(state)
            except RoundFailed:
                # The state as before this window, so that a checkpoint of it makes --resume
                # start the window (and continue its round from its records) again.
                state.epoch, state.cursor = stream_pos
                raise
            items = expert_items(ids)
            if result is not None:
                items = result.items
                state.hard_pool = dict(result.hard_pool)
                for k, v in result.stage_times.items():
                    self.times[k] += v
                self.times["round_wait"] = self.rounds.wait_s
                self.rollouts.update(new)
            if self.grpo:
                self._old_logp_pass(state.window, new)
            if self.cfg.needs_ref_logp:  # grpo's items hold no demonstration: its rollouts only
                self._reference_pass(state.window, items, new)
            if self.grpo:
                self._empty_rounds = 0 if items else self._empty_rounds + 1
                if self._empty_rounds * self.window_size >= len(self.problem_ids):
                    raise RuntimeError(f"loss.method = 'grpo': the last {self._empty_rounds} rounds (every problem "
                                       f"once) gave no group to train: all rewards of each group were equal and "
                                       f"grpo.filter_zero_variance is on (see RUN/rounds/)")
                state.queue += grpo_window_groups(state.window, items, self.cfg.train.seed)
            else:
                state.queue += window_groups(state.window, ids, items, self.cfg.train.seed)
            state.window += 1
            state.ahead = ahead

    def _next_window(self, state: LoopState) -> tuple:
        """The next window's problem ids, its round's (RoundResult, {key: Seq}) (None, {} without
        rounds), and the problem ids of the window whose round now runs in the background ([]
        unless rounds overlap). Collective."""
        seed = self.cfg.train.seed
        # An overlapped round's window was drawn at the previous boundary.
        ids = list(state.ahead) or next_window_ids(state, self.problem_ids, self.window_size, seed)
        if self.rounds is None:
            return ids, None, {}, []
        if self.overlap is None or not state.ahead:  # synchronous (also an overlapped run's first window)
            result, new = self.rounds.run_round(state.window, ids, state.step, state.hard_pool)
        else:
            result, new = self.overlap.result(state.window)
        if self.overlap is None:
            return ids, result, new, []
        # Start the next window's round now, unless the run ends before that window: the steps
        # before the next boundary are the whole global batches the queue will then hold: one group
        # per demonstration, the window's problems' and the probes' (overlap is RASFT only).
        n_groups = sum(is_expert_key(it.key) for it in result.items)
        if state.step + (len(state.queue) + n_groups) // self.batch_groups >= self.cfg.train.schedule.train_iters:
            return ids, result, new, []
        ahead = next_window_ids(state, self.problem_ids, self.window_size, seed)
        for k, v in self.overlap.start(state.window + 1, ahead, state.step, result.hard_pool).items():
            self.times[k] += v
        return ids, result, new, ahead

    def take(self, state: LoopState) -> tuple[list, list]:
        """Pop the next global batch of groups -> (its `QueueItem`s, this DP rank's share of them
        as `Seq`s carrying their weight and reference log-probs)."""
        batch, state.queue = state.queue[:self.batch_groups], state.queue[self.batch_groups:]
        items = [it for g in batch for it in g]
        seqs = [self._seq(it) for it in items[self.groups.dp_rank::self.groups.dp_size]]
        for it in items:
            self.rollouts.pop(it.key, None)
        return items, seqs

    def close(self) -> None:
        if self.overlap is not None:
            self.overlap.close()
        if self.rounds is not None:
            self.rounds.close()

    def _seq(self, item):
        """The `Seq` of a queue item: its tokens (a demonstration, or a round's rollout) with the
        item's weight and its cached reference and π_old log-probs."""
        key = item.key
        base = self.data.experts.get(key) or self.rollouts[key]
        return replace(base, weight=item.weight, ref_logp=self.ref_logp.get(key), old_logp=self.old_logp.get(key))

    def _old_logp_pass(self, r: int, new: dict) -> None:
        """π_old of round `r`'s rollouts: scored (collectively) by the current policy, the one the
        round exported and the server sampled from, before any step trains on them; read back from
        RUN/old_logp/ when a resumed run already scored them."""
        cached = self.old_cache.load(RunDir.old_logp_group(r))
        if cached is None and new:  # every rank holds the same `new` (read from the round's records)
            t0 = time.time()
            cfg = self.cfg
            cached = score(unwrap(self.models.policy), list(new.values()), self.groups,
                           micro_batch_size=cfg.train.schedule.micro_batch_size, seq_length=cfg.model.seq_length,
                           pad_id=self.data.pad_id, vocab_size=cfg.model.vocab_size,
                           temperature=cfg.policy_temperature)
            self.old_cache.save(RunDir.old_logp_group(r), cached)
            self.times["old_logp"] += time.time() - t0
        self.old_logp.update(cached or {})

    def _reference_pass(self, window: int, items: list, new: dict) -> None:
        """Score (collectively) the window's sequences that have no reference log-probs yet: the
        demonstrations among its `items`, in their order, then the round's `new` rollouts."""
        todo = [self.data.experts[it.key] for it in items if is_expert_key(it.key) and it.key not in self.ref_logp]
        todo += [s for k, s in new.items() if k not in self.ref_logp]
        if not todo:
            return
        t0 = time.time()
        cfg = self.cfg
        with self.models.reference_on_device() as reference:  # model.reference_placement
            scores = score(reference, list({s.key: s for s in todo}.values()), self.groups,
                           micro_batch_size=cfg.train.schedule.micro_batch_size, seq_length=cfg.model.seq_length,
                           pad_id=self.data.pad_id, vocab_size=cfg.model.vocab_size,
                           temperature=cfg.policy_temperature)
        self.ref_cache.save(RunDir.ref_logp_group(window), scores)
        self.ref_logp.update(scores)
        self.times["reference"] += time.time() - t0

