"""Math verifier: extraction, equivalence battery, MATH-500 self-consistency, hard timeouts."""
import json
import os
import time

import pytest

from megatron_rasft.verify.mathv import MathVerifier, gold_answer, grade_math
from megatron_rasft.verify.pool import TimeoutPool
from megatron_rasft.verify.reference import last_boxed, normalize_answer, reference_equal

MATH500 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchmarks", "math500.jsonl")


def test_last_boxed():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\left\{ x \mid x^{2} > 0 \right\}}") == r"\left\{ x \mid x^{2} > 0 \right\}"
    assert last_boxed(r"so \fbox{42}.") == "42"
    assert last_boxed(r"thus \boxed 7$.") == "7"
    assert last_boxed(r"\boxed{1} then \boxed{2") == "1"  # unclosed last box: previous one
    assert last_boxed("no box here") is None


EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"), (r"\dfrac12", r"\frac{1}{2}"), ("1/2", r"\tfrac{1}{2}"),
    (r"2\sqrt{2}", r"\sqrt{8}"), (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    (r"(1, 3]", r"(1,3]"), (r"[-2, \infty)", r"[-2,\infty)"), ("(1, 2)", "(1,2)"),
    (r"5\text{ cm}", "5"), (r"90^\circ", "90"), (r"50\%", "50"), ("1,000", "1000"),
    ("x = 3", "3"), (r"\pi/2", r"\frac{\pi}{2}"), ("3.50", "3.5"), (r"\$18.90", "18.9"),
]
NOT_EQUIVALENT = [
    (r"\frac{1}{3}", "0.33"), (r"\sqrt{2}", "1.41"), ("(1, 3]", "[1, 3]"), ("(1, 2)", "(2, 1)"),
    ("5", "6"), (r"2\pi", r"\pi"), ("x^2", "x^3"), ("12", "120"),
]


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=2, timeout_s=10) as v:
        yield v


def test_battery(verifier):
    pairs = [(f"... so \\boxed{{{pred}}}", gold) for pred, gold in EQUIVALENT + NOT_EQUIVALENT]
    out = verifier.grade(pairs)
    got = [v["correct"] for v in out]
    want = [True] * len(EQUIVALENT) + [False] * len(NOT_EQUIVALENT)
    bad = [(p, g) for (p, g), a, b in zip(EQUIVALENT + NOT_EQUIVALENT, got, want) if a != b]
    assert bad == []
    assert [v["reason"] for v in out] == ["correct" if w else "wrong" for w in want]


def test_reasons_and_reference_mode():
    assert grade_math("no box", "1")["reason"] == "no_answer"
    assert grade_math(r"\boxed{}", "1")["reason"] == "no_answer"
    assert grade_math(r"\boxed{1}", None)["reason"] == "error"
    # reference: normalised strings only — equal after normalisation, but no algebra.
    assert grade_math(r"\boxed{\dfrac12}", "0.5", mode="reference")["correct"]
    assert not grade_math(r"\boxed{2\sqrt{2}}", r"\sqrt{8}", mode="reference")["correct"]
    assert grade_math(r"\boxed{2\sqrt{2}}", r"\sqrt{8}", mode="math")["correct"]
    assert normalize_answer(r"\left( 3, \frac12 \right)") == r"(3,\frac{1}{2})"
    assert reference_equal("1,000", "1000") and not reference_equal("(1,000)", "1000")
    # The ground truth falls back to the expert's last box.
    assert gold_answer(None, r"... \boxed{7}") == "7" and gold_answer("8", r"\boxed{7}") == "8"


def test_math500_self_consistency():
    with open(MATH500) as f:
        answers = [json.loads(line)["answer"] for line in f]
    assert len(answers) == 500
    t0 = time.monotonic()
    with MathVerifier(num_workers=2, timeout_s=10, mode="math-verify") as v:  # sympy path only
        out = v.grade([("\\boxed{" + a + "}", a) for a in answers])
    elapsed = time.monotonic() - t0
    ok = sum(v["correct"] for v in out)
    assert ok / len(answers) >= 0.99, [(a, v) for a, v in zip(answers, out) if not v["correct"]]
    assert elapsed < 45


def test_pathological_input_times_out():
    # 7^(10^8) makes sympy compute a ~84-million-digit integer: minutes without a timeout.
    patho = (r"\boxed{7^{10^{8}}}", "1")
    with MathVerifier(num_workers=1, timeout_s=3) as v:  # math-verify's own alarm catches it
        t0 = time.monotonic()
        assert v.grade([patho])[0]["reason"] == "timeout"
        assert time.monotonic() - t0 < 8
    with MathVerifier(num_workers=1, timeout_s=2, soft_timeout=False) as v:  # only the hard kill
        t0 = time.monotonic()
        out = v.grade([patho, (r"\boxed{2}", "2")])
        assert [o["reason"] for o in out] == ["timeout", "correct"]  # the pool recovered
        assert time.monotonic() - t0 < 15 and v.pool.restarts == 1


def test_pool_kills_and_replaces_stuck_workers():
    with TimeoutPool(2) as pool:
        t0 = time.monotonic()
        out = pool.map(time.sleep, [30, 0, 30, 0], timeout_s=1)
        assert [o.status for o in out] == ["timeout", "ok", "timeout", "ok"]
        assert time.monotonic() - t0 < 10 and pool.restarts == 2
        out = pool.map(int, ["3", "x"], timeout_s=5)
        assert out[0].value == 3 and out[1].status == "error" and "ValueError" in out[1].error
