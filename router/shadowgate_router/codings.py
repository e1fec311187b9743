"""HTTP content codings (RFC 9110 section 8.4): reading gzip/deflate bodies without trusting their size.

The router never re-encodes what it forwards: a compressed request goes to the model servers as the client
sent it, a compressed answer goes back as the model server sent it. Bodies are decoded only to be read (the
request's id and JSON check, the answer's prediction), and decoding stops one byte past `limit`, so a small
body that inflates to gigabytes (a "zip bomb") costs at most `limit` bytes of work before it is refused.

``deflate`` is the zlib format (RFC 1950) by the standard; some clients send raw deflate (RFC 1951), which
is accepted too, as browsers and nginx do.
"""

from __future__ import annotations

import zlib

READABLE = (b"gzip", b"x-gzip", b"deflate", b"identity")
"""Codings the router can read; others (br, zstd, ...) are refused in requests and not asked for upstream."""


class CodingError(ValueError):
    """A body the router cannot read; `status` is what a client gets for such a request body."""

    status = 400


class UnsupportedCoding(CodingError):
    status = 415


class TooLarge(CodingError):
    status = 413


def codings(header: bytes | None) -> list[bytes]:
    """The codings of a Content-Encoding value, in the order they were applied, without identity."""
    if not header:
        return []
    found = []
    for part in header.split(b","):
        coding = part.strip().lower()
        if coding and coding != b"identity":
            found.append(coding)
    return found


def decode(body: bytes, header: bytes | None, limit: int) -> bytes:
    """`body` with the codings in `header` (a Content-Encoding value) undone, at most `limit` bytes.

    Raises UnsupportedCoding, TooLarge (the decoded body would exceed `limit`) or CodingError (corrupt data).
    """
    applied = codings(header)
    for coding in reversed(applied):
        if coding in (b"gzip", b"x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, limit, "gzip")
        elif coding == b"deflate":
            try:
                body = _inflate(body, zlib.MAX_WBITS, limit, "deflate")
            except TooLarge:
                raise
            except CodingError:
                body = _inflate(body, -zlib.MAX_WBITS, limit, "deflate")
        else:
            raise UnsupportedCoding(
                f"Content-Encoding {coding.decode(errors='replace')!r} is not supported: use gzip, deflate or identity"
            )
    if len(body) > limit:
        raise TooLarge(f"the decoded body is over the limit of {limit} bytes")
    return body


def _inflate(data: bytes, wbits: int, limit: int, name: str) -> bytes:
    """Decompress every member (gzip allows several back to back), stopping once over `limit`."""
    parts: list[bytes] = []
    size = 0
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            chunk = inflater.decompress(data, limit - size + 1)
        except zlib.error as exc:
            raise CodingError(f"the {name} body is corrupt: {exc}") from None
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the {name} body decodes to over the limit of {limit} bytes")
        parts.append(chunk)
        if not inflater.eof:
            raise CodingError(f"the {name} body is truncated")
        data = inflater.unused_data
        if not data or wbits < 0 or wbits == zlib.MAX_WBITS:
            return b"".join(parts)


def accepted(header: bytes) -> bytes | None:
    """An Accept-Encoding value with only the codings the router can read; None when none is left.

    The router reads every answer it records, so it does not let a model server answer in br or zstd.
    """
    kept = [part.strip() for part in header.split(b",") if part.split(b";", 1)[0].strip().lower() in READABLE]
    return b", ".join(kept) if kept else None
