"""GRPO's group-relative advantages from verifier rewards (docs/loss.md, "grpo").

A group is the K rollouts of one problem in one round. For rollout j with reward R_j:

    A_j = (R_j − mean_g R) / (std_g R + eps)     grpo.scale_by_std = true  (GRPO, Shao et al. 2024, §4.1.2)
    A_j =  R_j − mean_g R                         grpo.scale_by_std = false (Dr.GRPO, Liu et al. 2025, §3.1)

std is the sample standard deviation (Bessel-corrected, as torch.std, trl and verl use). A group
whose rewards are all equal (a single rollout included) has zero variance: every A_j is exactly 0, so
it carries no policy gradient; it is flagged, and with `grpo.filter_zero_variance` (DAPO's dynamic
sampling) the round drops it instead of training on it. Pure Python in float64; no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from megatron_rasft.config import GRPOConfig


@dataclass
class GroupAdvantages:
    advantages: dict  # problem id → [A_j], in the order of its rewards
    zero_variance: set  # ids of the groups whose rewards are all equal (all A_j = 0)

    @property
    def zero_variance_frac(self) -> float:
        """Fraction of groups that carry no gradient (0 for no groups)."""
        return len(self.zero_variance) / len(self.advantages) if self.advantages else 0.0

    def trained_groups(self, cfg: GRPOConfig) -> list:
        """The ids to train, in input order: all, or without the zero-variance groups when
        `cfg.filter_zero_variance`."""
        return [pid for pid in self.advantages if not (cfg.filter_zero_variance and pid in self.zero_variance)]


def group_advantages(rewards: Mapping[str, Sequence[float]], cfg: GRPOConfig) -> GroupAdvantages:
    """Advantages of every rollout, group by group.

    rewards: problem id → the rewards R_j of its rollouts (any finite numbers; at least one per
    group). Returns a GroupAdvantages with the same ids and lengths. Raises ValueError naming the
    problem for an empty group or a non-finite reward.
    """
    if not isinstance(cfg, GRPOConfig):
        raise ValueError(f"cfg must be a GRPOConfig, got {type(cfg).__name__}")
    out, flat = {}, set()
    for pid, group in rewards.items():
        r = [float(x) for x in group]
        if not r:
            raise ValueError(f"problem {pid}: no rewards (a group needs at least one rollout)")
        bad = [j for j, x in enumerate(r) if not math.isfinite(x)]
        if bad:
            raise ValueError(f"problem {pid}: reward of rollout {bad[0]} is {r[bad[0]]} (must be finite)")
        if all(x == r[0] for x in r):
            # Exactly 0, not (R − mean)/…: a float mean of equal values can miss R by one ulp.
            out[pid] = [0.0] * len(r)
            flat.add(pid)
            continue
        mean = math.fsum(r) / len(r)
        centred = [x - mean for x in r]
        if cfg.scale_by_std:
            std = math.sqrt(math.fsum(c * c for c in centred) / (len(r) - 1))
            centred = [c / (std + cfg.eps) for c in centred]
        out[pid] = centred
    return GroupAdvantages(out, flat)


def verdict_rewards(verdicts: Iterable) -> dict:
    """problem id → rewards in sample order from `records.Verdict`s: R = 1 if correct else 0.
    Raises ValueError on a repeated (problem, sample_index)."""
    seen: dict = {}
    for v in verdicts:
        group = seen.setdefault(v.problem_id, {})
        if v.sample_index in group:
            raise ValueError(f"problem {v.problem_id}: two verdicts for sample {v.sample_index}")
        group[v.sample_index] = 1.0 if v.correct else 0.0
    return {pid: [g[j] for j in sorted(g)] for pid, g in seen.items()}
