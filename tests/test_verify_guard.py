"""The default `math` mode does not inherit math-verify's leniency (issue #22): a generated battery
of expressions with tiny values that math-verify rounds together, and of answers with more parts
than math-verify reads, all graded wrong; and positive controls (equal values in other forms, tiny
ones included) all graded correct, so the rule is not simply strict. In process and through the
worker pool."""
import random

from megatron_rasft.verify.guard import answer_parts
from megatron_rasft.verify.mathv import MathVerifier, grade_math


def tiny_value_pairs(seed: int = 0, per_form: int = 2) -> list:
    """(gold, prediction) pairs with different values that math-verify rounds together (their
    difference is below its 15-digit chop, or underflows a float)."""
    rng = random.Random(seed)
    forms = [
        lambda: (f"\\frac{{1}}{{{(n := rng.randint(30, 2500))}!}}", f"\\frac{{1}}{{{n + rng.randint(1, 3)}!}}"),
        lambda: (f"e^{{-{(a := rng.randint(36, 400))}}}", f"e^{{-{a + rng.randint(1, 5)}}}"),
        lambda: (f"\\frac{{\\sqrt{{{(c := rng.randint(2, 50))}}}}}{{10^{{{(k := rng.randint(16, 60))}}}}}",
                 f"\\frac{{\\sqrt{{{c + 1}}}}}{{10^{{{k}}}}}"),
        lambda: (f"x + 10^{{-{(k := rng.randint(16, 60))}}}", f"x + {rng.randint(2, 9)}\\cdot 10^{{-{k}}}"),
        lambda: (f"\\pi \\cdot 2^{{-{(k := rng.randint(60, 300))}}}", f"\\pi \\cdot 2^{{-{k + 1}}}"),
        lambda: (f"\\sin(10^{{-{(k := rng.randint(16, 40))}}})", f"\\sin({rng.randint(2, 9)}\\cdot 10^{{-{k}}})"),
        lambda: (f"\\{{\\frac{{\\pi}}{{10^{{{(k := rng.randint(16, 40))}}}}}, 1\\}}", f"\\{{\\frac{{3}}{{10^{{{k}}}}}, 1\\}}"),
        lambda: (f"y = \\frac{{\\sqrt{{2}}}}{{10^{{{(k := rng.randint(16, 40))}}}}}", f"y = \\frac{{\\sqrt{{3}}}}{{10^{{{k}}}}}"),
        lambda: (f"\\frac{{2005!}}{{{(n := rng.randint(2030, 2500))}!}}", f"\\frac{{2006!}}{{{n + 1}!}}"),
    ]
    return [form() for form in forms for _ in range(per_form)]


def extra_part_pairs(seed: int = 0, per_form: int = 2) -> list:
    """(gold, prediction) pairs where the prediction gives the gold and another value, in ways
    math-verify reads as one of the two."""
    rng = random.Random(seed)
    seps = ["{u} \\\\ {v}", "{u} \\lor {v}", "{u} | {v}", "{u} \\text{{ (or }} {v})", "{u} \\text{{ , }} {v}",
            "{v} \\text{{ cm and }} {u} \\text{{ cm}}", "{u} = {v}", "x = {u} = {v}", "{u} \\text{{ (and also }} {v})",
            "{v} \\quad \\text{{or}} \\quad {u}", "{u} \\; \\text{{and}} \\; {v}"]
    pairs = []
    for sep in seps:
        for _ in range(per_form):
            v = rng.choice([str(rng.randint(2, 99)), f"\\frac{{{rng.randint(1, 9)}}}{{{rng.randint(11, 19)}}}",
                            f"\\sqrt{{{rng.choice([2, 3, 5, 7])}}}"])
            u = str(rng.randint(100, 999))
            pairs.append((v, sep.format(u=u, v=v)))
    return pairs


POSITIVE = [
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "\\frac{2}{4}"), ("5\\text{ cm}", "5"),
    ("12", "12 \\text{ inches}"), ("\\sqrt{2}", "1.4142136"), ("2\\sqrt{2}", "\\sqrt{8}"), ("x=3", "3"), ("5", "2+3=5"),
    ("\\{1,2\\}", "\\{2, 1\\}"), ("1\\pm\\sqrt{2}", "1+\\sqrt{2},1-\\sqrt{2}"), ("3x-y+13=0", "-3x+y-13=0"),
    ("(1,3]", "(1, 3]"), ("1,000", "1000"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), ("|x-1|", "|1-x|"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), ("3, 5", "5, 3"),
    # tiny values, equal in other forms
    ("\\frac{1}{2004!}", "\\frac{2005\\cdot 2006}{2006!}"), ("e^{-40}", "\\frac{1}{e^{40}}"),
    ("x + 10^{-20}", "10^{-20} + x"), ("\\frac{\\sqrt{8}}{10^{20}}", "\\frac{2\\sqrt{2}}{10^{20}}"),
    ("y = \\frac{x}{10^{30}}", "y = 10^{-30} x"), ("\\{10^{-20}, 1\\}", "\\{1, \\frac{1}{10^{20}}\\}"),
    ("\\pi \\cdot 2^{-100}", "\\frac{\\pi}{2^{100}}"), ("\\sin(10^{-30})", "\\sin(\\frac{1}{10^{30}})"),
]


def _grade(pairs):
    return [grade_math("so \\boxed{" + p + "}", g)["correct"] for g, p in pairs]


def test_issue_case_in_every_path():
    assert grade_math("\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}")["reason"] == "wrong"
    assert grade_math("\\boxed{3 \\\\ 5}", "5")["reason"] == "wrong"
    with MathVerifier(num_workers=1, timeout_s=20) as v:
        out = v.grade([("\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}"), ("\\boxed{e^{-41}}", "e^{-40}"),
                       ("\\boxed{\\frac{2005\\cdot 2006}{2006!}}", "\\frac{1}{2004!}")])
    assert [o["reason"] for o in out] == ["wrong", "wrong", "correct"]


def test_generated_tiny_values_are_wrong():
    pairs = tiny_value_pairs()
    # The battery is meaningful: math-verify alone accepts most of it.
    lenient = sum(grade_math("\\boxed{" + p + "}", g, mode="math-verify")["correct"] for g, p in pairs)
    assert lenient >= len(pairs) * 3 // 4, lenient
    wrongly_correct = [pg for pg, ok in zip(pairs, _grade(pairs)) if ok]
    assert wrongly_correct == []


def test_generated_extra_parts_are_wrong():
    pairs = extra_part_pairs()
    lenient = sum(grade_math("\\boxed{" + p + "}", g, mode="math-verify")["correct"] for g, p in pairs)
    assert lenient >= len(pairs) // 2, lenient
    wrongly_correct = [pg for pg, ok in zip(pairs, _grade(pairs)) if ok]
    assert wrongly_correct == []


def test_positive_controls_stay_correct():
    wrongly_wrong = [pg for pg, ok in zip(POSITIVE, _grade(POSITIVE)) if not ok]
    assert wrongly_wrong == []


def test_answer_parts():
    assert [answer_parts(s) for s in ("3", "3, 5", "(3, 5)", "\\{1, 2\\}", "1,000", "|x-1|", "3 | 5", "3 \\\\ 5",
                                      "3 \\text{ cm and } 5 \\text{ cm}", "3 \\text{ (or } 5)", "\\text{Evelyn}",
                                      "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "3 or 5", "\\cos x")] == \
        [1, 2, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 2, 1]
