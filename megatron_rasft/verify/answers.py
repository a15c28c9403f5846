"""Answer extraction and comparison rules.

- `extract_answer` + `is_correct`: the released RASFT code's rules (the `released` verifier mode):
  last brace-matched `\\boxed{}` (else "answer is"-style phrases, else the last number); equal as
  stripped strings, as floats within 1e-8, or by `sympy.simplify(gold - pred) == 0`.
- `last_boxed` + `normalize_answer` / `answers_equal`: this project's extraction and normalised
  string rule, the cheap first check of the `math` mode and the majority-vote key of `eval`.
docs/verify_and_weighting.md lists every step of both.
"""
from __future__ import annotations

import re
from typing import Optional

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces balanced), or of the
    brace-less form `\\boxed 42`; None if there is none or its braces never close."""
    matches = list(_BOX_RE.finditer(text))
    for m in reversed(matches):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{" and text[j - 1] != "\\":
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
            continue  # unbalanced: try the previous box
        if i > m.end():  # "\boxed 42": up to the next whitespace or '$'
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                return word.group(0)
    return None


def _strip_text_wrappers(s: str) -> str:
    # \text{abc} / \textbf{abc} / \mathrm{abc} / \mbox{abc} -> abc (one level, repeated)
    prev = None
    while prev != s:
        prev = s
        s = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    return s


_UNIT_WORDS = (r"(?:degrees?|cm|centimeters?|meters?|km|kilometers?|inches|inch|feet|foot|ft|"
               r"units?|sq|square|hours?|minutes?|seconds?|dollars?|cents?|miles?|mph|pounds?|"
               r"kg|grams?|liters?|days?|years?|people|ways)")


def normalize_answer(ans: str, keep_lhs: bool = False) -> str:
    """Canonical string form of an answer (see the docs for the list of rules, in order). A
    single-symbol left-hand side (`x=5`) is dropped unless `keep_lhs` (the majority-vote key of
    `eval` drops it; the grading rule keeps it, so `x=3` and `y=3` stay different)."""
    s = ans.strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = s.replace("\\ ", "").replace("~", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _strip_text_wrappers(s)
    # A trailing unit word ("5 cm", "12 degrees") is dropped; then all whitespace.
    s = re.sub(r"(?<=[\d}])\s*" + _UNIT_WORDS + r"(?:\^?\{?[23]\}?)?\s*$", "", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    lhs, rhs = split_lhs(s)
    if lhs is not None:
        s = (lhs + "=" if keep_lhs else "") + _normalize_value(rhs)
    else:
        s = _normalize_value(s)
    return s


def split_lhs(s: str) -> tuple:
    """`x=5` / `k_1=\\frac12` -> ("x", "5") / ("k_1", ...): a single-letter left-hand side with an
    optional subscript; otherwise (None, s)."""
    m = re.fullmatch(r"([A-Za-z](?:_\{?\w+\}?)?)=([^=]+)", s)
    if m:
        return m.group(1).replace("{", "").replace("}", ""), m.group(2)
    return None, s


def _normalize_value(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{x} -> \frac{1}{x}, \sqrt3 -> \sqrt{3}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)
    # Thousands separators in plain numbers: 1,000,000 -> 1000000 (not in tuples like (1,2)).
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    # Integer fractions a/b -> \frac{a}{b}; leading ".5" -> "0.5"; trailing zeros of decimals.
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if re.fullmatch(r"-?\.\d+", s):
        s = s.replace(".", "0.", 1)
    if re.fullmatch(r"-?\d+\.\d*?0+", s):
        s = s.rstrip("0").rstrip(".")
    return s


# ---- exact numbers ----------------------------------------------------------------------------
_MANTISSA = r"(\d+(?:\.\d*)?|\.\d+)"
_EXPONENT = r"(?:[eE]([+-]?\d+)|(?:\\times|\\cdot|\*)10\^(?:\{([+-]?\d+)\}|(\d)))?"


def exact_number(s: str) -> Optional[tuple]:
    """A normalised answer that is a plain number -> (value as `Fraction`, decimal places given, or
    None when written exactly); None for anything else. Exact forms: integers, `\\frac{a}{b}`,
    `10^{k}`, `3e5`, `3\\times10^{5}`; decimal forms have a point in the mantissa: `1.25`,
    `1.5e-7`, `1.5\\times10^{-7}` (places = the mantissa's, shifted by the exponent: 8 here)."""
    from fractions import Fraction

    sign, body = (-1, s[1:]) if s.startswith("-") else (1, s)
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", body)
    if m:
        den = int(m.group(2))
        return None if den == 0 else (sign * Fraction(int(m.group(1)), den), None)
    m = re.fullmatch(r"10\^(?:\{([+-]?\d+)\}|(\d))", body)
    if m:
        return sign * Fraction(10) ** int(m.group(1) or m.group(2)), None
    m = re.fullmatch(_MANTISSA + _EXPONENT, body)
    if not m:
        return None
    mant = m.group(1)
    exp = int(m.group(2) or m.group(3) or m.group(4) or 0)
    value = sign * Fraction(mant) * Fraction(10) ** exp
    if "." not in mant:
        return value, None
    return value, max(0, len(mant.split(".")[1]) - exp)


def numbers_equal(a: tuple, b: tuple, rel_tol: float = 1e-6) -> bool:
    """Two `exact_number` results. Exact forms, and two decimals, compare exactly (trailing zeros
    aside): 1000000 != 1000001, 0.0000001 != 0.0000002. A decimal against an exact form that it
    cannot equal exactly (`0.333333` vs `\\frac{1}{3}`) matches when it agrees with it in every
    place given (|x - v| <= half a unit of the last place) *and* within `rel_tol` of |v|, so a
    tolerance never reaches into the digits given, and scales with the magnitude."""
    (x, px), (y, py) = a, b
    if x == y:
        return True
    if (px is None) == (py is None):
        return False
    dec, places, exact = (x, px, y) if px is not None else (y, py, x)
    from fractions import Fraction
    diff = abs(dec - exact)
    return diff <= Fraction(1, 2) / 10 ** places and diff <= Fraction(str(rel_tol)) * abs(exact)


def own_verdict(pred: str, gold: str) -> Optional[bool]:
    """This project's rule, three-valued: True (a definite match), False (a definite mismatch) or
    None (undecided: left to math-verify). Definite match: the normalised strings are equal, or both
    are plain numbers that `numbers_equal`. Definite mismatch: both are plain numbers that differ,
    or both have a one-symbol left-hand side (`x=3`, `y=3`) with different symbols. A percent sign
    on one side only lets that side's number be read as v or v/100 (`50\\%` = `50` = `0.5`)."""
    lp, a = split_lhs(normalize_answer(pred, keep_lhs=True))
    lg, b = split_lhs(normalize_answer(gold, keep_lhs=True))
    if lp is not None and lg is not None and lp != lg:
        return False
    if a == b and a != "":
        return True
    x, y = exact_number(a), exact_number(b)
    if x is None or y is None:
        return None
    if numbers_equal(x, y):
        return True
    pct_p, pct_g = "%" in pred, "%" in gold
    if pct_p != pct_g:
        (v, places) = x if pct_p else y
        scaled = (v / 100, None if places is None else places + 2)
        if numbers_equal(scaled, y if pct_p else x):
            return True
    return False


def answers_equal(pred: str, gold: str) -> bool:
    """`own_verdict` is a definite match."""
    return own_verdict(pred, gold) is True


# ---- the released code's rules (`released` verifier mode) ------------------------------------
_ANSWER_PHRASES = [re.compile(p, re.IGNORECASE | re.MULTILINE) for p in (
    r"final answer is(.*)$", r"answer is(.*)$", r"therefore.*?is(.*)$", r"thus.*?is(.*)$")]
_LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_WRAPPERS = ("$", "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\n")


def last_boxed_braced(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` with braces counted from its opening brace; None when
    there is no `\\boxed{` or the last one never closes (no fallback to an earlier box)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for j in range(start + len("\\boxed"), len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{"):j]
    return None


def strip_wrappers(ans: str) -> str:
    """Remove `$`, `\\left`, `\\right`, `\\!`, `\\,`, `\\;`, `\\:` and newlines, then surrounding
    whitespace and trailing " .,:;!?\\t"."""
    for w in _WRAPPERS:
        ans = ans.replace(w, "")
    return ans.strip().rstrip(" .,:;!?\t").strip()


def extract_answer(text: str) -> Optional[str]:
    """The released code's answer of a response: the last brace-matched `\\boxed{}` (wrappers
    stripped); else the rest of the line after the first of "final answer is", "answer is",
    "therefore ... is", "thus ... is" (in that order) that matches; else the last number
    (`-?\\d+(\\.\\d+)?(/\\d+)?`); else None."""
    boxed = last_boxed_braced(text)
    if boxed is not None:
        return strip_wrappers(boxed)
    for pattern in _ANSWER_PHRASES:
        m = pattern.search(text)
        if m:
            ans = strip_wrappers(m.group(1))
            if ans:
                return ans
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _latex_to_sympy_text(s: str) -> str:
    """The released code's plain-text form: \\frac{a}{b} -> ((a)/(b)) and \\sqrt{x} -> sqrt(x) until
    none is left (innermost first), ^ -> **, remaining braces -> parentheses, no spaces."""
    prev = None
    while prev != s:
        prev = s
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("^", "**").replace("{", "(").replace("}", ")")
    return re.sub(r"\s+", "", s)


def _parse_latex(s: str):
    # sympy's ANTLR LaTeX parser needs antlr4-python3-runtime 4.11 exactly; with another version
    # (math-verify pulls in 4.13) it raises ImportError and `_to_sympy` falls back to sympify.
    from sympy.parsing.latex import parse_latex
    return parse_latex(s)


def _to_sympy(s: str):
    import sympy
    if "\\" in s:
        try:
            return _parse_latex(s)
        except Exception:  # noqa: BLE001 - any parser failure: the plain-text route below
            pass
    return sympy.sympify(_latex_to_sympy_text(s))


def is_correct(gold: Optional[str], pred: Optional[str]) -> bool:
    """The released code's equivalence: stripped strings equal; or both floats within 1e-8
    (absolute); or sympy: simplify(gold - pred) == 0 or |float(gold - pred)| <= 1e-8. Any exception
    in the sympy step means "not equal". Sympy can run for minutes on adversarial input: callers
    run this under a deadline (`MathVerifier`'s worker pool)."""
    if gold is None or pred is None:
        return False
    g, p = gold.strip(), pred.strip()
    if g == p:
        return True
    try:
        if abs(float(g) - float(p)) <= 1e-8:
            return True
    except (ValueError, OverflowError):
        pass
    try:
        import sympy
        diff = _to_sympy(g) - _to_sympy(p)
        if sympy.simplify(diff) == 0:
            return True
        return abs(float(diff)) <= 1e-8
    except Exception:  # noqa: BLE001 - unparsable or non-numeric difference: not equal
        return False
