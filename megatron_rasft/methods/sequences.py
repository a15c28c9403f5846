"""A round's verdicts and weights → its training sequences and queue items, for RASFT and GRPO.

Both methods turn a rollout into a training sequence the same way (`rollout_tokens`): the prompt's
token ids, the sampled response's, EOS appended when the rollout stopped (not sampled: its rollout
log-prob is unknown), cut to model.seq_length + 1 tokens; a rollout with nothing of its response
left is not trained. They differ in which rollouts train and with which weight:

- RASFT (`rasft_sequences`): the rollouts the weighting scheme gave a non-zero A_s
  (`weighting.weight_records`), and every demonstration of the window with its A_E;
- GRPO (`grpo_sequences`): every rollout of a trained group, correct or not, with weight 1 and its
  group-relative advantage A_j (`methods/advantages.py`) on its `TrainSequence`; demonstrations do not train.

The queue items (`records.QueueItem`) are the one form a sequence's weight takes on its way to the
loss: the round result holds them, the loop's queue holds them, and `to_seq` meets them again with
the tokens when the stream builds a step's `Seq`s.
"""
from __future__ import annotations

import math

from megatron_rasft.data.batching import Seq
from megatron_rasft.methods.advantages import group_advantages, verdict_rewards
from megatron_rasft.records import QueueItem, TrainSequence
from megatron_rasft.rundir import expert_key, rollout_key


def rollout_tokens(rollout, prompt: list, eos_id: int, max_len: int) -> list | None:
    """prompt + the rollout's token ids (+ `eos_id` when it stopped without it), cut to `max_len`
    (model.seq_length + 1) -> the token list, or None when the cut leaves no response token."""
    ids = list(rollout.token_ids)
    if rollout.finish_reason == "stop" and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
    tokens = (list(prompt) + ids)[:max_len]
    return tokens if len(tokens) > len(prompt) else None


def rasft_sequences(r: int, window_ids: list, weights: list, rollouts: dict, prompt_ids: dict, eos_id: int,
                    max_len: int, probes_retrain: list = (), probes_rollout: list = ()) -> tuple[list, list]:
    """Round `r`'s RASFT training sequences and queue items -> `(TrainSequences, QueueItems)`.

    window_ids: the window's problems, in the window's order; weights: the round's `Weight`
    records (its rolled-out problems: the expert, then each rollout with A_s > 0); rollouts:
    `{(problem id, sample index): Rollout}`; prompt_ids: problem id -> prompt token ids; max_len:
    model.seq_length + 1; probes_retrain / probes_rollout: the `released` selection's probed
    problems of earlier windows. Items, in order: each window problem's demonstration (A_E; 1 when
    it was not rolled out) followed by its trained rollouts (A_s); then the re-trained probes'
    demonstrations (A = 1); then the rolled-out probes' (their new A_E), each followed by its
    rollouts. Raises KeyError when a rolled-out probe has no expert weight."""
    seqs, by_problem = [], {}  # problem id -> its trained rollouts' items
    for w in weights:
        if w.kind != "rollout":
            continue
        prompt = prompt_ids[w.problem_id]
        tokens = rollout_tokens(rollouts[(w.problem_id, w.sample_index)], prompt, eos_id, max_len)
        if tokens is None:
            continue
        key = rollout_key(r, w.problem_id, w.sample_index)
        seqs.append(TrainSequence(key, tokens, len(prompt)))
        by_problem.setdefault(w.problem_id, []).append(QueueItem(key, w.weight))
    a_expert = {w.problem_id: w.weight for w in weights if w.kind == "expert"}
    items = []
    for pid in window_ids:
        items += [QueueItem(expert_key(pid), a_expert.get(pid, 1.0)), *by_problem.pop(pid, [])]
    items += [QueueItem(expert_key(pid), 1.0) for pid in probes_retrain]
    for pid in probes_rollout:
        items += [QueueItem(expert_key(pid), a_expert[pid]), *by_problem.pop(pid, [])]
    return seqs, items


def grpo_sequences(r: int, problem_ids: list, verdicts: list, rollouts: dict, prompt_ids: dict, eos_id: int,
                   max_len: int, gcfg) -> tuple[list, list, dict]:
    """Round `r`'s GRPO training sequences -> `(TrainSequences, QueueItems of weight 1, stats)`.

    verdicts: the round's `Verdict`s (any problems; only `problem_ids` are used), each problem's in
    sample order; rollouts, prompt_ids, max_len: as `rasft_sequences`; gcfg: the `GRPOConfig`
    (advantages, `filter_zero_variance`). A sequence carries its advantage A_j and the server's
    log-probs of its sampled response tokens. stats: `groups`, `groups_trained`,
    `zero_variance_frac`, `mean_reward`, `sequences`."""
    wanted = set(problem_ids)
    rewards = verdict_rewards(v for v in verdicts if v.problem_id in wanted)
    samples = {}  # problem id -> its sample indices, in the order of its rewards
    for v in verdicts:
        if v.problem_id in wanted:
            samples.setdefault(v.problem_id, []).append(v.sample_index)
    adv = group_advantages(rewards, gcfg)
    seqs, items = [], []
    trained = adv.trained_groups(gcfg)
    for pid in trained:
        prompt = prompt_ids[pid]
        for j, a in zip(sorted(samples[pid]), adv.advantages[pid]):
            ro = rollouts[(pid, j)]
            tokens = rollout_tokens(ro, prompt, eos_id, max_len)
            if tokens is None:
                continue
            key = rollout_key(r, pid, j)
            lps = list(ro.logprobs)[:len(tokens) - len(prompt)] if ro.logprobs is not None else None
            seqs.append(TrainSequence(key, tokens, len(prompt), advantage=a, rollout_logprobs=lps))
            items.append(QueueItem(key, 1.0))
    all_r = [x for g in rewards.values() for x in g]
    stats = {"groups": len(rewards), "groups_trained": len(trained),
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
    advantage and aligned rollout log-probs; the weight, π_old and reference log-probs are attached
    by the stream."""
    if ts.advantage is None:
        return Seq(ts.key, ts.tokens, ts.prompt_len)
    return Seq(ts.key, ts.tokens, ts.prompt_len, advantage=float(ts.advantage),
               rollout_logp=aligned_rollout_logp(ts))
