"""JSON from people and programs we do not control, decoded within bounds: nesting depth checked before the
decoder recurses (Python's ``json`` would raise ``RecursionError`` deep inside, or exhaust the stack), no
``NaN``/``Infinity`` constants, and integers of bounded length. One place for the events bridge, catalog
manifests and the web API.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32  # our shapes nest a few levels deep; deeper is not one of them
MAX_INT_DIGITS = 20  # 2**63 has 19 digits

_TOKEN = re.compile(r'["\\\[\]{}]')


class JSONLimitError(ValueError):
    """JSON text outside the bounds (too deep, a non-finite constant, a huge integer)."""


def check_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse nesting deeper than ``max_depth`` before a decoder recurses into it.

    One pass over the quotes, backslashes and brackets (linear in the text, whatever it holds); brackets inside
    strings do not count.

    Raises:
        JSONLimitError: nested deeper than ``max_depth``.
    """
    depth = 0
    in_string = False
    skip_to = 0  # the character after a backslash is escaped
    for match in _TOKEN.finditer(text):
        at = match.start()
        if at < skip_to:
            continue
        token = match.group()
        if in_string:
            if token == "\\":
                skip_to = at + 2
            elif token == '"':
                in_string = False
        elif token == '"':
            in_string = True
        elif token in "[{":
            depth += 1
            if depth > max_depth:
                raise JSONLimitError(f"JSON nested deeper than {max_depth} levels")
        elif token in "]}":
            depth -= 1


def _no_constant(name: str) -> Any:
    raise JSONLimitError(f"non-finite number {name} in JSON")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONLimitError(f"integer with {len(text.lstrip('-'))} digits in JSON")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONLimitError(f"number {text[:20]!r} out of range")
    return value


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` within the bounds above.

    Raises:
        JSONLimitError: outside the bounds.
        ValueError: not JSON (``json.JSONDecodeError``) or, for bytes, not UTF-8.
    """
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8")
    check_depth(text, max_depth)
    return json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float)
