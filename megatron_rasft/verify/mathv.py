"""Math verifier: last-`\\boxed{}` extraction, then math-verify (sympy); or the released code's rules.

`grade_math` runs in the calling process and must be called from a main thread (math-verify's
timeouts use signal.alarm). `MathVerifier` runs it in a `TimeoutPool`: each item in a worker's main
thread, math-verify's own per-call timeouts as a cheap first line, and a hard per-item deadline that
kills the worker for computations that do not return to the interpreter in time.

Verdict reasons: correct | wrong | no_answer (no box in the response) | timeout | error.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from megatron_rasft.config import released_preset
from megatron_rasft.verify.answers import extract_answer, is_correct, last_boxed, own_verdict, strip_wrappers
from megatron_rasft.verify.guard import parts_read_all, values_agree
from megatron_rasft.verify.pool import TimeoutPool

MODES = ("math", "math-verify", "released")


def check_mode(mode: str, name: str = "mode") -> str:
    """`mode` validated. Raises ValueError for a mode not in MODES (`config.ConfigError` with the
    new name for "reference", the old name of "released")."""
    mode = released_preset(name, mode)
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
    return mode


class _TimeoutFlag(logging.Handler):
    """math-verify reports its own timeouts only as a log warning and returns False; catch it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hit = False

    def emit(self, record):
        if record.getMessage().startswith("Timeout during"):
            self.hit = True


_FLAG = _TimeoutFlag()
_mv_logger = logging.getLogger("math_verify")
_mv_logger.addHandler(_FLAG)
_mv_logger.propagate = False


def gold_answer(answer: Optional[str], expert_response: str, mode: str = "math") -> Optional[str]:
    """The ground truth: the explicit answer, else the last \\boxed{} of the expert response. In
    `released` mode the released code's order: `extract_answer(expert_response)`, else `answer`."""
    if check_mode(mode) == "released":
        return extract_answer(expert_response) or (str(answer) if answer is not None and str(answer).strip() else None)
    if answer is not None and str(answer).strip():
        return str(answer)
    return last_boxed(expert_response)


def grade_math(response: str, gold: Optional[str], mode: str = "math",
               soft_timeout_s: Optional[int] = 5) -> dict:
    """Grade one response against a gold answer string. Returns {"correct", "reason", "extracted"}.

    mode "math" (the combination rule): our rule (`answers.own_verdict`) decides when it is
    definite -- a definite mismatch (two plain numbers that differ, `x=3` vs `y=3`) is wrong whatever
    math-verify says, a definite match is correct; when it is undecided, math-verify decides, and a
    math-verify match is kept only when both answers' values agree at 60 digits (exactly, or
    within a relative 1e-6 when a decimal is involved) and math-verify read every part of each
    answer (`verify.guard`: math-verify rounds, which equates 1e-7 with 2e-7 and
    \\frac{1}{2004!} with \\frac{1}{2006!}, and reads `3 \\\\ 5` as 5).
    "math-verify": math-verify only, as released; "released": the released code's rules,
    `extract_answer(response)` against the gold (wrappers stripped) with `is_correct` (sympy, no
    soft limit: the pool's hard deadline bounds it). `soft_timeout_s` is math-verify's own per-call
    limit (None disables it)."""
    mode = check_mode(mode)
    if gold is None:
        return {"correct": False, "reason": "error", "extracted": None,
                "error": "no ground truth: no answer and no \\boxed{} in the expert response"}
    if mode == "released":
        pred = extract_answer(response)
        if pred is None or not pred.strip():
            return {"correct": False, "reason": "no_answer", "extracted": None}
        ok = is_correct(strip_wrappers(gold), pred)
        return {"correct": ok, "reason": "correct" if ok else "wrong", "extracted": pred}
    pred = last_boxed(response)
    if pred is None or not pred.strip():
        return {"correct": False, "reason": "no_answer", "extracted": None}
    if mode == "math":
        own = own_verdict(pred, gold)
        if own is not None:
            return {"correct": own, "reason": "correct" if own else "wrong", "extracted": pred}
    from math_verify import parse, verify

    _FLAG.hit = False
    try:
        gold_p = parse("\\boxed{" + gold + "}", parsing_timeout=soft_timeout_s)
        pred_p = parse("\\boxed{" + pred + "}", parsing_timeout=soft_timeout_s)
        ok = bool(gold_p) and bool(pred_p) and verify(gold_p, pred_p, timeout_seconds=soft_timeout_s)
        if ok and mode == "math":
            ok = (values_agree(gold_p[0], pred_p[0]) and parts_read_all(gold, gold_p[0])
                  and parts_read_all(pred, pred_p[0]))
    except Exception as e:  # noqa: BLE001
        return {"correct": False, "reason": "error", "extracted": pred, "error": f"{type(e).__name__}: {e}"}
    if ok:
        return {"correct": True, "reason": "correct", "extracted": pred}
    return {"correct": False, "reason": "timeout" if _FLAG.hit else "wrong", "extracted": pred}


def _grade_task(args):
    return grade_math(*args)


class MathVerifier:
    """Grades (response, gold) pairs in a pool of `num_workers` processes; every item finishes
    within about `timeout_s` seconds."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, mode: str = "math",
                 soft_timeout: bool = True):
        mode = check_mode(mode)
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.mode, self.timeout_s = mode, timeout_s
        # math-verify takes whole seconds; a third of the budget per call leaves room for the
        # two parses and the comparison before the hard deadline.
        self.soft_timeout_s = max(1, int(timeout_s // 3)) if soft_timeout else None
        warm = ("\\boxed{\\frac{1}{2}}", "0.5", mode, self.soft_timeout_s)  # parsers compiled per worker
        self.pool = TimeoutPool(num_workers, preload=["megatron_rasft.verify.mathv", "math_verify"],
                                warmup=(_grade_task, warm))

    def grade(self, pairs: Sequence[tuple], on_result=None) -> list[dict]:
        """pairs: [(response, gold_or_None), ...] -> verdict dicts in the same order."""
        tasks = [(resp, gold, self.mode, self.soft_timeout_s) for resp, gold in pairs]
        outcomes = self.pool.map(_grade_task, tasks, self.timeout_s,
                                 on_result=None if on_result is None else lambda i, o: on_result(i))
        verdicts = []
        for (resp, _), out in zip(pairs, outcomes):
            if out.status == "ok":
                verdicts.append(out.value)
            else:
                verdicts.append({"correct": False, "reason": out.status, "extracted": last_boxed(resp),
                                 "error": out.error})
        return verdicts

    def close(self) -> None:
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
