"""Math grading battery: (gold, prediction, right verdict) pairs, the issue's false positives among
them; MATH-500 gold self-consistency and a shuffled-answer control in the default mode."""
import json
import os
import random
import time

import pytest

from megatron_rasft.verify.guard import values_agree
from megatron_rasft.verify.mathv import MathVerifier, grade_math
from megatron_rasft.verify.answers import exact_number, normalize_answer, numbers_equal, own_verdict

MATH500 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchmarks", "math500.jsonl")

# (gold, prediction inside \boxed{}, right verdict)
BATTERY = [
    # large integers: exact, no relative tolerance
    ("1000000", "1000001", False), ("1234567", "1234568", False), ("123456789012345678", "123456789012345679", False),
    ("1000000", "10^{6}", True), ("1000000", "1,000,000", True), ("2^{20}", "1048576", True),
    # tiny values: compared by their own size
    ("0.0000001", "0.0000002", False), ("1.0000001", "1.0000002", False), ("0.1234567", "0.1234568", False),
    ("0.0000001", "10^{-7}", True), ("0.0000001", "1\\times10^{-7}", True),
    ("1.5\\times10^{-9}", "1.6\\times10^{-9}", False), ("\\frac{1}{10^{7}}", "\\frac{2}{10^{7}}", False),
    ("\\frac{\\pi}{10^{7}}", "\\frac{2\\pi}{10^{7}}", False), ("3.0\\times10^{-8}", "0.00000003", True),
    # exact rationals and decimals
    ("\\frac{1}{2}", "0.5", True), ("\\frac{1}{3}", "0.33", False), ("\\frac{1}{3}", "0.3333333", True),
    ("3.50", "3.5", True), ("3.14159", "3.14160", False), ("-\\frac{3}{4}", "-0.75", True), ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("\\sqrt{2}", "1.41", False), ("\\sqrt{2}", "1.4142136", True),
    # variables and equations
    ("x=3", "y=3", False), ("x=3", "3", True), ("3", "x=3", True), ("x=3", "x=3.0", True), ("x=3", "x=4", False),
    ("3x-y+13=0", "-3x+y-13=0", True), ("y=2x+1", "y=2x+2", False), ("2x+1", "2y+1", False), ("x^2", "x^3", False),
    # intervals
    ("(1,3]", "(1, 3]", True), ("(1,3]", "[1,3]", False), ("[-2,\\infty)", "[-2, \\infty)", True), ("(1,2)", "(2,1)", False),
    # sets
    ("\\{1,2\\}", "\\{2,1\\}", True), ("\\{1,2\\}", "\\{1,3\\}", False), ("\\{0.0000001, 1\\}", "\\{0.0000002, 1\\}", False),
    # units
    ("5\\text{ cm}", "5", True), ("5\\text{ cm}", "6", False), ("90^\\circ", "90", True), ("12\\text{ inches}", "12", True),
    # percentages
    ("50\\%", "50", True), ("50\\%", "0.5", True), ("50\\%", "5", False), ("12.5\\%", "0.125", True),
    # thousands separators
    ("1,000", "1000", True), ("12,345", "12346", False), ("\\$18.90", "18.9", True),
    # \pm
    ("1\\pm\\sqrt{2}", "1+\\sqrt{2},1-\\sqrt{2}", True), ("1\\pm\\sqrt{2}", "1+\\sqrt{2}", False),
    ("2\\pm\\sqrt{3}", "1\\pm\\sqrt{3}", False),
    # symbolic forms
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True), ("2\\pi", "\\pi", False),
]


def test_battery_in_process():
    t0 = time.monotonic()
    got = [grade_math("... so \\boxed{" + pred + "}", gold)["correct"] for gold, pred, _ in BATTERY]
    bad = [(g, p, want) for (g, p, want), ok in zip(BATTERY, got) if ok != want]
    assert bad == []
    assert len(BATTERY) >= 40
    print(f"{len(BATTERY)} pairs in {time.monotonic() - t0:.1f} s")


def test_battery_through_the_pool():
    with MathVerifier(num_workers=2, timeout_s=10) as v:
        out = v.grade([("\\boxed{" + p + "}", g) for g, p, _ in BATTERY])
    assert [o["reason"] for o in out] == ["correct" if want else "wrong" for _, _, want in BATTERY]


def test_own_rule_is_three_valued():
    assert own_verdict("1000001", "1000000") is False
    assert own_verdict("y=3", "x=3") is False
    assert own_verdict("-3x+y-13=0", "3x-y+13=0") is None  # left to math-verify
    assert own_verdict("10^{-7}", "0.0000001") is True
    assert exact_number(normalize_answer("1.5\\times10^{-7}"))[1] == 8  # places given
    assert numbers_equal(exact_number("0.3333333"), exact_number("\\frac{1}{3}"))
    assert not numbers_equal(exact_number("0.3"), exact_number("\\frac{1}{3}"))  # agrees in its one place, not within 1e-6
    assert normalize_answer("x = 3") == "3" and normalize_answer("x = 3", keep_lhs=True) == "x=3"


def test_values_agree():
    import sympy
    assert not values_agree(sympy.Float("1e-7"), sympy.Float("2e-7"))
    assert values_agree(sympy.sqrt(2), sympy.Float("1.4142136"))
    assert values_agree(sympy.Symbol("x"), sympy.Symbol("x"))
    x = sympy.Symbol("x")  # a float inside a symbolic expression is compared by its own size too
    assert not values_agree(sympy.Float("1e-7") * x, sympy.Float("2e-7") * x)


def _math500():
    with open(MATH500) as f:
        return [json.loads(line)["answer"] for line in f]


@pytest.fixture(scope="module")
def math500_verdicts():
    answers = _math500()
    shuffled = answers[:]
    random.Random(0).shuffle(shuffled)
    t0 = time.monotonic()
    with MathVerifier(num_workers=2, timeout_s=10) as v:  # the default mode, "math"
        same = v.grade([("\\boxed{" + a + "}", a) for a in answers])
        # A subset keeps the test short: `benchmarks/bench_verify.py` grades all 492 such pairs.
        other = v.grade([("\\boxed{" + b + "}", a) for a, b in zip(answers, shuffled) if a != b][:200])
    return answers, same, other, time.monotonic() - t0


def test_math500_gold_self_consistency(math500_verdicts):
    answers, same, _, elapsed = math500_verdicts
    rate = sum(v["correct"] for v in same) / len(answers)
    assert rate >= 0.995, [(a, v) for a, v in zip(answers, same) if not v["correct"]]
    print(f"MATH-500 gold self-consistency {rate:.4f} ({elapsed:.1f} s for both checks)")


def test_math500_shuffled_answer_control(math500_verdicts):
    _, _, other, _ = math500_verdicts
    rate = sum(v["correct"] for v in other) / len(other)
    assert rate <= 0.03
    print(f"MATH-500 shuffled-answer control: {rate:.4f} of {len(other)} pairs graded correct")
