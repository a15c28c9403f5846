"""How a code problem is checked: (call, expected) pairs judged in the trusted parent, or the
problem's own test code run in a second, fresh interpreter.

`make_plan(tests)` reads a problem's `tests` dict (formats in docs/verify_and_weighting.md):
- `io` (EvalPlus inputs + a reference solution): pairs; the expected outputs are the reference's
  outputs on the same inputs, computed once in the sandbox (`Plan.reference`).
- `humaneval` (`check(candidate)`) and `mbpp` (assert lists): pairs when every statement of the test
  is one of the assert shapes below, with literal arguments and a literal expected value;
  otherwise `Plan.driver` (the test runs in the checker interpreter, which calls the candidate's
  functions through the plain-data channel).

Assert shapes turned into pairs (`F` = the candidate's function, arguments are Python literals):
`F(...) == LIT`, `LIT == F(...)`, `F(...) is True|False|None`, `F(...)` (truthy), `not F(...)`
(falsy), `abs(F(...) - LIT) < TOL` (or `<=`), `math.isclose(F(...), LIT, rel_tol=.., abs_tol=..)`.
`assert True` and docstrings are skipped; in HumanEval's test module, a literal `METADATA = {...}`
and `import math` are allowed beside `def check(candidate)`.
"""
from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Pair:
    fn: str  # the candidate's function to call
    args: list  # positional arguments (plain data)
    kind: str  # "eq" | "truthy" | "falsy" | "close" | "isclose"
    expected: object = None
    tol: tuple = ()  # close: (tol, strict <); isclose: (rel_tol, abs_tol)


@dataclass
class Plan:
    path: str  # "pairs" | "driver"
    pairs: list = field(default_factory=list)  # [Pair] (path "pairs")
    setup: str = ""  # MBPP setup code, run after the program in the candidate's interpreter
    atol: float = 0.0  # the benchmark's float tolerance for reference outputs
    reference: Optional[str] = None  # io: the reference program whose outputs are expected
    driver: Optional[dict] = None  # path "driver": what the checker interpreter runs
    why: str = ""  # for the docs / logs: why a problem takes the driver path


class _NoPair(Exception):
    pass


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise _NoPair("not a literal: " + ast.unparse(node)[:60]) from None


def _call(node, names: set) -> tuple:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names):
        raise _NoPair("not a call of the candidate: " + ast.unparse(node)[:60])
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise _NoPair("keyword or starred arguments")
    return node.func.id, [_literal(a) for a in node.args]


def _assert_to_pair(test: ast.expr, names: set, rename: dict) -> Pair:
    def mk(fn_args, kind, expected=None, tol=()):
        fn, args = fn_args
        return Pair(rename.get(fn, fn), args, kind, expected, tol)

    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, op, right = test.left, test.ops[0], test.comparators[0]
        if isinstance(op, ast.Eq):
            try:
                return mk(_call(left, names), "eq", _literal(right))
            except _NoPair:
                return mk(_call(right, names), "eq", _literal(left))
        if isinstance(op, ast.Is) and isinstance(right, ast.Constant) and right.value in (True, False, None):
            return mk(_call(left, names), "eq", right.value)
        if isinstance(op, (ast.Lt, ast.LtE)) and isinstance(left, ast.Call) and isinstance(left.func, ast.Name) \
                and left.func.id == "abs" and len(left.args) == 1 and isinstance(left.args[0], ast.BinOp) \
                and isinstance(left.args[0].op, ast.Sub):
            diff = left.args[0]
            return mk(_call(diff.left, names), "close", _literal(diff.right),
                      (float(_literal(right)), isinstance(op, ast.Lt)))
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Attribute) and test.func.attr == "isclose" \
            and isinstance(test.func.value, ast.Name) and test.func.value.id == "math" and len(test.args) == 2:
        kw = {k.arg: float(_literal(k.value)) for k in test.keywords}
        if set(kw) - {"rel_tol", "abs_tol"}:
            raise _NoPair("isclose keywords")
        return mk(_call(test.args[0], names), "isclose", _literal(test.args[1]),
                  (kw.get("rel_tol", 1e-9), kw.get("abs_tol", 0.0)))
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return mk(_call(test.operand, names), "falsy")
    return mk(_call(test, names), "truthy")


def _statements_to_pairs(body: list, names: set, rename: dict) -> list:
    pairs = []
    for stmt in body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring or a bare constant
        if isinstance(stmt, ast.Pass):
            continue
        if not isinstance(stmt, ast.Assert):
            raise _NoPair(f"a {type(stmt).__name__} statement")
        if isinstance(stmt.test, ast.Constant) and stmt.test.value is True:
            continue
        pairs.append(_assert_to_pair(stmt.test, names, rename))
    return pairs


def _humaneval_pairs(test_src: str, entry_point: str) -> list:
    module = ast.parse(test_src)
    check = None
    for stmt in module.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "check":
            check = stmt
        elif isinstance(stmt, ast.Assign) and [getattr(t, "id", None) for t in stmt.targets] == ["METADATA"]:
            _literal(stmt.value)
        elif isinstance(stmt, ast.Import) and [a.name for a in stmt.names] == ["math"]:
            pass
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            pass
        else:
            raise _NoPair(f"module-level {type(stmt).__name__}")
    if check is None or len(check.args.args) != 1 or check.decorator_list:
        raise _NoPair("no plain def check(candidate)")
    param = check.args.args[0].arg
    return _statements_to_pairs(check.body, {param, entry_point}, {param: entry_point})


def make_plan(tests: dict) -> Plan:
    """A problem's `tests` dict -> its Plan. Raises ValueError naming the missing field."""
    if not isinstance(tests, dict) or tests.get("format") not in ("humaneval", "mbpp", "io"):
        raise ValueError("problem.tests must be a dict with format 'humaneval', 'mbpp' or 'io'")
    fmt = tests["format"]
    if fmt == "io":
        for key in ("entry_point", "inputs", "reference"):
            if key not in tests:
                raise ValueError(f"io tests need {key!r}")
        if not isinstance(tests["inputs"], list) or not all(isinstance(a, list) for a in tests["inputs"]):
            raise ValueError("io tests: 'inputs' must be a list of argument lists")
        pairs = [Pair(tests["entry_point"], list(a), "ref") for a in tests["inputs"]]
        return Plan("pairs", pairs, atol=float(tests.get("atol") or 0.0), reference=tests["reference"])
    if fmt == "humaneval":
        for key in ("test", "entry_point"):
            if key not in tests:
                raise ValueError(f"humaneval tests need {key!r}")
        driver = {"format": "humaneval", "test": tests["test"], "entry_point": tests["entry_point"],
                  "prefix": tests.get("code_prefix", "")}
        try:
            return Plan("pairs", _humaneval_pairs(tests["test"], tests["entry_point"]))
        except (_NoPair, SyntaxError) as e:
            return Plan("driver", driver=driver, why=str(e))
    asserts = tests.get("asserts")
    if not isinstance(asserts, list) or not all(isinstance(a, str) for a in asserts):
        raise ValueError("mbpp tests need 'asserts': a list of assert statements")
    setup = tests.get("setup") or ""
    driver = {"format": "mbpp", "asserts": asserts, "setup": setup}
    try:
        body = [s for a in asserts for s in ast.parse(a).body]
        called = {n.func.id for s in body for n in ast.walk(s)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)} - set(dir(builtins))
        pairs = _statements_to_pairs(body, called, {})
    except (_NoPair, SyntaxError) as e:
        return Plan("driver", driver=driver, setup=setup, why=str(e))
    if not pairs:
        return Plan("driver", driver=driver, setup=setup, why="no asserts")
    return Plan("pairs", pairs, setup=setup)
