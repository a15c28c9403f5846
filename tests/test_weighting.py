"""Weighting schemes against values computed by hand (RASFT.md, per-sequence weights)."""
import math

import pytest

from megatron_rasft.config import WeightingConfig
from megatron_rasft.records import ProblemVerdicts
from megatron_rasft.methods.weighting import (ReleasedFilters, degenerate_reason, format_reason, gibberish_reason,
                                      jaccard, ngrams, released_weights, shortcut_reason, solvability,
                                      weigh, weight_records)


def pair(scheme, rollouts, cfg=None):
    """(A_E, [A_j]) of `weigh`."""
    w = weigh(scheme, rollouts, cfg)
    return w.expert, w.rollouts


# Three distinct rollouts that pass every reference filter (>= 180 characters, a box, "=" / "so ",
# no repeated sentence or 8-word window, few symbols).
T1 = ("First we add the two numbers step by step. Since 12 plus 30 equals 42, the total is 42 apples "
      "in the basket, which is the quantity the question asks about. Therefore the answer is \\boxed{42}.")
T2 = ("We compute the product because the problem asks for the area of the rectangle. The width is 6 "
      "and the height is 7, so the area is 6 * 7 = 42 square units, counted in full. Thus \\boxed{42}.")
T3 = ("Let us subtract the smaller value from the larger one first. The difference is 40 minus 3, "
      "which gives 37; checking the result by adding 3 back to it we recover the original 40 again, "
      "and we report \\boxed{37}.")
SHORT = "\\boxed{42} since 40+2"  # 20+ characters but a shortcut (a box in a text under 120)


def _hand(rewards, k):
    """The reference rule written out: z-score (population std + 1e-6), tanh(0.4 z), σ = 1/(1+k)."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    s = [math.tanh(0.4 * (r - mean) / (std + 1e-6)) for r in rewards]
    sigma = 1 / (1 + k)
    return s[0] * sigma, [0.25 * min(max(x * sigma, 0.02), 0.15) for x in s[1:1 + k]]


def test_ngrams_and_jaccard():
    assert ngrams("A  b\nC d") == {("a", "b", "c"), ("b", "c", "d")}  # lower-cased, whitespace collapsed
    assert ngrams("two words") == set()
    assert jaccard(set(), set()) == 1.0 and jaccard(set(), {("a",)}) == 0.0
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5


def test_rollouts_are_clean_and_distinct():
    for t in (T1, T2, T3):
        assert degenerate_reason(t) is None, t
    for a, b in ((T1, T2), (T1, T3), (T2, T3)):
        assert jaccard(ngrams(a), ngrams(b)) < 0.82


def test_reference_table_K3():
    texts = [T1, T2, T3]
    # k = 0 and k = K: fallback A_E = 1, nothing trained.
    assert pair("released", [(t, False) for t in texts]) == (1.0, [0.0, 0.0, 0.0])
    assert pair("released", [(t, True) for t in texts]) == (1.0, [0.0, 0.0, 0.0])

    # k = 1: d = 1 - 1/3 = 2/3, r_E = 1 + 2·(2/3) = 7/3, group [7/3, 1, 0, 0].
    # mean = (7/3 + 1)/4 = 5/6; deviations 3/2, 1/6, -5/6, -5/6;
    # var = (9/4 + 1/36 + 25/36 + 25/36)/4 = 11/12; σ = 1/2.
    std = math.sqrt(11 / 12)
    a_e = math.tanh(0.4 * 1.5 / (std + 1e-6)) * 0.5
    a_1 = 0.25 * min(max(math.tanh(0.4 * (1 / 6) / (std + 1e-6)) * 0.5, 0.02), 0.15)
    e, r = pair("released", [(T1, True), (T2, False), (T3, False)])
    assert e == pytest.approx(a_e, abs=1e-12) and r == pytest.approx([a_1, 0.0, 0.0], abs=1e-12)
    assert e == pytest.approx(0.27788, abs=1e-4)  # the "~0.28" of RASFT.md
    assert 0.02 * 0.25 < a_1 < 0.15 * 0.25  # inside the clip

    # k = 2 (correct rollouts 1st and 3rd): d = 1/3, r_E = 5/3, group [5/3, 1, 1, 0].
    # mean = 11/12; deviations 3/4, 1/12, 1/12, -11/12; var = (9/16 + 2/144 + 121/144)/4 = 17/48; σ = 1/3.
    std = math.sqrt(17 / 48)
    a_e = math.tanh(0.4 * 0.75 / (std + 1e-6)) / 3
    s_pos = math.tanh(0.4 * (1 / 12) / (std + 1e-6)) / 3  # = 0.0187 -> clipped up to 0.02
    assert s_pos < 0.02
    e, r = pair("released", [(T1, True), (T2, False), (T3, True)])
    assert e == pytest.approx(a_e, abs=1e-12) and e == pytest.approx(0.15511, abs=1e-4)
    assert r == pytest.approx([0.25 * 0.02, 0.0, 0.25 * 0.02], abs=1e-12)
    # The general rule (`_hand`) on the groups derived above gives what the code gives.
    for rolls, group, k in (([(T1, True), (T2, False), (T3, False)], [7 / 3, 1, 0, 0], 1),
                            ([(T1, True), (T2, False), (T3, True)], [5 / 3, 1, 1, 0], 2)):
        e, r = pair("released", rolls)
        hand_e, hand_pos = _hand(group, k)
        assert e == pytest.approx(hand_e, abs=1e-12)
        assert [x for x, (_, ok) in zip(r, rolls) if ok] == pytest.approx(hand_pos, abs=1e-12)


def test_filtered_rollouts_count_in_K_but_never_enter_the_group():
    # [correct clean, wrong but filtered]: K_tot = 2, k = 1, no negatives -> group [1 + 2·(1/2), 1] = [2, 1]
    # (the earlier rule put the filtered one in as a negative: [2, 1, 0]).
    # mean 3/2, population std 1/2, z = ±(1/2)/(1/2 + 1e-6); σ = 1/2.
    e, r = pair("released", [(T1, True), (SHORT, False)])
    z = 0.5 / (0.5 + 1e-6)
    assert e == pytest.approx(math.tanh(0.4 * z) / 2, abs=1e-12) and e == pytest.approx(0.19002, abs=1e-4)
    assert r == pytest.approx([0.25 * 0.02, 0.0], abs=1e-12)  # tanh(-0.4 z)/2 < 0: clipped up to 0.02
    assert e != pytest.approx(_hand([2, 1, 0], 1)[0])
    # A correct but filtered rollout is a failure, not a positive: [T1 ok, SHORT "correct", T3 wrong]
    # -> K_tot = 3, k = 1, negatives [T3] -> group [7/3, 1, 0] (not [7/3, 1, 0, 0]).
    w = released_weights([(T1, True), (SHORT, True), (T3, False)])
    a_e, (a_1,) = _hand([7 / 3, 1, 0], 1)
    assert (w.k, w.K, w.negatives) == (1, 3, (2,))
    assert w.expert == pytest.approx(a_e, abs=1e-12) and w.rollouts == pytest.approx([a_1, 0.0, 0.0], abs=1e-12)
    # De-dup first: a lower-cased copy of T1 has the same 3-grams (Jaccard 1) and is not counted.
    dup = T1.replace("First", "FIRST")
    w = released_weights([(T1, True), (dup, True), (T3, False)])
    assert (w.k, w.K) == (1, 2) and w.rollouts[1] == 0.0


def test_fallbacks():
    assert pair("released", []) == (1.0, [])
    assert pair("released", [(SHORT, True), ("ok", True)]) == (1.0, [0.0, 0.0])  # no survivors
    assert pair("released", [(T1, False), (T2, False)]) == (1.0, [0.0, 0.0])  # k = 0
    assert pair("released", [(T1, True), (T2, True)]) == (1.0, [0.0, 0.0])  # all rewards 1


def _words_text(words):
    # A survivor made of the given words: long, "=" present, a box.
    return " ".join(words) + " so x = 1 and \\boxed{1}"


def test_negatives_ranked_by_distance_to_045_and_dropped_near_positives():
    pos = [f"p{i}" for i in range(60)]
    # A negative sharing the first m words of the positive: similarities ~0.0, ~0.3, ~0.5, ~0.7.
    negs = [pos[:m] + [f"n{m}_{i}" for i in range(60 - m)] for m in (0, 28, 40, 50)]
    texts = [_words_text(pos)] + [_words_text(n) for n in negs]
    sims = [jaccard(ngrams(t), ngrams(texts[0])) for t in texts[1:]]
    assert sims[0] < 0.05 and 0.25 < sims[1] < 0.35 and 0.45 < sims[2] < 0.55 and 0.65 < sims[3] < 0.8
    w = released_weights([(texts[0], True)] + [(t, False) for t in texts[1:]])
    assert w.K == 5 and w.k == 1
    # |sim - 0.45|: ~0.45, ~0.15, ~0.05, ~0.25 -> keep rollouts 3, 2, 4 (the farthest, 1, is out).
    assert w.negatives == (3, 2, 4)
    # Ties keep sampling order (stable sort): two negatives equally far from the positive.
    twin = [f"m_{i}" for i in range(60)]
    w = released_weights([(texts[0], True), (_words_text(twin), False), (texts[1], False)])
    assert w.negatives == (1, 2)


def test_near_positive_negative_rule_compares_positive_rollouts_only():
    # With de-dup on, a wrong rollout >= 0.88 similar to a kept positive was already dropped at 0.82;
    # with de-dup off the 0.88 rule drops it from the negatives (it still counts in K_tot).
    pos = [f"p{i}" for i in range(60)]
    near = _words_text(pos[:-1] + ["q"])
    assert jaccard(ngrams(near), ngrams(_words_text(pos))) >= 0.88
    rolls = [(_words_text(pos), True), (near, False), (T3, False)]
    w = released_weights(rolls, ReleasedFilters(dup_jaccard=1.01))
    assert (w.k, w.K, w.negatives) == (1, 3, (2,))
    assert released_weights(rolls).K == 2
    # The expert is not compared: a wrong near copy of the expert stays a negative.
    near_expert = T2.replace("Thus \\boxed{42}", "Thus \\boxed{41}")
    e, _ = pair("released", [(T1, True), (near_expert, False), (T3, False)])
    assert e == pytest.approx(_hand([7 / 3, 1, 0, 0], 1)[0], abs=1e-12)


BASE = T1.replace("Therefore the answer is \\boxed{42}.", "")  # clean prose, no box (~150 characters)


@pytest.mark.parametrize("reason,text", [
    ("too_short", "  \\boxed{42} = 42  "),
    ("repeated_sentence", T1 + " We check the sum once more." * 3),
    ("repeated_window", T1 + " then we add four and three to get seven," * 3),
    ("self_corrections", T1 + " Wait, let me correct that; it is fine."),
    ("shortcut_phrase", T1.replace("Therefore the answer", "Therefore, the correct answer")),
    ("shortcut_phrase", BASE + " The correct answer is: \\boxed{42}"),
    ("shortcut_choice", "We weigh the options given in the question one by one; only option B fits "
                        "every condition listed, so we choose it = \\boxed{B}."),
    ("shortcut_short", "We expand the square and collect terms, so the polynomial = \\boxed{x^2+2x+1}."),
    ("format_short", "We add twelve and thirty and get forty two"),
    ("no_boxed", BASE),
    ("no_boxed", BASE + " \\fbox{42} and \\boxed{42"),  # only a closed \boxed{} counts
    ("no_reasoning_marker", "Looking at the two numbers carefully, the first one is twelve and the "
                            "second one is thirty, and adding them up gives forty two as the total count "
                            "of apples in the basket, which is what the question wants here \\boxed{42}."),
])
def test_filters_trigger(reason, text):
    assert degenerate_reason(text) == reason


@pytest.mark.parametrize("text", [
    T1 + " We check the sum once more." * 2,  # a sentence twice only
    T1 + " Wait, it is fine.",  # one marker
    T1 + " Rechecking, rechecking.",  # one marker twice
    T1.replace("Therefore the answer", "Therefore, the answer"),  # no "correct answer" phrase
    T1.replace("\\boxed{42}", "\\boxed{B}"),  # a choice-like box in a text of >= 180 characters
])
def test_filters_pass(text):
    assert degenerate_reason(text) is None


def test_filter_thresholds():
    assert gibberish_reason("x" * 58 + "+" * 42) is None  # symbol share 0.42: not above
    assert gibberish_reason("x" * 57 + "+" * 43) == "symbols"
    assert gibberish_reason(("a" * 12 + ".") * 3) == "repeated_sentence"
    assert gibberish_reason(("a" * 11 + ".") * 3) is None  # sentences under 12 characters
    loop = " ".join(["a b c d e f g h"] * 3)  # 24 words: the window test needs 30
    assert gibberish_reason(loop) is None and gibberish_reason(loop + " i j k l m n") == "repeated_window"
    assert format_reason("x" * 100) == "no_boxed" and format_reason("x" * 70 + " = 1 \\boxed{1}") is None
    assert format_reason("x" * 60 + " = 1 \\boxed{1}") == "format_short"  # under 80 characters
    assert format_reason(("a" * 12 + ".") * 7) == "format_gibberish"
    assert shortcut_reason("x" * 200 + " \\boxed{B}") is None and shortcut_reason("x" * 150 + " \\boxed{B}") == "shortcut_choice"
    assert shortcut_reason("x" * 130 + " \\boxed{y}") is None and shortcut_reason("x" * 100 + " \\boxed{y}") == "shortcut_short"


def test_linear_matches_formula_and_is_monotone():
    cfg = WeightingConfig(scheme="linear", a_max=1.0, a_min=0.2, beta=0.5)
    K = 4
    prev_e, prev_tot = math.inf, -math.inf
    for k in range(K + 1):
        rolls = [(f"r{i}", i < k) for i in range(K)]
        e, r = pair("linear", rolls, cfg)
        p = k / K
        assert e == pytest.approx(1.0 - 0.8 * p)
        assert sum(r) == pytest.approx(0.5 * p)
        assert all(x == 0.0 for x, (_, c) in zip(r, rolls) if not c)
        assert e <= prev_e and sum(r) >= prev_tot
        prev_e, prev_tot = e, sum(r)
    assert pair("linear", [], cfg) == (1.0, [])
    # p_min gates the rollouts, Beta smoothing moves p.
    assert pair("linear", [("a", True), ("b", False), ("c", False), ("d", False)],
                 WeightingConfig(p_min=0.5))[1] == [0.0] * 4
    sm = WeightingConfig(smoothing=(1, 1))
    e, r = pair("linear", [("a", True), ("b", False)], sm)
    assert e == pytest.approx(1.0 - 0.8 * 0.5) and r == pytest.approx([0.25, 0.0])


def test_constant_and_errors():
    assert pair("constant", [("a", True), ("b", False)]) == (1.0, [1.0, 0.0])
    with pytest.raises(ValueError, match="scheme"):
        pair("cosine", [])
    assert solvability(1, 4) == 0.25 and solvability(0, 2, (1, 1)) == 0.25
    with pytest.raises(ValueError, match="k <= K"):
        solvability(3, 2)
    with pytest.raises(ValueError, match="K=0"):
        solvability(0, 0)


def test_weight_records():
    pv = ProblemVerdicts("p1", 2, "expert", [
        {"sample_index": 1, "text": "b", "correct": False, "reason": "wrong", "extracted": "1"},
        {"sample_index": 0, "text": "a", "correct": True, "reason": "correct", "extracted": "2"}])
    recs = weight_records(pv, "linear")
    assert [(r.kind, r.sample_index) for r in recs] == [("expert", None), ("rollout", 0)]
    assert recs[0].weight == pytest.approx(0.6) and recs[1].weight == pytest.approx(0.25)
    assert all((r.p, r.k, r.K, r.round) == (0.5, 1, 2, 2) for r in recs)
