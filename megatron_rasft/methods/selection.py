"""Which problems of a window get rollouts.

`all`: every problem of the window.
`released`: the released code's NLL band. The expert demonstration's mean token NLL under the
initial model is calibrated once into quantile thresholds (easy floor q0.10, a band that moves
linearly from [q0.20, q0.45] at step 0 to [q0.50, q0.75] at the last step, hard ceiling q0.95).
In each window, under the *current* policy:
  NLL ≤ band high and ≥ band low → candidate; 35 % of the candidates (seeded draw) are rolled out
                                   (`rollout.selection.rollout_fraction`);
  band high < NLL ≤ ceiling       → trained with A = 1 and remembered in the hard pool;
  anything else                    → trained with A = 1.
Each window also probes 3 % (at least one; `rollout.selection.probe_fraction`) of the hard pool: a probe whose NLL fell below the band
leaves the pool and is trained again with A = 1; one within the ceiling is rolled out with the
window (and leaves the pool once it has correct rollouts).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

QUANTILES = {"easy_floor": 0.10, "start_low": 0.20, "start_high": 0.45, "end_low": 0.50,
             "end_high": 0.75, "hard_ceiling": 0.95}


def _quantile(sorted_vals: list, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


@dataclass
class Band:
    easy_floor: float
    start_low: float
    start_high: float
    end_low: float
    end_high: float
    hard_ceiling: float

    @classmethod
    def calibrate(cls, nll: list) -> "Band":
        if not nll:
            raise ValueError("cannot calibrate the NLL band without any expert demonstration")
        vals = sorted(nll)
        return cls(**{k: _quantile(vals, q) for k, q in QUANTILES.items()})

    def window(self, step: int, total: int) -> tuple:
        a = min(max(step / max(total, 1), 0.0), 1.0)
        return (1 - a) * self.start_low + a * self.end_low, (1 - a) * self.start_high + a * self.end_high


def mean_nll(logp: list, prompt_len: int) -> float:
    """Mean NLL of the response tokens (`logp[t]` scores token t+1; the response starts at prompt_len)."""
    resp = logp[max(prompt_len - 1, 0):]
    return -sum(resp) / max(len(resp), 1)


def select(ids: list, score, band: Band, step: int, total: int, hard_pool: dict, seed: str, *,
           rollout_fraction: float, probe_fraction: float) -> dict:
    """-> {"rollout": ids to roll out, "probes_retrain": pool ids trained again with A = 1,
    "probes_rollout": pool ids rolled out}; updates `hard_pool` (id -> times probed) in place.
    `score(ids) -> {id: NLL under the current policy}`. `rollout_fraction` of the band's candidates
    (rounded up) and `probe_fraction` of the hard pool (rounded down, at least one) are drawn
    (`SelectionConfig`; the released code's 0.35 and 0.03)."""
    low, high = band.window(step, total)
    rng = random.Random(seed)
    pool = sorted(hard_pool)
    probes = sorted(rng.sample(pool, min(len(pool), max(1, int(len(pool) * probe_fraction))))) if pool else []
    nll_now = score(list(ids) + probes)
    candidates = [i for i in ids if low <= nll_now[i] <= high]
    k = min(len(candidates), math.ceil(len(candidates) * rollout_fraction)) if candidates else 0
    chosen = sorted(rng.sample(candidates, k))
    retrain, probe_roll = [], []
    for pid in probes:
        if nll_now[pid] < low:
            retrain.append(pid)
            hard_pool.pop(pid)
        elif nll_now[pid] <= band.hard_ceiling:
            probe_roll.append(pid)
        else:
            hard_pool[pid] += 1
    for pid in ids:
        if high < nll_now[pid] <= band.hard_ceiling and pid not in hard_pool:
            hard_pool[pid] = 0
    return {"rollout": sorted(set(chosen) | set(probe_roll)), "probes_retrain": retrain, "probes_rollout": probe_roll}
