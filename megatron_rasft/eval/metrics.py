"""Evaluation metrics from per-sample verdicts.

For a problem with n samples of which c are correct:
- avg@n = c / n, averaged over problems (mean accuracy of a single sample);
- pass@k = 1 − C(n−c, k) / C(n, k), the unbiased estimate of "at least one of k samples is
  correct" (Chen et al. 2021), for k ∈ {1, 2, 4, 8, ...} ≤ n; pass@1 = avg@n;
- maj@n (math only): the answer of the largest vote group is correct. Votes are grouped by the
  grader's own equivalence among the samples, without the gold (`vote_groups`): in sample order,
  each extracted answer joins the first group whose representative (its first answer) the grader
  accepts it against, as a prediction against that representative taken as the gold; otherwise it
  founds a new group. The rule is defined for non-transitive matches (an answer equivalent to two
  representatives joins the earlier one; equivalence to a non-representative member does not
  count). Ties between groups of equal size go to the group whose representative came first. The
  winner is graded by its representative's own verdict against the gold. A problem with no
  extracted answer counts as wrong. `0.5`, `\\frac{1}{2}`, `\\frac{2}{4}`, `3`, `3` with gold ½:
  one group of 3 against one of 2, so maj@n = 1 (a vote by string gave 0).
`accuracy` is the fraction of all graded completions judged correct (equals avg@n when every
problem has the same n). Benchmarks are macro-averaged with equal weight.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Optional, Sequence

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


Equivalent = Callable[[Sequence[tuple[str, str]]], list]  # [(representative, answer)] -> [bool]


def grader_equivalent(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """The `math` grading rule in this process: is `answer` correct with `representative` as the
    gold? (`MathVerifier`-backed equivalents run the same rule in its worker pool, with deadlines.)"""
    from megatron_rasft.verify.mathv import grade_math

    return [bool(grade_math("\\boxed{" + b + "}", a)["correct"]) for a, b in pairs]


def _vote_key(answer) -> Optional[str]:
    """A sample's answer string for voting; None when it has none. Answers with the same
    normalised string (left-hand side kept: `x=3` and `y=3` stay apart) are one answer."""
    if answer is None or not str(answer).strip():
        return None
    try:
        return normalize_answer(str(answer), keep_lhs=True)
    except Exception:  # noqa: BLE001 - an odd answer string is compared as it is
        return str(answer).strip()


def _vote_pairs(samples: Sequence[dict]) -> tuple[list, list]:
    """(distinct answers in first-seen order as (key, raw answer), the pairs to compare)."""
    distinct = {}
    for s in samples:
        key = _vote_key(s.get("extracted"))
        if key is not None and key not in distinct:
            distinct[key] = str(s["extracted"])
    answers = list(distinct.items())
    pairs = [(answers[i][1], answers[j][1]) for i in range(len(answers)) for j in range(i + 1, len(answers))]
    return answers, pairs


def vote_groups(samples: Sequence[dict], same: dict) -> list[list[int]]:
    """Sample indices grouped by equivalence (rule in the module docstring), groups in the order
    of their representatives. `same[(representative, answer)]` holds the grader's verdicts for
    every pair of distinct answers (first-seen order); samples without an answer are left out."""
    answers, _ = _vote_pairs(samples)
    raw = dict(answers)
    reps: list[str] = []  # keys of the representatives
    group_of: dict[str, int] = {}
    for key, _ in answers:
        joined = next((g for g, rep in enumerate(reps) if same[(raw[rep], raw[key])]), None)
        if joined is None:
            reps.append(key)
            joined = len(reps) - 1
        group_of[key] = joined
    groups: list[list[int]] = [[] for _ in reps]
    for i, s in enumerate(samples):
        key = _vote_key(s.get("extracted"))
        if key is not None:
            groups[group_of[key]].append(i)
    return groups


def majority_correct(samples: Sequence[dict], equivalent: Optional[Equivalent] = None,
                     same: Optional[dict] = None) -> bool:
    """samples: dicts with `extracted` and `correct`. The largest vote group's representative's
    verdict (ties: the earliest representative). `same`: cached verdicts (`vote_groups`); missing
    pairs are asked of `equivalent` (default `grader_equivalent`)."""
    same = dict(same or {})
    _, pairs = _vote_pairs(samples)
    todo = [p for p in pairs if p not in same]
    if todo:
        same.update(zip(todo, (equivalent or grader_equivalent)(todo)))
    groups = vote_groups(samples, same)
    if not groups:
        return False
    best = max(len(g) for g in groups)
    winner = next(g for g in groups if len(g) == best)  # ties: the earliest representative
    return bool(samples[winner[0]].get("correct"))


def summarize(by_problem: dict, kind: str, equivalent: Optional[Equivalent] = None) -> dict:
    """by_problem: id -> list of sample dicts (`correct`, `reason`, `extracted`, `num_tokens`,
    `finish_reason`). Returns the benchmark's metrics. `equivalent`: the grader's pairwise
    equivalence for maj@n (default `grader_equivalent`, in this process), asked once for all the
    benchmark's distinct pairs."""
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
        pairs = list(dict.fromkeys(p for g in groups for p in _vote_pairs(g)[1]))
        same = dict(zip(pairs, (equivalent or grader_equivalent)(pairs))) if pairs else {}
        out["maj@n"] = sum(majority_correct(g, same=same) for g in groups) / len(groups)
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
