"""The study's analysis (docs/results.md, "Protocol"): paired differences over problems, a paired
bootstrap over problems × seeds, and Holm's correction for the secondary comparisons.

d_SP[s, p] = accuracy of arm A on problem p in seed s − that of arm B (both evaluated on the same
problems with the same per-problem sampling seeds). The estimate is the mean of d_SP. The bootstrap
resamples seeds and problems independently, with replacement (the two-way "pigeonhole" bootstrap,
Owen 2007, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2)), so both sources of variation are in
the interval; with one seed it is the ordinary paired bootstrap over problems. The CI is the
percentile interval; the p-value is the two-sided bootstrap p, 2 × min(P*(mean ≤ 0), P*(mean ≥ 0)),
capped at 1. Holm (1979, "A simple sequentially rejective multiple test procedure", Scand. J. Stat.
6(2)) adjusts the secondaries' p-values; their intervals are at the Bonferroni level 1 − α / m.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def paired_table(a: dict, b: dict) -> tuple[np.ndarray, list, list]:
    """(d_SP, seeds, problem ids): `a`, `b` are {seed: {problem id: accuracy}} of two arms; only seeds
    both have and problems every one of those seeds has in both arms are used. ValueError if none."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two arms share no seed")
    ids = sorted(set.intersection(*[set(a[s]) & set(b[s]) for s in seeds]))
    if not ids:
        raise ValueError("the two arms share no evaluated problem")
    d_SP = np.array([[a[s][p] - b[s][p] for p in ids] for s in seeds], dtype=np.float64)
    return d_SP, seeds, ids


@dataclass
class Comparison:
    mean: float  # mean of d_SP
    se_problems: float  # SD over problems of the seed-averaged difference / sqrt(P) (the naive SE)
    ci: tuple  # percentile bootstrap interval at `level`
    level: float
    p: float  # two-sided bootstrap p-value (unadjusted)
    per_seed: list  # mean difference of each seed
    problems: int
    seeds: int


def bootstrap_means(d_SP: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` bootstrap replicates of mean(d_SP): seeds and problems resampled independently with
    replacement. Shape [n]."""
    rng = np.random.default_rng(seed)
    S, P = d_SP.shape
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, 1000):  # chunks keep the index arrays small
        m = min(1000, n - start)
        si = rng.integers(0, S, size=(m, S))
        pi = rng.integers(0, P, size=(m, P))
        rows = d_SP[si]  # [m, S, P]
        out[start:start + m] = np.take_along_axis(rows, pi[:, None, :].repeat(S, axis=1), axis=2).mean(axis=(1, 2))
    return out


def compare(d_SP: np.ndarray, *, n_boot: int, level: float = 0.95, seed: int = 0) -> Comparison:
    """Estimate, interval and p-value of one comparison (module docstring)."""
    boot = bootstrap_means(d_SP, n_boot, seed)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    p = min(1.0, 2 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))))
    per_problem = d_SP.mean(axis=0)
    se = float(per_problem.std(ddof=1) / np.sqrt(len(per_problem))) if len(per_problem) > 1 else 0.0
    return Comparison(float(d_SP.mean()), se, (float(lo), float(hi)), level, p,
                      [float(x) for x in d_SP.mean(axis=1)], d_SP.shape[1], d_SP.shape[0])


def holm(pvalues: list) -> list:
    """Holm-adjusted p-values, in the input order: sorted ascending, p_(i) × (m − i) (i from 0),
    made non-decreasing, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, pvalues[i] * (m - rank)))
        adjusted[i] = running
    return adjusted
