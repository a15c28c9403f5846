"""Grade completions of evaluation problems: math with `MathVerifier` (process pool, hard
timeouts), code in the sandbox (`run_many`) against the benchmark's tests.

Verdicts are dicts {"correct", "reason", "extracted"} (+ "detail", the tail of a failing program's
stderr). Math reasons: correct | wrong | no_answer | timeout | error; code: passed | failed_test |
timeout | crash | syntax_error | memory | output_limit.
"""
from __future__ import annotations

from typing import Optional, Sequence

from megatron_rasft.eval.benchmarks import EvalProblem


class Grader:
    """One math pool (started on first use) and sandbox threads, `workers` wide each."""

    def __init__(self, workers: int = 2, math_mode: str = "math", timeout_s: float = 10.0,
                 sandbox=None):
        if workers < 1:
            raise ValueError("--workers must be >= 1")
        self.workers, self.math_mode, self.timeout_s = workers, math_mode, timeout_s
        self.sandbox = sandbox
        self._math = None

    def grade(self, items: Sequence[tuple[EvalProblem, str]]) -> list[dict]:
        """items: [(problem, completion), ...] -> verdicts in the same order."""
        out: list[Optional[dict]] = [None] * len(items)
        math_idx = [i for i, (p, _) in enumerate(items) if p.kind == "math"]
        code_idx = [i for i, (p, _) in enumerate(items) if p.kind == "code"]
        if math_idx:
            verdicts = self.math_verifier().grade([(items[i][1], items[i][0].answer) for i in math_idx])
            for i, v in zip(math_idx, verdicts):
                out[i] = {"correct": bool(v["correct"]), "reason": v["reason"], "extracted": v.get("extracted")}
        if code_idx:
            from megatron_rasft.verify.sandbox import SandboxConfig, run_many

            cfg = self.sandbox or SandboxConfig(timeout_s=self.timeout_s, cpu_s=max(1, int(self.timeout_s)))
            jobs = [(items[i][0].tests, items[i][0].code_prefix, items[i][1]) for i in code_idx]
            for i, v in zip(code_idx, run_many(jobs, cfg, workers=self.workers)):
                verdict = {"correct": bool(v["correct"]), "reason": v["reason"], "extracted": None}
                if not v["correct"]:
                    verdict["detail"] = (v.get("detail") or "")[-500:]
                out[i] = verdict
        return out

    def equivalent(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """[(representative, answer), ...] -> whether the math rule accepts `answer` with
        `representative` as the gold (maj@n's vote groups); in the pool, so a comparison past its
        deadline counts as "not equivalent"."""
        verdicts = self.math_verifier().grade([("\\boxed{" + b + "}", a) for a, b in pairs])
        return [bool(v["correct"]) for v in verdicts]

    def math_verifier(self):
        if self._math is None:
            from megatron_rasft.verify.mathv import MathVerifier

            self._math = MathVerifier(self.workers, self.timeout_s, mode=self.math_mode)
        return self._math

    def close(self) -> None:
        if self._math is not None:
            self._math.close()
            self._math = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
