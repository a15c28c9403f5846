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

from megatron_rasft.verify.pool import TimeoutPool
from megatron_rasft.verify.reference import (extract_answer, is_correct, last_boxed, reference_equal,
                                             strip_wrappers)

MODES = ("math", "math-verify", "reference")


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
    `reference` mode the released code's order: `extract_answer(expert_response)`, else `answer`."""
    if mode == "reference":
        return extract_answer(expert_response) or (str(answer) if answer is not None and str(answer).strip() else None)
    if answer is not None and str(answer).strip():
        return str(answer)
    return last_boxed(expert_response)


def grade_math(response: str, gold: Optional[str], mode: str = "math",
               soft_timeout_s: Optional[int] = 5) -> dict:
    """Grade one response against a gold answer string. Returns {"correct", "reason", "extracted"}.

    mode "math": math-verify equivalence of the boxed answers, or the normalised string rule
    (either suffices); "math-verify": math-verify only; "reference": the released code's rules,
    `extract_answer(response)` against the gold (wrappers stripped) with `is_correct` (sympy, no
    soft limit: the pool's hard deadline bounds it). `soft_timeout_s` is math-verify's own per-call
    limit (None disables it)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if gold is None:
        return {"correct": False, "reason": "error", "extracted": None,
                "error": "no ground truth: no answer and no \\boxed{} in the expert response"}
    if mode == "reference":
        pred = extract_answer(response)
        if pred is None or not pred.strip():
            return {"correct": False, "reason": "no_answer", "extracted": None}
        ok = is_correct(strip_wrappers(gold), pred)
        return {"correct": ok, "reason": "correct" if ok else "wrong", "extracted": pred}
    pred = last_boxed(response)
    if pred is None or not pred.strip():
        return {"correct": False, "reason": "no_answer", "extracted": None}
    if mode != "math-verify" and reference_equal(pred, gold):
        return {"correct": True, "reason": "correct", "extracted": pred}
    from math_verify import parse, verify

    _FLAG.hit = False
    try:
        gold_p = parse("\\boxed{" + gold + "}", parsing_timeout=soft_timeout_s)
        pred_p = parse("\\boxed{" + pred + "}", parsing_timeout=soft_timeout_s)
        ok = bool(gold_p) and bool(pred_p) and verify(gold_p, pred_p, timeout_seconds=soft_timeout_s)
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
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
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
