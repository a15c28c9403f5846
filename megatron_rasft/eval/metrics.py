"""Evaluation metrics from per-sample verdicts.

For a problem with n samples of which c are correct:
- avg@n = c / n, averaged over problems (mean accuracy of a single sample);
- pass@k = 1 − C(n−c, k) / C(n, k), the unbiased estimate of "at least one of k samples is
  correct" (Chen et al. 2021), for k ∈ {1, 2, 4, 8, ...} ≤ n; pass@1 = avg@n;
- maj@n (math only): the most frequent extracted answer (normalised string; ties go to the one
  seen first) is correct; a problem with no extracted answer counts as wrong.
`accuracy` is the fraction of all graded completions judged correct (equals avg@n when every
problem has the same n). Benchmarks are macro-averaged with equal weight.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from megatron_rasft.verify.answers import normalize_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 − C(n−c, k)/C(n, k) as the product ∏_{i=n−c+1}^{n} (1 − k/i) (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_for(n: int) -> list[int]:
    """Powers of two up to n."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def majority_correct(samples: Sequence[dict]) -> bool:
    """samples: dicts with `extracted` and `correct`."""
    keyed = []
    for s in samples:
        if s.get("extracted") is None or not str(s["extracted"]).strip():
            continue
        try:
            key = normalize_answer(str(s["extracted"]))
        except Exception:  # noqa: BLE001 - an odd answer string only loses its vote grouping
            key = str(s["extracted"]).strip()
        keyed.append((key, bool(s.get("correct"))))
    if not keyed:
        return False
    counts = Counter(k for k, _ in keyed)
    best = max(counts.values())
    winner = next(k for k, _ in keyed if counts[k] == best)
    # Samples with the same normalised answer may disagree only by grader noise: majority of them.
    votes = [ok for k, ok in keyed if k == winner]
    return sum(votes) * 2 > len(votes)


def summarize(by_problem: dict, kind: str) -> dict:
    """by_problem: id -> list of sample dicts (`correct`, `reason`, `extracted`, `num_tokens`,
    `finish_reason`). Returns the benchmark's metrics."""
    if not by_problem:
        raise ValueError("summarize: no problems")
    groups = list(by_problem.values())
    ns = [len(g) for g in groups]
    cs = [sum(bool(s["correct"]) for s in g) for g in groups]
    total = sum(ns)
    out = {"kind": kind, "problems": len(groups), "count": total, "n": min(ns),
           "accuracy": sum(cs) / total,
           "avg@n": sum(c / n for c, n in zip(cs, ns)) / len(groups)}
    for k in ks_for(min(ns)):
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in zip(ns, cs)) / len(groups)
    if kind == "math":
        out["maj@n"] = sum(majority_correct(g) for g in groups) / len(groups)
    reasons = Counter(s.get("reason") for g in groups for s in g)
    out["reasons"] = dict(sorted(reasons.items(), key=lambda kv: str(kv[0])))
    tokens = [s["num_tokens"] for g in groups for s in g if s.get("num_tokens") is not None]
    out["mean_tokens"] = sum(tokens) / len(tokens) if tokens else None
    finished = [s.get("finish_reason") for g in groups for s in g if s.get("finish_reason")]
    out["truncated"] = (sum(f == "length" for f in finished) / len(finished)) if finished else None
    return out


METRICS = ("accuracy", "avg@n", "maj@n")


def macro(results: dict, keys: Optional[Sequence[str]] = None) -> dict:
    """Equal-weight mean over benchmarks of each metric that every benchmark has (pass@k for the
    ks all share; maj@n only if all are math)."""
    if not results:
        return {}
    names = keys or sorted(set.intersection(*(set(k for k, v in r.items() if isinstance(v, (int, float))
                                                  and (k in METRICS or k.startswith("pass@")))
                                              for r in results.values())), key=_metric_order)
    out = {k: sum(r[k] for r in results.values()) / len(results) for k in names}
    out["count"] = sum(r.get("count", 0) for r in results.values())
    out["problems"] = sum(r.get("problems", 0) for r in results.values())
    return out


def _metric_order(name: str):
    if name.startswith("pass@"):
        return (1, int(name[5:]))
    return (0 if name != "maj@n" else 2, METRICS.index(name) if name in METRICS else 0)
