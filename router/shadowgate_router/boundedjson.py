"""JSON from peers (clients, outcome posters, model servers), parsed with its nesting bounded.

The standard library's decoder recurses once per level of nesting and, past the interpreter's recursion
limit, raises RecursionError, which is not a ValueError: a client's ``[[[[...`` then got a 500, and a
candidate answering it lost every row the recording callback was handling. Here every document deeper
than `MAX_DEPTH` is refused with `JsonTooDeep` (a ValueError) before it is decoded, whatever the call
stack looks like, and the decoder's own RecursionError is turned into the same error.

The check costs next to nothing for ordinary bodies: a document with at most `MAX_DEPTH` opening brackets
cannot be nested deeper, and two ``bytes.count`` calls say so. The usual attack, a document that opens with
brackets only, is refused from its first few hundred bytes, before any pass over the whole of it (a 200 KB
``[[[[...`` from a client or a candidate answering it costs the event loop microseconds). Others are
measured exactly, in linear time and mostly in C (strings removed by a regular expression, brackets kept by
``bytes.translate``, innermost pairs removed level by level, a running sum for what is left), a fraction of
what decoding them costs."""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted: a rank-8 tensor as nested lists inside a V2 request is 11."""

_DECODER = json.JSONDecoder()
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_SIGNS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")
_EMPTY_PAIRS = re.compile(rb"\[\]|\{\}")
"""Openers to +1, closers to -1 (0xff read as a signed byte)."""
_CHUNK = 65_536
_HEAD = 8
"""Bytes per level of `limit` looked at first: ``[[[[...`` or ``{"inputs": [[[[...`` (or ``{"a":{"a":...``)
refused from its first 512 bytes, whatever the document's size."""


class JsonTooDeep(ValueError):
    """The document nests arrays and objects deeper than the router accepts."""

    def __init__(self, limit: int = MAX_DEPTH) -> None:
        super().__init__(f"JSON nested deeper than {limit} levels")


def too_deep(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether `data`, read as JSON, nests deeper than `limit` (brackets inside strings do not count)."""
    if _opens_deeper(data[: _HEAD * limit], limit):
        return True  # the usual attack: refused from its first bytes, before any pass over all of it
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    if b'"' in data:
        data = _STRINGS.sub(b"", data)
    brackets = data.translate(None, _NOT_BRACKETS)
    if _deeper(brackets[: 4 * limit], limit):  # a deep prefix, once strings are gone: refused at once
        return True
    # Shallow documents with many brackets (a batch of rows): each pass removes the innermost empty pairs,
    # one level, at the speed of C; what is left after a few passes gets the exact, slower measure.
    removed = 0
    while brackets and removed < 8:
        shorter = _EMPTY_PAIRS.sub(b"", brackets)
        if len(shorter) == len(brackets):
            break  # unbalanced: the measure below still bounds it, the decoder refuses it
        brackets, removed = shorter, removed + 1
    return bool(brackets) and _deeper(brackets, limit - removed)


def _opens_deeper(head: bytes, limit: int) -> bool:
    """Whether the first `limit` + 1 brackets of `head` (the start of a document), outside strings, all open:
    then the document nests deeper than `limit`. A string cut off at the end of `head` ends what is looked at."""
    if b'"' in head:
        head = _STRINGS.sub(b"", head)
        cut = head.find(b'"')
        if cut >= 0:
            head = head[:cut]
    brackets = head.translate(None, _NOT_BRACKETS)[: limit + 1]
    return len(brackets) > limit and b"]" not in brackets and b"}" not in brackets


def _deeper(brackets: bytes, limit: int) -> bool:
    """The exact measure: a running sum of +1 per opener and -1 per closer, in C, chunk by chunk."""
    signs = memoryview(brackets.translate(_SIGNS)).cast("b")
    level = 0
    for start in range(0, len(signs), _CHUNK):
        chunk = signs[start : start + _CHUNK]
        if max(accumulate(chunk, initial=level)) > limit:
            return True
        level += sum(chunk)
    return False


def loads(data: bytes | str, limit: int = MAX_DEPTH) -> Any:
    """Decode UTF-8 JSON; ValueError (JsonTooDeep, json.JSONDecodeError, UnicodeDecodeError) when it is not
    acceptable. Without json.loads' encoding sniffing: two fewer Python calls on the hot path."""
    raw = data.encode() if isinstance(data, str) else data
    if too_deep(raw, limit):
        raise JsonTooDeep(limit)
    try:
        return _DECODER.decode(raw.decode() if isinstance(data, bytes) else data)
    except RecursionError:  # a limit above what the interpreter's stack allows
        raise JsonTooDeep(limit) from None
