"""Problems with expert demonstrations, read from the user's JSONL.

Each line: a prompt (`prompt`, or `instruction`), the expert `response`, optionally a math `answer`
(else the last `\\boxed{}` of the response is the ground truth) or code `tests`. Field names are
configurable. Every problem gets a stable `id` (the line's own `id` field, else its 0-based line
index), so rounds, caches and checkpoints can refer to it across restarts.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_rasft.records import Problem
from megatron_rasft.verify.reference import last_boxed


def read_problems(path: str | Path, *, prompt_field: str = "prompt", response_field: str = "response",
                  answer_field: str = "answer", tests_field: str = "tests",
                  require_response: bool = True) -> list[Problem]:
    """Parse the problems file; any bad line raises `ValueError("path:line: what")`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problems file not found: {path}")
    problems, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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
                                 f"(set train.prompt_field); keys present: {sorted(row)}")
            response = row.get(response_field)
            if require_response and (not isinstance(response, str) or not response.strip()):
                raise ValueError(f"{where}: missing or empty response field {response_field!r} "
                                 f"(set train.response_field)")
            pid = str(row.get("id", lineno - 1))
            if pid in seen:
                raise ValueError(f"{where}: duplicate problem id {pid!r}")
            seen.add(pid)
            answer = row.get(answer_field)
            if answer is None and isinstance(response, str):
                answer = last_boxed(response)
            meta = {k: v for k, v in row.items()
                    if k not in (prompt_field, "instruction", response_field, answer_field, tests_field, "id")}
            problems.append(Problem(pid, prompt, response or "", None if answer is None else str(answer),
                                    row.get(tests_field), meta))
    if not problems:
        raise ValueError(f"{path}: no problems found")
    return problems
