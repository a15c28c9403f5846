"""Answer extraction and comparison rules.

- `extract_answer` + `is_correct`: the released RASFT code's rules (the `reference` verifier mode):
  last brace-matched `\\boxed{}` (else "answer is"-style phrases, else the last number); equal as
  stripped strings, as floats within 1e-8, or by `sympy.simplify(gold - pred) == 0`.
- `last_boxed` + `normalize_answer` / `reference_equal`: this project's extraction and normalised
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


def normalize_answer(ans: str) -> str:
    """Canonical string form of an answer (see the docs for the list of rules, in order)."""
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
    # "x=5" / "k=\frac12": keep the right-hand side when the left is a single short symbol.
    m = re.fullmatch(r"[A-Za-z](?:_\{?\w+\}?)?=(.+)", s)
    if m:
        s = m.group(1)
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


def _as_number(s: str) -> Optional[float]:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", s)
    if m:
        den = int(m.group(3))
        return None if den == 0 else (-1 if m.group(1) else 1) * int(m.group(2)) / den
    try:
        return float(s)
    except ValueError:
        return None


def reference_equal(pred: str, gold: str) -> bool:
    """Normalised strings equal, or both plain numbers (ints, decimals, integer fractions) within
    a relative 1e-6."""
    a, b = normalize_answer(pred), normalize_answer(gold)
    if a == b and a != "":
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y))


# ---- the released code's rules (`reference` verifier mode) -----------------------------------
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
