"""Checking one completion against a problem's tests (the package docstring describes both paths):
the program built from the completion, the pairs path (outputs judged by the trusted parent against
the expected values or the reference solution's outputs) and the driver path (the problem's test
code in a second contained interpreter), and many checks in parallel."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from megatron_rasft.verify import plain
from megatron_rasft.verify.plan import Plan, make_plan
from megatron_rasft.verify.sandbox.isolation import SandboxConfig
from megatron_rasft.verify.sandbox.process import Run, call_outputs, checked_isolation, exit_reason, isolation, tail

REASONS = ("passed", "failed_test", "timeout", "crash", "syntax_error", "memory", "output_limit")


def extract_code(text: str) -> str:
    """The last ```python (or ```py / bare ```) fenced block, else the text itself."""
    blocks = re.findall(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", text, re.DOTALL)
    return blocks[-1] if blocks else text


def build_program(tests: dict, code_prefix: str, completion: str) -> str:
    """The program the candidate's interpreter runs. HumanEval / io: the problem's code prefix (its
    signature / stub, never a rendered prompt) + the completion's code, on a new line when the
    completion restates the whole function; MBPP: the completion's code alone."""
    if not isinstance(tests, dict) or tests.get("format") not in ("humaneval", "mbpp", "io"):
        raise ValueError("problem.tests must be a dict with format 'humaneval', 'mbpp' or 'io'")
    code = extract_code(completion)
    if tests["format"] == "mbpp":
        return code
    entry = tests.get("entry_point")
    if not isinstance(entry, str):
        raise ValueError(f"{tests['format']} tests need 'entry_point'")
    prefix = code_prefix or ""
    sep = "\n" if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M) else ""
    return prefix + sep + code if prefix else code


def _judge(pair, output, atol: float, expected=None) -> Optional[str]:
    """None when the output satisfies the pair, else why not."""
    if output is None:
        return "no output"
    if output[0] == "exc":
        return f"raised {output[1]}"
    got = output[1]
    if pair.kind == "ref":
        # EvalPlus's rule: rtol 1e-7, and atol 1e-6 when the benchmark gives 0.
        ok = plain.same(got, expected, atol or 1e-6, 1e-7)
        return None if ok else f"got {got!r:.200}, expected {expected!r:.200}"
    if pair.kind == "eq":
        ok = plain.same(got, pair.expected)  # an assert's `==`: exact
    elif pair.kind == "truthy":
        ok = bool(got)
    elif pair.kind == "falsy":
        ok = not got
    else:
        num = type(got) in (int, float)
        if pair.kind == "close":
            tol, strict = pair.tol
            ok = num and (abs(got - pair.expected) < tol if strict else abs(got - pair.expected) <= tol)
        else:
            import math
            ok = num and math.isclose(got, pair.expected, rel_tol=pair.tol[0], abs_tol=pair.tol[1])
    return None if ok else f"got {got!r:.200}"


_REFERENCE: dict = {}
_REFERENCE_LOCK = threading.Lock()


def reference_outputs(plan: Plan, cfg: SandboxConfig, info: dict) -> list:
    """The reference solution's outputs on the plan's inputs (run once in the sandbox, cached by
    content). Raises RuntimeError when the reference itself fails."""
    key = hashlib.sha256(json.dumps([plan.reference, [p.args for p in plan.pairs]]).encode()).hexdigest()
    with _REFERENCE_LOCK:
        if key in _REFERENCE:
            return _REFERENCE[key]
    res = call_outputs(plan.reference, plan.pairs, cfg, info)
    if res["status"] or not all(o is not None and o[0] == "ok" for o in res["outputs"]):
        bad = next((i for i, o in enumerate(res["outputs"]) if o is None or o[0] != "ok"), None)
        raise RuntimeError(f"the reference solution fails ({res['status'] or 'input #%s' % bad}): "
                           f"{tail(res['log'], 300)}")
    values = [o[1] for o in res["outputs"]]
    with _REFERENCE_LOCK:
        _REFERENCE[key] = values
    return values


def _pairs_check(program: str, plan: Plan, cfg: SandboxConfig, info: dict) -> dict:
    expected = [None] * len(plan.pairs)
    if plan.reference is not None:
        try:
            expected = reference_outputs(plan, cfg, info)
        except RuntimeError as e:
            return {"correct": False, "reason": "crash", "detail": f"bad problem: {e}", "uid": None}
    res = call_outputs(program, plan.pairs, cfg, info, plan.setup)
    base = {"returncode": res["returncode"], "uid": res["uid"], "path": "pairs"}
    if res["status"] in ("output_limit", "timeout", "syntax_error", "memory") or (res["status"] and not res["ready"]):
        return dict(base, correct=False, reason=res["status"], detail=tail(res["log"]))
    if not res["ready"]:
        return dict(base, correct=False, reason="crash",
                    detail="the program ended before defining its functions\n" + tail(res["log"]))
    for i, (pair, out) in enumerate(zip(plan.pairs, res["outputs"])):
        why = _judge(pair, out, plan.atol, expected[i])
        if why is not None:
            if out is None:  # no answer: the process ended early (exit, kill, crash)
                return dict(base, correct=False, reason=res["status"] or "crash",
                            detail=f"no output for call #{i} ({pair.fn})\n" + tail(res["log"]))
            return dict(base, correct=False, reason="failed_test",
                        detail=f"call #{i}: {pair.fn}{tuple(pair.args)!r:.200}: {why}")
    return dict(base, correct=True, reason="passed", detail="")


# ---- the driver path ------------------------------------------------------------------------
def _driver_check(program: str, plan: Plan, cfg: SandboxConfig, info: dict) -> dict:
    run = Run(cfg, info)
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    ver_r, ver_w = os.pipe()
    try:
        files = {"solution.py": program, **({"setup.py": plan.setup} if plan.setup.strip() else {})}
        cand = run.spawn(files, "harness_candidate.py", args=(rep_w,), pass_fds=(rep_w,), stdin=req_r)
        spec = dict(plan.driver, req_fd=req_w, rep_fd=rep_r, verdict_fd=ver_w)
        run.spawn({"check.json": json.dumps(spec)}, "harness_checker.py", pass_fds=(req_w, rep_r, ver_w),
                  stdin=subprocess.DEVNULL, log_name="checker_log", extra_fds={ver_r: "verdict"})
    finally:
        for fd in (req_r, req_w, rep_r, rep_w, ver_w):
            os.close(fd)
    try:
        out = run.collect()
    finally:
        run.close()
    status = "output_limit" if out["over"] == "log" else exit_reason(cand, out["timed_out"])
    base = {"returncode": cand.returncode, "uid": run.procs[0][1], "path": "driver"}
    try:
        verdict = json.loads(out["verdict"])
        reason = verdict["reason"]
    except (ValueError, KeyError, TypeError):
        verdict, reason = {}, None
    if reason == "passed" and status is None:
        return dict(base, correct=True, reason="passed", detail="")
    if status is not None:
        return dict(base, correct=False, reason=status, detail=tail(out["log"]))
    if reason in ("failed_test", "output_limit"):
        return dict(base, correct=False, reason=reason, detail=verdict.get("detail", "") + tail(out["log"], 500))
    detail = verdict.get("detail") or "the checker gave no verdict\n" + tail(out["checker_log"], 500)
    return dict(base, correct=False, reason="crash", detail=detail + "\n" + tail(out["log"]))


def run_tests(tests: dict, code_prefix: str, completion: str, cfg: Optional[SandboxConfig] = None) -> dict:
    """Check one completion against `tests` -> {"correct", "reason", "detail", "path", "uid", ...}.
    `code_prefix`: the program's start for HumanEval-style problems (signature / stub), "" for MBPP.
    Raises RuntimeError when `cfg.require_isolation` and the machine gives no containment."""
    cfg = cfg or SandboxConfig()
    try:
        plan = make_plan(tests)
        program = build_program(tests, code_prefix, completion)
    except ValueError as e:
        return {"correct": False, "reason": "crash", "detail": f"bad problem tests: {e}"}
    info = checked_isolation(cfg)
    try:
        if plan.path == "pairs":
            return _pairs_check(program, plan, cfg, info)
        if plan.driver["format"] == "humaneval":
            plan.driver["prefix"] = code_prefix or ""  # the problem's helpers, defined in the checker too
        return _driver_check(program, plan, cfg, info)
    except (OSError, subprocess.SubprocessError) as e:
        return {"correct": False, "reason": "crash", "detail": f"could not start the sandbox: {e}"}


def run_many(jobs: list, cfg: Optional[SandboxConfig] = None, workers: int = 2, on_result=None) -> list:
    """jobs: [(tests, code_prefix, completion), ...] -> verdict dicts in order, `workers` at a time."""
    isolation()  # probe once before the threads start

    def one(i_job):
        i, job = i_job
        v = run_tests(*job, cfg=cfg)
        if on_result is not None:
            on_result(i)
        return v
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(one, enumerate(jobs)))
