"""GRPO in the rollout rounds (docs/training.md, "GRPO"): what a round hands the trainer under
`loss.method = "grpo"`, and π_old, the log-probs of the round's rollouts under the policy that
sampled them.

A round samples K rollouts of every problem of its window and verifies them; the reward is the
verdict (1 correct, 0 not) and each problem's K rollouts form a group with the group-relative
advantages of `advantages.py`. Every rollout of a trained group becomes a training sequence, correct
or not, with weight 1 and its advantage A_j; expert demonstrations are not trained. With
`grpo.filter_zero_variance` (DAPO's dynamic sampling) the groups whose rewards are all equal are
dropped; the stream then draws the next window (another round) when the queue cannot fill a global
batch, so a step still trains `global_batch_size` groups.

π_old: at the round boundary, before any optimizer step on the round's rollouts, the trainer scores
them with its own forward pass of the current policy (the one just exported and served) and stores
the result in RUN/old_logp/round_RRR.pt; every step on those rollouts reads it from there, so a run
resumed after a kill uses the same π_old.
"""
from __future__ import annotations

import math
import random

from megatron_rasft.data.batching import Seq
from megatron_rasft.methods.advantages import group_advantages, verdict_rewards
from megatron_rasft.records import TrainSequence
from megatron_rasft.rundir import parse_key, rollout_key


def grpo_sequences(r: int, problem_ids: list, verdicts: list, rollouts: dict, prompt_ids: dict, eos_id: int,
                   max_len: int, gcfg) -> tuple[list, list, dict]:
    """The round's GRPO training sequences -> `(TrainSequences, [key, 1.0] items, stats)`.

    verdicts: the round's `Verdict`s (any problems; only `problem_ids` are used); rollouts:
    `{(problem id, sample index): Rollout}`; prompt_ids: problem id -> prompt token ids; max_len:
    model.seq_length + 1 (longer sequences are cut). A rollout that stopped gets EOS appended (not
    sampled: its rollout log-prob is unknown). stats: `groups`, `groups_trained`, `zero_variance_frac`,
    `mean_reward`, `sequences`.
    """
    wanted = set(problem_ids)
    rewards = verdict_rewards(v for v in verdicts if v.problem_id in wanted)
    samples = {}  # problem id -> its sample indices, in the order of its rewards
    for v in verdicts:
        if v.problem_id in wanted:
            samples.setdefault(v.problem_id, []).append(v.sample_index)
    adv = group_advantages(rewards, gcfg)
    seqs, items = [], []
    for pid in adv.trained_groups(gcfg):
        for j, a in zip(sorted(samples[pid]), adv.advantages[pid]):
            ro = rollouts[(pid, j)]
            ids = list(ro.token_ids)
            if ro.finish_reason == "stop" and (not ids or ids[-1] != eos_id):
                ids.append(eos_id)
            prompt = list(prompt_ids[pid])
            tokens = (prompt + ids)[:max_len]
            if len(tokens) <= len(prompt):
                continue
            key = rollout_key(r, pid, j)
            lps = list(ro.logprobs or [])[:len(tokens) - len(prompt)] if ro.logprobs is not None else None
            seqs.append(TrainSequence(key, tokens, len(prompt), advantage=a, rollout_logprobs=lps))
            items.append([key, 1.0])
    all_r = [x for g in rewards.values() for x in g]
    stats = {"groups": len(rewards), "groups_trained": len(adv.trained_groups(gcfg)),
             "zero_variance_frac": adv.zero_variance_frac,
             "mean_reward": sum(all_r) / len(all_r) if all_r else 0.0, "sequences": len(seqs)}
    return seqs, items, stats


def aligned_rollout_logp(ts: TrainSequence) -> list | None:
    """vLLM's log-probs of `ts` aligned to tokens[1:] (len(tokens) − 1 values): NaN for the prompt
    positions (tokens[1:prompt_len]) and for an appended EOS, the sampled tokens' log-probs between.
    None when the rollout has none."""
    if ts.rollout_logprobs is None:
        return None
    n = len(ts.tokens) - 1
    out = [math.nan] * (ts.prompt_len - 1) + [float(x) for x in ts.rollout_logprobs]
    return (out + [math.nan] * n)[:n]


def to_seq(ts: TrainSequence) -> Seq:
    """The training `Seq` of a round's `TrainSequence`: a GRPO rollout (advantage set) carries its
    advantage and aligned rollout log-probs; old_logp is attached by the stream."""
    if ts.advantage is None:
        return Seq(ts.key, ts.tokens, ts.prompt_len)
    return Seq(ts.key, ts.tokens, ts.prompt_len, advantage=float(ts.advantage),
               rollout_logp=aligned_rollout_logp(ts))


def grpo_window_groups(window: int, items: list, seed: int) -> list[list]:
    """Queue groups of one GRPO round: one group per problem (its trained rollouts, in sample
    order), the problems in a seeded order (as `state.window_groups` orders a window's problems)."""
    groups: dict = {}
    for key, w in items:
        groups.setdefault(parse_key(key).problem_id, []).append([key, float(w)])
    order = sorted(groups)
    random.Random(f"{seed}/window/{window}/grpo").shuffle(order)
    return [groups[pid] for pid in order]
