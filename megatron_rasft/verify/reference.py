"""Answer extraction and the `reference` equivalence rule (normalised string match).

The released RASFT code takes the ground truth from the last `\\boxed{}` of the expert response and
compares answers as normalised strings. Its exact normaliser is not public, so this module fixes a
documented one (docs/verify_and_weighting.md lists every step); `normalize_answer` is the whole rule.
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
