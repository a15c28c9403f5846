"""Problems with expert demonstrations, read from the user's JSONL.

Each line: a prompt (`prompt`, or `instruction`), the expert `response`, optionally a math `answer`
(else the last `\\boxed{}` of the response is the ground truth) or code `tests`. Field names are
configurable. Every problem gets a stable `id` (the line's own `id` field, else its 0-based line
index), so rounds, caches and checkpoints can refer to it across restarts.

Placeholder answers (`proof`, `notfound`, `N/A`, ...: datasets such as NuminaMath use them for
problems without a closed-form answer) are not ground truth: such a problem is marked
`meta["unverifiable"]` (the reason) and gets no rollouts, so its demonstration keeps A_E = 1.
The list is `PLACEHOLDER_ANSWERS` (configurable: `train.data.placeholder_answers`), compared after
stripping `$`, spaces and a `\\text{}` wrapper, case-insensitively; an empty answer is one too.

HumanEval-style code problems (`tests.format` "humaneval" or "io") run the problem's code prefix
(its signature / stub) followed by the completion: `tests.code_prefix` when given, else the raw
prompt when it is Python defining the entry point, else nothing (the completion must then define
the whole function). The rendered prompt (chat template, instruction) is never run.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Optional, Sequence

from megatron_rasft.config import PLACEHOLDER_ANSWERS
from megatron_rasft.records import Problem
from megatron_rasft.verify.answers import last_boxed



def placeholder_reason(answer: Optional[str], placeholders: Sequence[str] = PLACEHOLDER_ANSWERS) -> Optional[str]:
    """Why `answer` is not a ground truth (it is empty or one of `placeholders`), or None."""
    if answer is None:
        return None
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", str(answer)).replace("$", "").strip().lower()
    if not s:
        return "empty answer"
    wanted = {re.sub(r"\s+", " ", p.strip().lower()) for p in placeholders}
    return f"placeholder answer {str(answer)!r}" if re.sub(r"\s+", " ", s) in wanted else None


def code_prefix_of(prompt: str, tests: dict) -> str:
    """The program start of a HumanEval-style problem: the raw prompt when it is Python that
    defines the entry point (HumanEval's own prompts are), else ""."""
    entry = tests.get("entry_point")
    if not isinstance(entry, str):
        return ""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return ""
    defines = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry for n in ast.walk(tree))
    return prompt if defines else ""


def read_lines(path: Path):
    """(line number, text) of a UTF-8 text file; a byte that is not UTF-8 raises
    ValueError("path:line: ...") naming the line and column; a UTF-8 byte order mark at the start
    is refused the same way (save the file as UTF-8 without a BOM)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raise ValueError(f"{path}:1: the file starts with a UTF-8 byte order mark (BOM); "
                                 f"save it as UTF-8 without a BOM")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 f"the file must be UTF-8") from None


def read_problems(path: str | Path, *, prompt_field: str = "prompt", response_field: str = "response",
                  answer_field: str = "answer", tests_field: str = "tests",
                  require_response: bool = True,
                  placeholders: Sequence[str] = PLACEHOLDER_ANSWERS) -> list[Problem]:
    """Parse the problems file; any bad line raises `ValueError("path:line: what")`. Problems whose
    answer is a placeholder come back with `meta["unverifiable"]` set (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problems file not found: {path}")
    problems, seen = [], set()
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        prompt = row.get(prompt_field, row.get("instruction") if prompt_field == "prompt" else None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: missing or empty prompt field {prompt_field!r} "
                             f"(set train.data.prompt_field); keys present: {sorted(row)}")
        response = row.get(response_field)
        if require_response and (not isinstance(response, str) or not response.strip()):
            raise ValueError(f"{where}: missing or empty response field {response_field!r} "
                             f"(set train.data.response_field)")
        pid = str(row.get("id", lineno - 1))
        if pid in seen:
            raise ValueError(f"{where}: duplicate problem id {pid!r}")
        seen.add(pid)
        tests = row.get(tests_field)
        if tests is not None and not isinstance(tests, dict):
            raise ValueError(f"{where}: field {tests_field!r} must be an object, got {type(tests).__name__}")
        answer = row.get(answer_field)
        if answer is None and isinstance(response, str) and tests is None:
            answer = last_boxed(response)
        meta = {k: v for k, v in row.items()
                if k not in (prompt_field, "instruction", response_field, answer_field, tests_field, "id")}
        if tests is None:
            reason = (placeholder_reason(answer, placeholders) if answer is not None
                      else "no answer and no \\boxed{} in the response")
            if reason:
                meta["unverifiable"] = reason
        elif tests.get("format") in ("humaneval", "io") and "code_prefix" not in tests:
            tests = dict(tests, code_prefix=code_prefix_of(prompt, tests))
        problems.append(Problem(pid, prompt, response or "", None if answer is None else str(answer), tests, meta))
    if not problems:
        raise ValueError(f"{path}: no problems found")
    return problems
