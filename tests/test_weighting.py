"""Weighting schemes against values computed by hand (RASFT.md, per-sequence weights)."""
import math

import pytest

from megatron_rasft.config import WeightingConfig
from megatron_rasft.records import ProblemVerdicts
from megatron_rasft.weighting import (degenerate_reason, jaccard, ngrams, solvability, weigh,
                                      weight_records)

# Three distinct, non-degenerate rollouts (each has reasoning words, a box, few symbols).
T1 = ("First we add the two numbers step by step. Since 12 plus 30 equals 42, the total is 42. "
      "Therefore the answer is \\boxed{42}.")
T2 = ("We compute the product because the problem asks for area. The width is 6 and the height "
      "is 7, so the area is 42 square units. Thus \\boxed{42}.")
T3 = ("Let us subtract the smaller value from the larger one first. The difference is 40 minus 3 "
      "which gives 37 and we report \\boxed{37}.")


def _hand(rewards, k):
    """The reference rule written out: z-score (population std + 1e-6), tanh(0.4 z), σ = 1/(1+k)."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    s = [math.tanh(0.4 * (r - mean) / (std + 1e-6)) for r in rewards]
    sigma = 1 / (1 + k)
    return s[0] * sigma, [0.25 * min(max(x * sigma, 0.02), 0.15) for x in s[1:1 + k]]


def test_rollouts_are_not_degenerate_and_distinct():
    for t in (T1, T2, T3):
        assert degenerate_reason(t) is None
    assert jaccard(ngrams(T1), ngrams(T2)) < 0.82


def test_reference_table_K3():
    texts = [T1, T2, T3]
    # k = 0 and k = K: fallback A_E = 1, nothing trained.
    assert weigh("reference", "", [(t, False) for t in texts]) == (1.0, [0.0, 0.0, 0.0])
    assert weigh("reference", "", [(t, True) for t in texts]) == (1.0, [0.0, 0.0, 0.0])

    # k = 1: d = 1 - 1/3 = 2/3, r_E = 1 + 2·(2/3) = 7/3, group [7/3, 1, 0, 0].
    # mean = (7/3 + 1)/4 = 5/6; deviations 3/2, 1/6, -5/6, -5/6;
    # var = (9/4 + 1/36 + 25/36 + 25/36)/4 = 11/12; σ = 1/2.
    std = math.sqrt(11 / 12)
    a_e = math.tanh(0.4 * 1.5 / (std + 1e-6)) * 0.5
    a_1 = 0.25 * min(max(math.tanh(0.4 * (1 / 6) / (std + 1e-6)) * 0.5, 0.02), 0.15)
    e, r = weigh("reference", "", [(T1, True), (T2, False), (T3, False)])
    assert e == pytest.approx(a_e, abs=1e-12) and r == pytest.approx([a_1, 0.0, 0.0], abs=1e-12)
    assert e == pytest.approx(0.27788, abs=1e-4)  # the "~0.28" of RASFT.md
    assert 0.02 * 0.25 < a_1 < 0.15 * 0.25  # inside the clip

    # k = 2 (correct rollouts 1st and 3rd): d = 1/3, r_E = 5/3, group [5/3, 1, 1, 0].
    # mean = 11/12; deviations 3/4, 1/12, 1/12, -11/12; var = (9/16 + 2/144 + 121/144)/4 = 17/48; σ = 1/3.
    std = math.sqrt(17 / 48)
    a_e = math.tanh(0.4 * 0.75 / (std + 1e-6)) / 3
    s_pos = math.tanh(0.4 * (1 / 12) / (std + 1e-6)) / 3  # = 0.0187 -> clipped up to 0.02
    assert s_pos < 0.02
    e, r = weigh("reference", "", [(T1, True), (T2, False), (T3, True)])
    assert e == pytest.approx(a_e, abs=1e-12) and e == pytest.approx(0.15511, abs=1e-4)
    assert r == pytest.approx([0.25 * 0.02, 0.0, 0.25 * 0.02], abs=1e-12)
    # The helper agrees with the explicit arithmetic.
    assert _hand([7 / 3, 1, 0, 0], 1)[0] == pytest.approx(0.27788, abs=1e-4)
    # Partial success lands in the documented band, k=0 and k=K at 1.
    for k in (1, 2):
        e, _ = weigh("reference", "", [(t, i < k) for i, t in enumerate(texts)])
        assert 0.15 <= e <= 0.28


def test_reference_with_filtered_rollouts():
    dup = T1.replace("Therefore", "therefore")  # same word 3-grams after lower-casing: Jaccard 1
    degenerate = "\\boxed{42}"  # too short
    assert jaccard(ngrams(dup), ngrams(T1)) >= 0.82 and degenerate_reason(degenerate) == "too_short"
    rolls = [(T1, True), (dup, True), (degenerate, True), (T3, False)]
    # De-dup drops `dup`: K_tot = 3 (T1, degenerate, T3); the degenerate one counts as a failure,
    # so k = 1, d = 2/3, r_E = 7/3; negatives = degenerate and T3 -> group [7/3, 1, 0, 0].
    e, r = weigh("reference", "", rolls)
    a_e, (a_1,) = _hand([7 / 3, 1, 0, 0], 1)
    assert e == pytest.approx(a_e, abs=1e-12)
    assert r == pytest.approx([a_1, 0.0, 0.0, 0.0], abs=1e-12)
    # Everything filtered -> fallback.
    assert weigh("reference", "", [("\\boxed{1}", True), ("ok", True)]) == (1.0, [0.0, 0.0])


def test_reference_negative_close_to_expert_is_dropped():
    expert = T2.replace("\\boxed{42}", "\\boxed{42} (expert)")
    near = T2.replace("Thus \\boxed{42}", "Thus \\boxed{41}")  # a wrong near copy of the expert
    assert jaccard(ngrams(near), ngrams(expert)) >= 0.88
    assert jaccard(ngrams(near), ngrams(T1)) < 0.82  # survives de-dup among rollouts
    # near is dropped from the negatives: group [r_E, 1, 0] (T3 only), K_tot = 3, k = 1.
    e, r = weigh("reference", expert, [(T1, True), (near, False), (T3, False)])
    a_e, (a_1,) = _hand([1 + 2 * (2 / 3), 1, 0], 1)
    assert e == pytest.approx(a_e, abs=1e-12) and r == pytest.approx([a_1, 0.0, 0.0], abs=1e-12)
    # Without the expert resembling it, near stays a negative: group [7/3, 1, 0, 0].
    e2, _ = weigh("reference", "unrelated", [(T1, True), (near, False), (T3, False)])
    assert e2 == pytest.approx(_hand([7 / 3, 1, 0, 0], 1)[0], abs=1e-12) and e2 != pytest.approx(e)


@pytest.mark.parametrize("reason,text", [
    ("repeated_lines", "We add the numbers step by step here.\n" * 3 + "So the sum is \\boxed{3} because yes."),
    ("self_corrections", "First we add 1 and 2. Wait, that is odd. Actually we should add 2 and 1, "
                         "so the answer is \\boxed{3}."),
    ("symbols", "We have $\\{\\{x\\}\\}^{(2)}_{[3]} = \\{\\{y\\}\\}^{(2)}_{[3]}$ so \\boxed{3}"),
    ("no_boxed", "First we add the two numbers, since the question asks for the total sum 3."),
    ("shortcut", "The answer is obviously given by the formula, \\boxed{3}, since it is trivial."),
    ("no_reasoning_marker", "Looking at the two numbers carefully in the question we report \\boxed{3}."),
])
def test_degenerate_filters(reason, text):
    assert degenerate_reason(text) == reason


def test_linear_matches_formula_and_is_monotone():
    cfg = WeightingConfig(scheme="linear", a_max=1.0, a_min=0.2, beta=0.5)
    K = 4
    prev_e, prev_tot = math.inf, -math.inf
    for k in range(K + 1):
        rolls = [(f"r{i}", i < k) for i in range(K)]
        e, r = weigh("linear", "", rolls, cfg)
        p = k / K
        assert e == pytest.approx(1.0 - 0.8 * p)
        assert sum(r) == pytest.approx(0.5 * p)
        assert all(x == 0.0 for x, (_, c) in zip(r, rolls) if not c)
        assert e <= prev_e and sum(r) >= prev_tot
        prev_e, prev_tot = e, sum(r)
    assert weigh("linear", "", [], cfg) == (1.0, [])
    # p_min gates the rollouts, Beta smoothing moves p.
    assert weigh("linear", "", [("a", True), ("b", False), ("c", False), ("d", False)],
                 WeightingConfig(p_min=0.5))[1] == [0.0] * 4
    sm = WeightingConfig(smoothing=(1, 1))
    e, r = weigh("linear", "", [("a", True), ("b", False)], sm)
    assert e == pytest.approx(1.0 - 0.8 * 0.5) and r == pytest.approx([0.25, 0.0])


def test_constant_and_errors():
    assert weigh("constant", "", [("a", True), ("b", False)]) == (1.0, [1.0, 0.0])
    with pytest.raises(ValueError, match="scheme"):
        weigh("cosine", "", [])
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
