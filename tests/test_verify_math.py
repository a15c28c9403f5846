"""Math verifier: extraction, equivalence battery, MATH-500 self-consistency, hard timeouts."""
import json
import os
import time

import pytest

from megatron_rasft.verify.mathv import MathVerifier, gold_answer, grade_math
from megatron_rasft.verify.pool import TimeoutPool
from megatron_rasft.verify import answers
from megatron_rasft.verify.answers import (answers_equal, extract_answer, is_correct, last_boxed,
                                           normalize_answer)

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


def test_reasons():
    assert grade_math("no box", "1")["reason"] == "no_answer"
    assert grade_math(r"\boxed{}", "1")["reason"] == "no_answer"
    assert grade_math(r"\boxed{1}", None)["reason"] == "error"
    assert grade_math(r"\boxed{2\sqrt{2}}", r"\sqrt{8}", mode="math")["correct"]
    assert normalize_answer(r"\left( 3, \frac12 \right)") == r"(3,\frac{1}{2})"
    assert answers_equal("1,000", "1000") and not answers_equal("(1,000)", "1000")
    # The ground truth falls back to the expert's last box.
    assert gold_answer(None, r"... \boxed{7}") == "7" and gold_answer("8", r"\boxed{7}") == "8"


# ---- the released code's rules (`released` mode) ---------------------------------------------
def test_extract_answer():
    assert extract_answer(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert extract_answer("so $\\boxed{\\left( 3,\\!4 \\right).}$") == "( 3,4 )"  # wrappers, trailing dot
    # The last box unclosed: no fallback to an earlier box; the last-number rule reads "2".
    assert answers.last_boxed_braced(r"\boxed{1} then \boxed{2") is None
    assert extract_answer(r"\boxed{1} then \boxed{2") == "2"
    assert extract_answer("The final answer is 42.\nThe answer is 7") == "42"
    assert extract_answer("So the answer is 3/4!\nmore 9") == "3/4"
    assert extract_answer("Therefore x is 12;\nand 5") == "12"
    assert extract_answer("Thus the sum is -3.5\n") == "-3.5"
    assert extract_answer("we got 3 then 1/2 and 2.5 finally") == "2.5"  # the last number
    assert extract_answer("no digits at all") is None
    assert gold_answer("9", r"so \boxed{7}", mode="released") == "7"  # the expert's answer first
    assert gold_answer("9", "no answer here", mode="released") == "9"


REF_EQUAL = [
    ("42", " 42 "), ("0.5", "0.50"), ("1e-9", "0"),  # strings, floats within 1e-8
    (r"\frac{1}{2}", "0.5"), (r"\frac{3}{4}", "3/4"), (r"\frac{\frac{1}{2}}{2}", "0.25"),  # fractions
    (r"\sqrt{16}", "4"), (r"\sqrt{2}^{2}", "2"),  # sqrt
    ("2^{10}", "1024"), ("x^2 - 1", "(x-1)*(x+1)"),  # powers, algebra
]
REF_NOT_EQUAL = [
    ("1/3", "0.33"), ("5", "6"), ("x^2", "x^3"), (r"\frac{1}{3}", "0.3333"),
    (r"\pi", "3.14159"),  # `\pi` survives the plain-text route: sympify fails -> not equal
    ("(1, 2)", "(1,2)"),  # tuples: no string match, and sympy cannot subtract them
]


def test_is_correct_battery():
    bad = [(g, p) for g, p in REF_EQUAL if not is_correct(g, p)]
    bad += [(g, p) for g, p in REF_NOT_EQUAL if is_correct(g, p)]
    assert bad == []
    assert not is_correct(None, "1") and not is_correct("1", None)


def test_latex_parse_failure_falls_back_to_plain_text(monkeypatch):
    calls = []

    def failing(s):
        calls.append(s)
        raise RuntimeError("parser unavailable")

    monkeypatch.setattr(answers, "_parse_latex", failing)
    assert is_correct(r"\frac{1}{2}", "0.5") and calls == [r"\frac{1}{2}"]
    assert is_correct(r"\sqrt{9}", r"\frac{6}{2}")
    assert not is_correct(r"2\sqrt{2}", r"\sqrt{8}")  # "2sqrt(2)": sympify rejects implicit products
    # A parser that succeeds is used as is (no plain-text route).
    import sympy
    monkeypatch.setattr(answers, "_parse_latex", lambda s: sympy.Integer(7))
    assert is_correct(r"\anything", "7") and not is_correct(r"\anything", "8")


def test_released_mode():
    g = lambda resp, gold: grade_math(resp, gold, mode="released")  # noqa: E731
    assert g(r"... \boxed{\dfrac{1}{2}}", "0.5")["reason"] == "wrong"  # \dfrac is not rewritten
    assert g(r"... \boxed{\frac{1}{2}}", "0.5") == {"correct": True, "reason": "correct", "extracted": r"\frac{1}{2}"}
    assert g(r"... so $\boxed{3/4}$.", r"\frac{3}{4}")["correct"]
    assert g("The final answer is 12.", "12")["correct"]  # no box: the phrase rule
    assert g("no number at all", "12")["reason"] == "no_answer"
    assert g(r"\boxed{7}", r"\left(7\right)")["correct"]  # wrappers stripped from the gold too


def test_released_mode_and_its_old_name(tmp_path, capsys):
    """The released code's check was called "reference" (which names the frozen reference model):
    the old value is refused with the new name; "released" runs the released rules from the CLI."""
    from megatron_rasft.cli import main
    from megatron_rasft.records import ProblemVerdicts, read_records

    with pytest.raises(ValueError, match='mode = "reference" was renamed to "released"'):
        grade_math("The final answer is 12.", "12", mode="reference")
    assert grade_math("The final answer is 12.", "12", mode="released")["correct"]
    with pytest.raises(ValueError, match="mode must be one of"):
        grade_math(r"\boxed{1}", "1", mode="bogus")
    run = _run_dir(tmp_path)
    # The old name of the preset is refused in one line that names the new one (cli.main: exit 2).
    assert main(["verify", "--run-dir", str(run), "--round", "0", "--set", "rollout.verifier.kind=reference",
                 "--no-progress"]) == 2
    out = capsys.readouterr()
    assert (out.out + out.err).strip().count("\n") == 0 and "released" in out.out + out.err
    assert main(["verify", "--run-dir", str(run), "--round", "0", "--set", "rollout.verifier.kind=released",
                 "--no-progress"]) == 0
    got = {pv.problem_id: [e["reason"] for e in pv.rollouts] for pv in read_records(run / "verdicts" / "round_000.jsonl", ProblemVerdicts)}
    # The released rules ran (the `math` mode says "correct" for b's 0.5 against \frac12: its plain-text
    # route reads only \frac{a}{b}); "no idea" has no box, phrase or number.
    assert got == {"a": ["correct", "wrong"], "b": ["wrong", "no_answer"]}


def test_released_mode_in_the_pool():
    with MathVerifier(num_workers=1, timeout_s=10, mode="released") as v:
        out = v.grade([(r"so \boxed{\frac{1}{2}}", "0.5"), (r"so \boxed{x^2}", "x^3"), ("nothing", "1")])
    assert [o["reason"] for o in out] == ["correct", "wrong", "no_answer"]


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


# ---- the verify and weigh stages ------------------------------------------------------------
def _run_dir(tmp_path):
    from megatron_rasft.records import Problem, Rollout, write_records
    probs = [Problem("a", "1+1?", r"so \boxed{2}"), Problem("b", "half?", "x", answer=r"\frac12"),
             Problem("c", "add", "def add", tests={"format": "mbpp", "asserts": ["assert add(1, 2) == 3"]})]
    rolls = [Rollout("a", 0, 1, r"\boxed{3}", [1]), Rollout("a", 0, 0, r"\boxed{2}", [1]),
             Rollout("b", 0, 0, r"\boxed{0.5}", [1]), Rollout("b", 0, 1, "no idea", [1])]
    write_records(tmp_path / "problems.jsonl", probs)
    write_records(tmp_path / "rollouts" / "round_000.jsonl", rolls)
    return tmp_path


def test_verify_and_weigh_stages_resume(tmp_path, capsys):
    from megatron_rasft.cli import main
    from megatron_rasft.records import ProblemVerdicts, Weight, read_records, to_line

    run = _run_dir(tmp_path)
    out = run / "verdicts" / "round_000.jsonl"
    # A previous run finished problem "a" (reason marked so we can tell it was not redone) and
    # was killed while writing "b".
    done = ProblemVerdicts("a", 0, r"so \boxed{2}", [
        {"sample_index": 0, "text": r"\boxed{2}", "correct": True, "reason": "kept", "extracted": "2"},
        {"sample_index": 1, "text": r"\boxed{3}", "correct": False, "reason": "kept", "extracted": "3"}])
    out.parent.mkdir()
    out.write_text(to_line(done) + to_line(done).replace('"a"', '"b"')[:30])
    # (the torn-line warnings themselves are tested in test_records.py)
    assert main(["verify", "--run-dir", str(run), "--round", "0", "--no-progress"]) == 0
    recs = {r.problem_id: r for r in read_records(out, ProblemVerdicts)}
    assert set(recs) == {"a", "b"} and recs["a"] == done
    assert [(e["sample_index"], e["correct"], e["reason"]) for e in recs["b"].rollouts] == \
        [(0, True, "correct"), (1, False, "no_answer")]
    assert main(["weigh", "--run-dir", str(run), "--round", "0", "--set", "weighting.scheme=linear"]) == 0
    weights = list(read_records(run / "weights" / "round_000.jsonl", Weight))
    # By hand (RASFT.md `linear`, a_max 1, a_min 0.2, beta 0.5): "a" and "b" each have k = 1 of K = 2,
    # p = 1/2 -> A_E = 1 - 0.8 * 1/2 = 0.6, the correct rollout (sample 0) 0.5 * 1/2 / 1 = 0.25; the
    # wrong one gets no record.
    assert [(w.problem_id, w.round, w.kind, w.sample_index, w.p, w.k, w.K) for w in weights] == [
        ("a", 0, "expert", None, 0.5, 1, 2), ("a", 0, "rollout", 0, 0.5, 1, 2),
        ("b", 0, "expert", None, 0.5, 1, 2), ("b", 0, "rollout", 0, 0.5, 1, 2)]
    assert [w.weight for w in weights] == pytest.approx([0.6, 0.25, 0.6, 0.25], abs=1e-12)
    assert main(["weigh", "--run-dir", str(run), "--round", "0", "--set", "weighting.scheme=released"]) == 0
    assert "mean A_E 1.0000" in capsys.readouterr().out  # these toy rollouts are all "degenerate"


def test_stage_errors_name_the_line(tmp_path, capsys):
    from megatron_rasft.cli import main
    run = _run_dir(tmp_path)
    path = run / "rollouts" / "round_000.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = '{"schema_version": 1, "type": "rollout", "problem_id": "b"}\n'
    path.write_text("".join(lines))
    assert main(["verify", "--run-dir", str(run), "--round", "0", "--no-progress"]) == 2
    assert f"{path}:3: 'rollout' record is missing required field(s): round, sample_index" in capsys.readouterr().err
    assert main(["weigh", "--run-dir", str(run), "--round", "5"]) == 2
    assert "round_005.jsonl" in capsys.readouterr().err


def test_code_verifier_stage(tmp_path):
    from megatron_rasft.records import Rollout
    from megatron_rasft.verify.stage import verify_problems
    from megatron_rasft.records import Problem
    p = Problem("c", "add", "", tests={"format": "mbpp", "asserts": ["assert add(1, 2) == 3"]})
    rolls = {"c": [Rollout("c", 1, 0, "```python\ndef add(a, b):\n    return a + b\n```", [1]),
                   Rollout("c", 1, 1, "def add(a, b):\n    return 0\n", [1])]}
    (pv,) = verify_problems([p], rolls, 1, verifier="code", timeout_s=5)
    assert [(e["correct"], e["reason"]) for e in pv.rollouts] == [(True, "passed"), (False, "failed_test")]
