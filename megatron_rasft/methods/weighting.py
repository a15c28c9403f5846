"""Per-sequence weights A from solvability (RASFT.md, "Per-sequence weights from solvability").

`weigh(scheme, rollouts, cfg)` is pure: `rollouts` is [(text, correct), ...] in sampling order;
it returns `Weights` with `.expert` (A_E) and `.rollouts` ([A_j per rollout], 0.0 for rollouts not
trained on). No scheme reads the expert response (`released` compares negatives with the positive
rollouts only).

- `constant`: A_E = 1, every correct rollout 1 (plain SFT on expert + correct samples).
- `linear` (default): A_E = a_max − (a_max − a_min)·p; each correct rollout β·p/k when p ≥ p_min.
- `released`: the released code's group-normalised rule with its rollout filters (below; the
  rules are listed in docs/verify_and_weighting.md).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_rasft.config import WeightingConfig
from megatron_rasft.records import ProblemVerdicts, Weight
from megatron_rasft.verify.answers import last_boxed_braced


@dataclass(frozen=True)
class ReleasedFilters:
    """Constants of the `released` scheme, all the released code's values."""

    dup_jaccard: float = 0.82  # word-3-gram Jaccard at which a rollout is a near duplicate
    neg_jaccard: float = 0.88  # a negative this close to a positive rollout is dropped
    neg_target_sim: float = 0.45  # negatives are ranked by |max_sim - this|
    max_negatives: int = 3
    min_chars: int = 20  # stripped length below this = too short (and gibberish)
    min_sentence_chars: int = 12  # sentences at least this long count for repetition
    max_repeats: int = 3  # a sentence / 8-word window seen this often = a loop
    window_words: int = 8
    window_min_words: int = 30  # the window test needs at least this many words
    max_corrections: int = 2  # this many distinct correction markers = collapsed
    symbol_share: float = 0.42  # share of non-alphanumeric, non-space characters above this = gibberish
    shortcut_choice_chars: int = 180  # a choice-like box in a text shorter than this = shortcut
    shortcut_chars: int = 120  # any box in a text shorter than this = shortcut
    format_min_chars: int = 80
    z_eps: float = 1e-6
    tanh_scale: float = 0.4
    rollout_scale: float = 0.25
    rollout_clip: tuple = (0.02, 0.15)


RELEASED = ReleasedFilters()
CORRECTION_MARKERS = ("let me correct", "correcting the calculation", "i need to correct", "rechecking",
                      "let's correct", "wait,", "however, this is incorrect", "the previous reasoning was wrong")
SHORTCUT_PATTERNS = [re.compile(p) for p in (
    r"according to the problem[, ]+the correct answer is",
    r"based on the given information[, ]+we know that the correct answer is",
    r"the correct answer is\s*[:：]?\s*\\boxed",
    r"therefore[, ]+the correct answer is",
    r"thus[, ]+the correct answer is")]
SHORT_CHOICE = re.compile(r"[A-Da-d①-⑨0-9,， ]{1,12}")  # choice letters, circled digits, digits, commas
FORMAT_MARKERS = ("=", "therefore", "thus", "hence", "so ", "let ", "we have", "we get", "substitute", "solve")


@dataclass
class Weights:
    expert: float
    rollouts: list  # one float per input rollout
    p: float
    k: int
    K: int
    negatives: tuple = ()  # `released`: indices of the rollouts in the group as negatives, in group order


def solvability(k: int, K: int, smoothing: Optional[tuple] = None) -> float:
    """p = k/K, or (k + a)/(K + a + b) with Beta(a, b) smoothing."""
    if not 0 <= k <= K:
        raise ValueError(f"need 0 <= k <= K, got k={k}, K={K}")
    a, b = smoothing if smoothing is not None else (0.0, 0.0)
    if K + a + b == 0:
        raise ValueError("solvability of a problem without rollouts (K=0) is undefined without smoothing")
    return (k + a) / (K + a + b)


def normalise(text: str) -> str:
    """Lower-cased, runs of whitespace collapsed to one space, stripped."""
    return " ".join(text.lower().split())


def ngrams(text: str, n: int = 3) -> set:
    """Word n-grams of the normalised text; empty for a text of fewer than n words."""
    w = normalise(text).split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0), one empty set shares nothing (0.0)."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def gibberish_reason(text: str, f: ReleasedFilters = RELEASED) -> Optional[str]:
    """Why a text is gibberish or collapsed (a loop, self-corrections, symbols), or None."""
    if len(text.strip()) < f.min_chars:
        return "too_short"
    t = normalise(text)
    sentences = [s.strip() for s in re.split(r"[.\n]", t)]
    counts = Counter(s for s in sentences if len(s) >= f.min_sentence_chars)
    if counts and max(counts.values()) >= f.max_repeats:
        return "repeated_sentence"
    w = t.split()
    if len(w) >= f.window_min_words:
        n = f.window_words
        windows = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
        if max(windows.values()) >= f.max_repeats:
            return "repeated_window"
    if sum(m in t for m in CORRECTION_MARKERS) >= f.max_corrections:
        return "self_corrections"
    if sum(not c.isalnum() and not c.isspace() for c in t) / len(t) > f.symbol_share:
        return "symbols"
    return None


def shortcut_reason(text: str, f: ReleasedFilters = RELEASED) -> Optional[str]:
    """Why a text answers without working (a stock phrase, or a box in a very short text), or None."""
    low = text.lower()
    if any(p.search(low) for p in SHORTCUT_PATTERNS):
        return "shortcut_phrase"
    box = last_boxed_braced(text)
    n = len(text.strip())
    if box is not None and SHORT_CHOICE.fullmatch(box.strip()) and n < f.shortcut_choice_chars:
        return "shortcut_choice"
    if box is not None and n < f.shortcut_chars:
        return "shortcut_short"
    return None


def format_reason(text: str, f: ReleasedFilters = RELEASED) -> Optional[str]:
    """Why a text is not a boxed worked solution (short, gibberish, no box, no reasoning), or None."""
    if len(text.strip()) < f.format_min_chars:
        return "format_short"
    if gibberish_reason(text, f) is not None:
        return "format_gibberish"
    if last_boxed_braced(text) is None:
        return "no_boxed"
    low = text.lower()
    if not any(m in low for m in FORMAT_MARKERS):
        return "no_reasoning_marker"
    return None


def degenerate_reason(text: str, f: ReleasedFilters = RELEASED) -> Optional[str]:
    """Why a rollout is filtered out by the released rules, or None; checked in the released
    code's order: too short, gibberish/collapsed, shortcut, format."""
    if len(text.strip()) < f.min_chars:
        return "too_short"
    return gibberish_reason(text, f) or shortcut_reason(text, f) or format_reason(text, f)


def _linear(rollouts, cfg: WeightingConfig) -> Weights:
    K, k = len(rollouts), sum(bool(c) for _, c in rollouts)
    if K == 0:
        return Weights(1.0, [], 0.0, 0, 0)
    p = solvability(k, K, cfg.smoothing)
    a_e = cfg.a_max - (cfg.a_max - cfg.a_min) * p
    per = cfg.beta * p / k if k > 0 and p >= cfg.p_min else 0.0
    return Weights(a_e, [per if c else 0.0 for _, c in rollouts], p, k, K)


def released_weights(rollouts, f: ReleasedFilters = RELEASED) -> Weights:
    """The `released` scheme on [(text, correct)]; `f` exists for tests (e.g. de-dup disabled)."""
    n = len(rollouts)
    grams = [ngrams(t) for t, _ in rollouts]
    kept = []  # indices surviving de-duplication, in sampling order
    for j in range(n):
        if all(jaccard(grams[j], grams[i]) < f.dup_jaccard for i in kept):
            kept.append(j)
    K_tot = len(kept)  # filtered rollouts stay in K_tot: they count as failures
    ok = [j for j in kept if degenerate_reason(rollouts[j][0], f) is None]
    pos = [j for j in ok if rollouts[j][1]]
    k = len(pos)
    fallback = Weights(1.0, [0.0] * n, k / K_tot if K_tot else 0.0, k, K_tot)
    if not ok or k == 0:
        return fallback
    # Negatives are wrong survivors only; a near copy of a positive rollout (the expert is not
    # compared) is dropped, and the rest are ranked by closeness of their similarity to 0.45.
    negs = []
    for j in ok:
        if not rollouts[j][1]:
            sim = max(jaccard(grams[j], grams[i]) for i in pos)
            if sim < f.neg_jaccard:
                negs.append((abs(sim - f.neg_target_sim), j))
    negs = sorted(negs, key=lambda x: x[0])[:f.max_negatives]  # stable: ties keep sampling order
    r = [1.0 + 2.0 * (1.0 - k / K_tot)] + [1.0] * k + [0.0] * len(negs)
    # numpy.allclose's test against the first reward (atol 1e-8, rtol 1e-5).
    if len(r) < 2 or all(abs(x - r[0]) <= 1e-8 + 1e-5 * abs(r[0]) for x in r):
        return fallback
    # The released code computes this in float32; float64 here (differences ~1e-7).
    mean = sum(r) / len(r)
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / len(r))
    s = [math.tanh(f.tanh_scale * (x - mean) / (std + f.z_eps)) for x in r]
    sigma = 1.0 / (1 + k)
    lo, hi = f.rollout_clip
    out = [0.0] * n
    for j, s_j in zip(pos, s[1:1 + k]):
        out[j] = f.rollout_scale * min(max(s_j * sigma, lo), hi)
    return Weights(s[0] * sigma, out, k / K_tot, k, K_tot, tuple(j for _, j in negs))


def weigh(scheme: str, rollouts: Sequence[tuple], cfg: Optional[WeightingConfig] = None) -> Weights:
    """The weights of one problem's rollouts (see the module docstring): `.expert` (A_E),
    `.rollouts` ([A_j per rollout], 0.0 for rollouts not trained on), and the p, k, K the scheme
    used (released: K = K_tot). The correctness flags are the caller's (the verifier's verdicts).
    Raises ValueError for an unknown scheme."""
    cfg = cfg or WeightingConfig(scheme=scheme)
    rollouts = [(str(t), bool(c)) for t, c in rollouts]
    if scheme == "constant":
        k = sum(c for _, c in rollouts)
        return Weights(1.0, [1.0 if c else 0.0 for _, c in rollouts],
                       k / len(rollouts) if rollouts else 0.0, k, len(rollouts))
    if scheme == "linear":
        return _linear(rollouts, cfg)
    if scheme == "released":
        return released_weights(rollouts)
    raise ValueError(f"weighting scheme must be one of ('linear', 'released', 'constant'), got {scheme!r}")


def weight_records(pv: ProblemVerdicts, scheme: str, cfg: Optional[WeightingConfig] = None) -> list:
    """Weight records of one problem: the expert, then every rollout with a non-zero weight."""
    rolls = sorted(pv.rollouts, key=lambda r: r["sample_index"])
    w = weigh(scheme, [(r["text"], r["correct"]) for r in rolls], cfg)
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
