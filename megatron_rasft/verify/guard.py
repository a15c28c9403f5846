"""Checks on a math-verify "correct" before the default `math` mode accepts it.

math-verify equates values that differ when it rounds them: floats to 6 decimal places
(`1e-7` = `2e-7`), and the difference of two expressions evaluated to 15 digits with tiny values
chopped to zero (`\\frac{1}{2004!}` = `\\frac{1}{2006!}`, `x + 10^{-20}` = `x + 2\\cdot 10^{-20}`,
`e^{-40}` = `e^{-41}`). It also reads only one part of some answers that have several
(`3 \\\\ 5` is read as 5, `3 \\text{ cm and } 5 \\text{ cm}` as 3, `3 = 5` as 5). Two checks close
both classes (docs/verify_and_weighting.md):

- `values_agree`: the two parsed answers (free symbols set to the same rational sample points)
  must be equal -- their difference evaluated by sympy to 60 guaranteed significant digits is zero
  -- when neither contains a decimal, and within a relative 1e-6 when one does (a decimal is an
  approximation: `\\sqrt{2}` = `1.4142136`). Sets, tuples, intervals, equations (up to a constant
  factor) and assignments are compared part by part; a relation whose number-valued sides disagree
  (`3 = 5`, `x = 3 = 5`) does not agree with anything.
- `parts_read_all`: an answer written with more top-level parts (separated by `,` `;` `\\\\` `|`
  `\\lor` `\\land` `\\quad`, or "and" / "or", also inside `\\text{}`) than math-verify's reading has
  elements is not trusted.

Neither check can turn a math-verify "wrong" into "correct"; both return True (no objection) where
they cannot evaluate. Inputs are math-verify's parsed sympy objects and the raw answer strings.
"""
from __future__ import annotations

import re

DIGITS = 60  # significant digits a value or a difference is evaluated to
DECIMAL_REL = 1e-6  # a decimal answer: math-verify's own 6-place intent, relative to the magnitude
# Rational sample points for free symbols (one per symbol, cycled); away from 0, 1 and small integers.
_POINTS = ((7, 11), (13, 5), (-17, 19), (29, 7), (-3, 23))


# ---- parts ------------------------------------------------------------------------------------
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_WORD_SEP = re.compile(r"(?i)\b(?:or|and)\b|[,;]")
_ENVIRONMENT = re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.S)  # a matrix, cases...: one part
_SEPARATORS = re.compile(r"\\\\|\\lor\b|\\vee\b|\\land\b|\\wedge\b|\\qquad\b|\\quad\b|(?<![a-zA-Z\\])(?:or|and)(?![a-zA-Z])")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def answer_parts(text: str) -> int:
    """How many top-level parts the answer string has: separators outside every (), [], {} count
    (`3, 5` → 2, `(3, 5)` → 1, `\\{1, 2\\}` → 1, `3 \\text{ cm and } 5 \\text{ cm}` → 2,
    `1,000` → 1 as a thousands separator); empty parts are not counted, so `|x|` is one part."""
    s = text.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = _ENVIRONMENT.sub(" M ", s)
    # \text{ or } and friends: a separator when their words are, their bare content otherwise
    # (brackets inside text are prose, not structure).
    s = _TEXT_GROUP.sub(lambda m: " , " if _WORD_SEP.search(m.group(1).strip()) else
                        re.sub(r"[()\[\]]", " ", m.group(1)), s)
    if _THOUSANDS.fullmatch(re.sub(r"\s+", "", s)):
        return 1
    s = _SEPARATORS.sub(",", s)
    # A lone top-level `|` separates ("3 | 5"); pairs are absolute values.
    parts, depth, cur, bars = [], 0, [], []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if depth == 0 and ch in ",;":
            parts.append("".join(cur))
            cur = []
            continue
        if depth == 0 and ch == "|":
            bars.append(len(parts))
        cur.append(ch)
    parts.append("".join(cur))
    count = sum(1 for p in parts if p.strip(" \\"))
    if len(bars) == 1:
        count += 1
    return max(count, 1)


def parts_read(expr) -> int:
    """How many parts math-verify's reading holds: the elements of a set or tuple, 2 for an
    interval's ends, 1 otherwise."""
    import sympy

    if isinstance(expr, (sympy.FiniteSet, sympy.Tuple)):
        return len(expr.args)
    if isinstance(expr, sympy.Interval):
        return 2
    return 1


def parts_read_all(text: str, expr) -> bool:
    """False when `text` has more top-level parts than math-verify read (`expr`)."""
    return answer_parts(text) <= parts_read(expr)


# ---- values -----------------------------------------------------------------------------------
def values_agree(gold, pred, rel_tol: float = DECIMAL_REL) -> bool:
    """False when math-verify's parsed `gold` and `pred` (sympy objects) have different values;
    True when they agree or cannot be evaluated. When neither contains a float (a decimal written
    in the answer) the values must be equal: their difference, evaluated to 60 significant digits
    with sympy's guaranteed-precision evaluation, is 0 or below anything sympy can resolve (a
    difference that is really zero); with a float, within `rel_tol` of the larger magnitude. No
    absolute floor either way: tiny values are compared by their own size."""
    import sympy

    has_float = any(isinstance(x, sympy.Basic) and x.has(sympy.Float) for x in (gold, pred))
    return _agree(gold, pred, rel_tol if has_float else None)


def _agree(g, p, tol) -> bool:
    """tol: None for exact forms, else the relative tolerance."""
    import sympy
    from sympy.core.relational import Relational

    for x in (g, p):
        if isinstance(x, (Relational, sympy.And)) and not _self_consistent(x, tol):
            return False
    if isinstance(g, Relational) and isinstance(p, Relational):
        if isinstance(g.lhs, sympy.Symbol) and isinstance(p.lhs, sympy.Symbol):  # assignments
            return _agree(g.rhs, p.rhs, tol)
        return _proportional(g.lhs - g.rhs, p.lhs - p.rhs, tol)
    # math-verify compares an equation's last right-hand side with a plain value, and the
    # right-hand side of an assigned gold (`x = 3`) with a plain prediction.
    if isinstance(p, Relational) and not isinstance(g, Relational):
        return _agree(g, p.rhs, tol)
    if isinstance(g, Relational) and isinstance(g.lhs, sympy.Symbol):
        return _agree(g.rhs, p, tol)
    if isinstance(g, sympy.Interval) and isinstance(p, sympy.Interval):
        return _agree(g.start, p.start, tol) and _agree(g.end, p.end, tol)
    if isinstance(g, (sympy.FiniteSet, sympy.Tuple)) and isinstance(p, (sympy.FiniteSet, sympy.Tuple)):
        if len(g.args) != len(p.args):
            return True  # math-verify matched them some other way; no opinion
        if isinstance(g, sympy.Tuple) and isinstance(p, sympy.Tuple):
            return all(_agree(a, b, tol) for a, b in zip(g.args, p.args))
        left = list(p.args)  # a set: each gold element needs its own agreeing prediction element
        for a in g.args:
            match = next((i for i, b in enumerate(left) if _agree(a, b, tol)), None)
            if match is None:
                return False
            left.pop(match)
        return True
    if isinstance(g, sympy.Expr) and isinstance(p, sympy.Expr):
        return all(_same(g.subs(pt), p.subs(pt), tol) is not False for pt in _points(g.free_symbols | p.free_symbols))
    return True


def _self_consistent(rel, tol) -> bool:
    """A relation or chain whose sides without free symbols all have one value (`2+3 = 5`), not
    several (`3 = 5`, `x = 3 = 5`)."""
    import sympy

    rels = rel.args if isinstance(rel, sympy.And) else (rel,)
    if not all(isinstance(r, sympy.Eq) for r in rels):
        return True
    sides = [s for r in rels for s in (r.lhs, r.rhs) if isinstance(s, sympy.Expr) and not s.free_symbols]
    return all(_same(sides[0], s, tol) is not False for s in sides[1:])


def _points(symbols) -> list:
    """Substitutions of rational sample points for `symbols` ([{}] when there are none)."""
    import sympy

    syms = sorted(symbols, key=str)
    if not syms:
        return [{}]
    return [{s: sympy.Rational(*_POINTS[(i + k) % len(_POINTS)]) for i, s in enumerate(syms)} for k in range(3)]


def _number(x, strict: bool = False):
    """x evaluated to DIGITS digits as (re, im) sympy Floats; "zero" when `strict` and sympy
    cannot resolve it from zero; None when it is not a finite number."""
    import sympy
    from sympy.core.evalf import PrecisionExhausted

    try:
        v = sympy.sympify(x).evalf(DIGITS, strict=strict)
        re_, im_ = v.as_real_imag()
        re_, im_ = sympy.Float(re_, DIGITS), sympy.Float(im_, DIGITS)
    except PrecisionExhausted:
        return "zero"
    except (TypeError, ValueError, AttributeError, ArithmeticError, RecursionError):
        return None
    if not (re_.is_finite and im_.is_finite):
        return None
    return re_, im_


def _same(a, b, tol):
    """Whether two values without free symbols are equal: exactly (`tol` None) or within the
    relative `tol`; None when they cannot be evaluated."""
    import sympy

    if tol is None:
        d = _number(a - b, strict=True)
        return None if d is None else (d == "zero" or bool(d[0].is_zero and d[1].is_zero))
    va, vb = _number(a), _number(b)
    if va is None or vb is None:
        return None
    d = sympy.sqrt((va[0] - vb[0]) ** 2 + (va[1] - vb[1]) ** 2)
    scale = max(sympy.sqrt(va[0] ** 2 + va[1] ** 2), sympy.sqrt(vb[0] ** 2 + vb[1] ** 2))
    return bool(d <= sympy.Float(tol, DIGITS) * scale)


def _proportional(da, db, tol) -> bool:
    """da / db is one constant at every sample point (equations equal up to a factor:
    `3x - y + 13 = 0` and `-3x + y - 13 = 0`)."""
    ratios = []
    for pt in _points(da.free_symbols | db.free_symbols):
        den = db.subs(pt)
        if _same(den, 0 * den, None) is not False:  # zero or unknown there: no ratio
            continue
        ratios.append(da.subs(pt) / den)
    return all(_same(ratios[0], r, tol) is not False for r in ratios[1:])
