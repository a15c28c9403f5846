"""Plain data across the sandbox boundary: an exact-type JSON encoding and a strict comparison.

Only these types cross: None, bool, int, float, complex, str, bytes, list, tuple, dict, set,
frozenset (exact types: subclasses are refused, so an object with its own `__eq__` cannot cross).
JSON carries None/bool/int/float/str/list natively (Python's json keeps 1 and 1.0 apart, and
writes NaN/Infinity); the other types become one-key objects: {"tuple": [...]}, {"dict": [[k, v],
...]}, {"set": [...]}, {"frozenset": [...]}, {"bytes": "hex"}, {"complex": [re, im]}.

This file is also the first part of the programs that run inside the sandbox (`sandbox/process.py` reads
its source), so it imports nothing but the standard library.
"""
import json
import math

MAX_DEPTH = 100


class PlainDataError(ValueError):
    """A value that is not plain data, or a malformed encoding."""


def to_plain(x, depth=0):
    """Python value -> JSON-able structure; raises PlainDataError for any other type."""
    if depth > MAX_DEPTH:
        raise PlainDataError("nested too deeply")
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if t is list:
        return [to_plain(e, depth + 1) for e in x]
    if t is tuple:
        return {"tuple": [to_plain(e, depth + 1) for e in x]}
    if t is dict:
        return {"dict": [[to_plain(k, depth + 1), to_plain(v, depth + 1)] for k, v in x.items()]}
    if t is set or t is frozenset:
        return {t.__name__: [to_plain(e, depth + 1) for e in x]}
    if t is bytes:
        return {"bytes": x.hex()}
    if t is complex:
        return {"complex": [x.real, x.imag]}
    raise PlainDataError("not plain data: " + t.__name__)


def from_plain(j, depth=0):
    """Inverse of `to_plain` on parsed JSON; builds genuine built-in objects only."""
    if depth > MAX_DEPTH:
        raise PlainDataError("nested too deeply")
    t = type(j)
    if j is None or t is bool or t is int or t is float or t is str:
        return j
    if t is list:
        return [from_plain(e, depth + 1) for e in j]
    if t is not dict or len(j) != 1:
        raise PlainDataError("malformed plain data")
    (tag, v), = j.items()
    if tag == "tuple" and type(v) is list:
        return tuple(from_plain(e, depth + 1) for e in v)
    if tag == "dict" and type(v) is list and all(type(kv) is list and len(kv) == 2 for kv in v):
        try:
            return {from_plain(k, depth + 1): from_plain(val, depth + 1) for k, val in v}
        except TypeError as e:  # an unhashable key
            raise PlainDataError(str(e)) from None
    if tag in ("set", "frozenset") and type(v) is list:
        try:
            items = [from_plain(e, depth + 1) for e in v]
            return set(items) if tag == "set" else frozenset(items)
        except TypeError as e:
            raise PlainDataError(str(e)) from None
    if tag == "bytes" and type(v) is str:
        try:
            return bytes.fromhex(v)
        except ValueError:
            raise PlainDataError("malformed bytes") from None
    if tag == "complex" and type(v) is list and len(v) == 2 and all(type(e) in (int, float) for e in v):
        return complex(v[0], v[1])
    raise PlainDataError("malformed plain data: tag " + repr(tag)[:40])


def dumps(x):
    """Python value -> one line of JSON text."""
    return json.dumps(to_plain(x), separators=(",", ":"))


def loads(line):
    """One line of JSON text -> Python value (strict)."""
    try:
        j = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise PlainDataError("not JSON: " + str(e)[:100]) from None
    return from_plain(j)


def same(got, expected, atol=0.0, rtol=0.0):
    """Strict equality of two plain values: the same type at every level, except that an int may
    stand for an expected float; floats (and complex) within `atol + rtol * |expected|` (exact by
    default), NaN equal to NaN."""
    te, tg = type(expected), type(got)
    if te is float:
        if tg is not float and tg is not int:
            return False
        if math.isnan(expected):
            return tg is float and math.isnan(got)
        return got == expected or abs(got - expected) <= atol + rtol * abs(expected)
    if te is complex:
        return tg is complex and (got == expected or abs(got - expected) <= atol + rtol * abs(expected))
    if tg is not te:
        return False
    if te is list or te is tuple:
        return len(got) == len(expected) and all(same(g, e, atol, rtol) for g, e in zip(got, expected))
    if te is dict:
        return got.keys() == expected.keys() and all(same(got[k], expected[k], atol, rtol) for k in expected)
    return got == expected
