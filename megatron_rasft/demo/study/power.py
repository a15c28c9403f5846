"""How many held-out problems and seeds detect a given difference, from a pilot's per-problem results
(`python -m megatron_rasft study power`).

Model of a paired difference d_sp (problem p, seed s): d_sp = δ + a_p + b_s + e_sp, with a_p the
problem's own effect (the same in every seed), b_s the seed's (training-run) effect, e_sp the rest
(sampling noise of avg@n, training noise per problem). One pilot seed measures σ² = Var(a) + Var(e)
(the SD over problems of d) but cannot split it, nor give τ² = Var(b). So two bounds:
  conservative: SE² = σ² / P + τ² / S     (all of σ² is problem effect, which more seeds do not average)
  optimistic:   SE² = σ² / (P·S) + τ² / S (all of σ² is noise that every seed redraws)
and power = Φ(δ/SE − z) + Φ(−δ/SE − z), z = Φ⁻¹(1 − α/2) (the normal approximation of the two-sided
test; Cohen 1988, ch. 2). τ is not measurable from one seed: it is given as a range.

A third, measured split: part of Var(e) is the evaluation's own sampling noise, known per problem.
The mean of n Bernoulli samples has variance p(1 − p)/n, estimated without bias by p̂(1 − p̂)/(n − 1);
summed over the two arms and averaged over problems it gives σ_e² (sampling only), and σ_a² = σ² − σ_e²
(training noise per problem stays in σ_a², so this is still conservative about it):
  split:        SE² = σ_a² / P + σ_e² / (P·S) + τ² / S
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def sampling_variance(a: dict, b: dict) -> float:
    """σ_e²: the mean over common problems of p̂(1 − p̂)/(n − 1) summed over both arms, from
    {problem id: [correct, samples]} (module docstring). ValueError for n < 2."""
    total, ids = 0.0, sorted(set(a) & set(b))
    for pid in ids:
        for c, n in (a[pid], b[pid]):
            if n < 2:
                raise ValueError(f"problem {pid}: {n} sample(s); the sampling variance needs n >= 2")
            total += (c / n) * (1 - c / n) / (n - 1)
    return total / len(ids)


def se_split(sigma_a: float, sigma_e: float, tau: float, problems: int, seeds: int) -> float:
    """SE of the mean difference with the problem part `sigma_a` and the sampling part `sigma_e`."""
    return math.sqrt(sigma_a ** 2 / problems + sigma_e ** 2 / (problems * seeds) + tau ** 2 / seeds)


def se(sigma: float, tau: float, problems: int, seeds: int, conservative: bool = True) -> float:
    """Standard error of the mean difference over `problems` × `seeds` (module docstring)."""
    noise = sigma ** 2 / problems if conservative else sigma ** 2 / (problems * seeds)
    return math.sqrt(noise + tau ** 2 / seeds)


def power(delta: float, se_: float, alpha: float = 0.05) -> float:
    """Probability that a two-sided level-α test rejects when the true difference is `delta`."""
    z = NormalDist().inv_cdf(1 - alpha / 2)
    phi = NormalDist().cdf
    return phi(delta / se_ - z) + phi(-delta / se_ - z)


def problems_needed(delta: float, sigma: float, tau: float, seeds: int, *, target: float = 0.8,
                    alpha: float = 0.05, conservative: bool = True, max_problems: int = 100_000):
    """The smallest number of problems giving `target` power, or None when no number does (τ alone
    leaves the SE too large)."""
    if tau > 0 and power(delta, tau / math.sqrt(seeds), alpha) < target:
        return None  # the SE cannot fall below τ/√S however many problems
    for p in range(2, max_problems + 1):
        if power(delta, se(sigma, tau, p, seeds, conservative), alpha) >= target:
            return p
    return None


def pilot_sigma(a: dict, b: dict) -> tuple[float, float, int]:
    """(SD over problems of the difference, the mean difference, problems) of arms `a`, `b` given as
    {problem id: accuracy} of one seed (their common problems)."""
    ids = sorted(set(a) & set(b))
    d = np.array([a[p] - b[p] for p in ids])
    return float(d.std(ddof=1)), float(d.mean()), len(ids)


def problems_needed_split(delta: float, sigma_a: float, sigma_e: float, tau: float, seeds: int, *,
                          target: float = 0.8, alpha: float = 0.05, max_problems: int = 100_000):
    """As `problems_needed`, under the measured split (`se_split`)."""
    if tau > 0 and power(delta, tau / math.sqrt(seeds), alpha) < target:
        return None
    for p in range(2, max_problems + 1):
        if power(delta, se_split(sigma_a, sigma_e, tau, p, seeds), alpha) >= target:
            return p
    return None


def table(delta: float, sigma: float, taus: list, seeds_list: list, alpha: float = 0.05,
          sigma_e: float | None = None, at: tuple = (300, 500)) -> list:
    """Markdown lines: problems needed for 80 % power per τ and seed count under each bound (and the
    measured split when `sigma_e` is given), and the split's power at the problem counts `at`."""
    sigma_a = math.sqrt(max(sigma ** 2 - sigma_e ** 2, 0.0)) if sigma_e is not None else None
    head = "| seeds | τ (points) | problems, conservative | problems, optimistic |"
    if sigma_a is not None:
        head += " problems, split | " + " | ".join(f"power at {n}, split" for n in at) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in seeds_list:
        for tau in taus:
            c = problems_needed(delta, sigma, tau, s, alpha=alpha)
            o = problems_needed(delta, sigma, tau, s, alpha=alpha, conservative=False)
            row = f"| {s} | {100 * tau:.1f} | {c if c else 'none'} | {o if o else 'none'} |"
            if sigma_a is not None:
                m = problems_needed_split(delta, sigma_a, sigma_e, tau, s, alpha=alpha)
                row += f" {m if m else 'none'} | " + " | ".join(
                    f"{power(delta, se_split(sigma_a, sigma_e, tau, n, s), alpha):.2f}" for n in at) + " |"
            lines.append(row)
    return lines


def solvability(problems: dict) -> dict:
    """{task: [problems with c of their n samples correct, c = 0..n]} from a summary's
    {problem id: [correct, samples]} (the task is the id's first `/`-separated part). With n = K this
    is the spread RASFT adapts to: the problems with 0 < c < n are the partly solved ones."""
    n = max(s for _, s in problems.values())
    hist = {}
    for pid, (c, s) in problems.items():
        if s != n:
            raise ValueError(f"problem {pid}: {s} samples, others {n}")
        hist.setdefault(pid.split("/")[0], [0] * (n + 1))[c] += 1
    return dict(sorted(hist.items()))
