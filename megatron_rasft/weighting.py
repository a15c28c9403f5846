"""Per-sequence weights A from solvability (RASFT.md, "Per-sequence weights from solvability").

`weigh(scheme, expert_response, rollouts, cfg)` is pure: `rollouts` is [(text, correct), ...] in
sampling order; it returns `(A_E, [A_j per rollout])`, 0.0 for rollouts not trained on.

- `constant`: A_E = 1, every correct rollout 1 (plain SFT on expert + correct samples).
- `linear` (default): A_E = a_max − (a_max − a_min)·p; each correct rollout β·p/k when p ≥ p_min.
- `reference`: the released code's group-normalised rule with its rollout filters (below).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_rasft.config import WeightingConfig
from megatron_rasft.records import ProblemVerdicts, Weight
from megatron_rasft.verify.reference import last_boxed


@dataclass(frozen=True)
class ReferenceFilters:
    """Constants of the `reference` scheme. The first block is from RASFT.md (ref); the degenerate-
    rollout thresholds are this project's concrete choice for the filters RASFT.md names."""

    dup_jaccard: float = 0.82  # (ref) word-3-gram Jaccard at which a rollout is a near duplicate
    neg_jaccard: float = 0.88  # (ref) a negative this close to a positive is dropped
    max_negatives: int = 3  # (ref)
    symbol_share: float = 0.42  # (ref) max share of non-alphanumeric, non-space characters
    max_corrections: int = 1  # (ref: ">= 2 self-correction markers" is degenerate)
    min_chars: int = 40  # fewer non-whitespace characters = too short
    min_line_chars: int = 10  # lines at least this long count for repetition
    max_line_repeats: int = 2  # a line repeated more often than this = degenerate
    ngram_min_count: int = 20  # with at least this many word 4-grams ...
    ngram_min_distinct: float = 0.5  # ... fewer than this share distinct = degenerate
    min_words_before_box: int = 5  # shortcut: fewer words before the first \boxed
    z_eps: float = 1e-6  # (ref)
    tanh_scale: float = 0.4  # (ref)
    rollout_scale: float = 0.25  # (ref)
    rollout_clip: tuple = (0.02, 0.15)  # (ref)


REFERENCE = ReferenceFilters()
CORRECTION_MARKERS = re.compile(
    r"\b(wait|actually|hmm+|oops|on second thought|let me re(?:check|consider|do|think|calculate|evaluate)"
    r"|i made a mistake|that'?s (?:not right|wrong|incorrect)|correction)\b", re.IGNORECASE)
REASONING_MARKERS = re.compile(
    r"(\b(because|since|therefore|thus|hence|so|then|step|first|we have|we get|implies|gives)\b"
    r"|=|\\implies|\\therefore|\\Rightarrow)", re.IGNORECASE)
SHORTCUT_OPENINGS = ("the answer is", "answer:", "final answer")


@dataclass
class Weights:
    expert: float
    rollouts: list  # one float per input rollout
    p: float
    k: int
    K: int


def solvability(k: int, K: int, smoothing: Optional[tuple] = None) -> float:
    """p = k/K, or (k + a)/(K + a + b) with Beta(a, b) smoothing."""
    if not 0 <= k <= K:
        raise ValueError(f"need 0 <= k <= K, got k={k}, K={K}")
    a, b = smoothing if smoothing is not None else (0.0, 0.0)
    if K + a + b == 0:
        raise ValueError("solvability of a problem without rollouts (K=0) is undefined without smoothing")
    return (k + a) / (K + a + b)


def _words(text: str) -> list:
    return text.lower().split()


def ngrams(text: str, n: int = 3) -> set:
    """Word n-grams (lower-cased, whitespace split); a text shorter than n is one gram."""
    w = _words(text)
    if len(w) < n:
        return {tuple(w)} if w else set()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def degenerate_reason(text: str, f: ReferenceFilters = REFERENCE) -> Optional[str]:
    """Why a rollout is degenerate under the reference filters, or None."""
    chars = re.sub(r"\s", "", text)
    if len(chars) < f.min_chars:
        return "too_short"
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= f.min_line_chars]
    if lines and max(Counter(lines).values()) > f.max_line_repeats:
        return "repeated_lines"
    w = _words(text)
    grams = [tuple(w[i:i + 4]) for i in range(len(w) - 3)]
    if len(grams) >= f.ngram_min_count and len(set(grams)) / len(grams) < f.ngram_min_distinct:
        return "repeated_ngrams"
    if len(CORRECTION_MARKERS.findall(text)) > f.max_corrections:
        return "self_corrections"
    if sum(not (c.isalnum()) for c in chars) / len(chars) > f.symbol_share:
        return "symbols"
    box = re.search(r"\\(boxed|fbox)\b", text)
    if box is None or last_boxed(text) is None:
        return "no_boxed"
    if text.strip().lower().startswith(SHORTCUT_OPENINGS) or len(text[:box.start()].split()) < f.min_words_before_box:
        return "shortcut"
    if not REASONING_MARKERS.search(text[:box.start()]):
        return "no_reasoning_marker"
    return None


def _linear(rollouts, cfg: WeightingConfig) -> Weights:
    K, k = len(rollouts), sum(bool(c) for _, c in rollouts)
    if K == 0:
        return Weights(1.0, [], 0.0, 0, 0)
    p = solvability(k, K, cfg.smoothing)
    a_e = cfg.a_max - (cfg.a_max - cfg.a_min) * p
    per = cfg.beta * p / k if k > 0 and p >= cfg.p_min else 0.0
    return Weights(a_e, [per if c else 0.0 for _, c in rollouts], p, k, K)


def _reference(expert_response: str, rollouts, f: ReferenceFilters = REFERENCE) -> Weights:
    n = len(rollouts)
    grams = [ngrams(t) for t, _ in rollouts]
    kept = []  # indices surviving de-duplication, in sampling order
    for j in range(n):
        if all(jaccard(grams[j], grams[i]) < f.dup_jaccard for i in kept):
            kept.append(j)
    K_tot = len(kept)
    ok = [j for j in kept if degenerate_reason(rollouts[j][0], f) is None]
    pos = [j for j in ok if rollouts[j][1]]
    k = len(pos)
    fallback = Weights(1.0, [0.0] * n, k / K_tot if K_tot else 0.0, k, K_tot)
    if not ok or k == 0:
        return fallback
    # Failures (wrong or filtered) are the negatives; near copies of a positive are dropped. The
    # positives here include the expert demonstration: rollouts are already de-duplicated at 0.82
    # among themselves, so only the expert makes this 0.88 test bite.
    positive_grams = [ngrams(expert_response)] + [grams[i] for i in pos]
    neg = [j for j in kept if j not in pos
           and all(jaccard(grams[j], g) < f.neg_jaccard for g in positive_grams)][:f.max_negatives]
    d = 1.0 - k / K_tot
    r = [1.0 + 2.0 * d] + [1.0] * k + [0.0] * len(neg)
    mean = sum(r) / len(r)
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / len(r))
    if std == 0.0:
        return fallback
    s = [math.tanh(f.tanh_scale * (x - mean) / (std + f.z_eps)) for x in r]
    sigma = 1.0 / (1 + k)
    lo, hi = f.rollout_clip
    out = [0.0] * n
    for pos_j, s_j in zip(pos, s[1:1 + k]):
        out[pos_j] = f.rollout_scale * min(max(s_j * sigma, lo), hi)
    return Weights(s[0] * sigma, out, k / K_tot, k, K_tot)


def weigh_detailed(scheme: str, expert_response: str, rollouts: Sequence[tuple],
                   cfg: Optional[WeightingConfig] = None) -> Weights:
    """Like `weigh`, also returning the p, k, K the scheme used (reference: K = K_tot)."""
    cfg = cfg or WeightingConfig(scheme=scheme)
    rollouts = [(str(t), bool(c)) for t, c in rollouts]
    if scheme == "constant":
        k = sum(c for _, c in rollouts)
        return Weights(1.0, [1.0 if c else 0.0 for _, c in rollouts],
                       k / len(rollouts) if rollouts else 0.0, k, len(rollouts))
    if scheme == "linear":
        return _linear(rollouts, cfg)
    if scheme == "reference":
        return _reference(str(expert_response), rollouts)
    raise ValueError(f"weighting scheme must be one of ('linear', 'reference', 'constant'), got {scheme!r}")


def weigh(scheme: str, expert_response: str, rollouts: Sequence[tuple],
          cfg: Optional[WeightingConfig] = None) -> tuple:
    """-> (A_E, [A_j for each rollout]) — see the module docstring. `expert_response` is part of
    `reference` uses it to drop negatives that copy it."""
    w = weigh_detailed(scheme, expert_response, rollouts, cfg)
    return w.expert, w.rollouts


def weight_records(pv: ProblemVerdicts, scheme: str, cfg: Optional[WeightingConfig] = None) -> list:
    """Weight records of one problem: the expert, then every rollout with a non-zero weight."""
    rolls = sorted(pv.rollouts, key=lambda r: r["sample_index"])
    w = weigh_detailed(scheme, pv.expert_response, [(r["text"], r["correct"]) for r in rolls], cfg)
    recs = [Weight(pv.problem_id, pv.round, "expert", None, w.expert, w.p, w.k, w.K)]
    recs += [Weight(pv.problem_id, pv.round, "rollout", r["sample_index"], a, w.p, w.k, w.K)
             for r, a in zip(rolls, w.rollouts) if a > 0.0]
    return recs


def round_summary(records: Sequence[Weight]) -> dict:
    """Per-round statistics RASFT.md asks to log: p histogram (10 bins), fraction of problems with
    k = 0 and k = K, rollouts added, mean A_E, effective sample size (Σw)²/Σw² over all sequences."""
    experts = [r for r in records if r.kind == "expert"]
    ws = [r.weight for r in records]
    n = max(len(experts), 1)
    hist = [0] * 10
    for r in experts:
        hist[min(int(r.p * 10), 9)] += 1
    sq = sum(w * w for w in ws)
    return {"problems": len(experts), "rollouts_added": len(records) - len(experts),
            "mean_expert_weight": sum(r.weight for r in experts) / n,
            "frac_k0": sum(r.K > 0 and r.k == 0 for r in experts) / n,
            "frac_kK": sum(r.K > 0 and r.k == r.K for r in experts) / n,
            "p_hist": hist, "ess": sum(ws) ** 2 / sq if sq > 0 else 0.0}
