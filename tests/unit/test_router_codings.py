"""Reading gzip/deflate bodies: every form real clients send, and a bound no body can get past."""

from __future__ import annotations

import gzip
import time
import zlib

import pytest

from shadowgate_router.codings import CodingError, TooLarge, UnsupportedCoding, accepted, codings, decode

TEXT = b'{"id": "trade-1", "inputs": [{"name": "x", "datatype": "FP64", "shape": [3], "data": [1, 2, 3]}]}'


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("header", "body"),
    [
        (None, TEXT),
        (b"identity", TEXT),
        (b"gzip", gzip.compress(TEXT)),
        (b"x-gzip", gzip.compress(TEXT)),
        (b"GZip", gzip.compress(TEXT)),
        (b"deflate", zlib.compress(TEXT)),  # the zlib format, as the standard says and tritonclient sends
        (b"deflate", raw_deflate(TEXT)),  # raw deflate, as some clients send
        (b"deflate, gzip", gzip.compress(zlib.compress(TEXT))),  # applied in the order listed
        (b"gzip", gzip.compress(TEXT[:40]) + gzip.compress(TEXT[40:])),  # two gzip members back to back
    ],
)
def test_bodies_are_decoded(header: bytes | None, body: bytes) -> None:
    assert decode(body, header, 1 << 20) == TEXT


def test_a_zip_bomb_stops_at_the_limit_quickly() -> None:
    bomb = gzip.compress(b"\0" * (200 << 20), compresslevel=9)  # 200 MiB of zeros in about 200 KB
    assert len(bomb) < 300_000
    started = time.perf_counter()
    with pytest.raises(TooLarge, match="over the limit of 1048576 bytes"):
        decode(bomb, b"gzip", 1 << 20)
    assert time.perf_counter() - started < 0.5, "only the first MiB is inflated"


def test_exactly_the_limit_is_accepted() -> None:
    assert decode(gzip.compress(b"a" * 1000), b"gzip", 1000) == b"a" * 1000
    with pytest.raises(TooLarge):
        decode(gzip.compress(b"a" * 1001), b"gzip", 1000)
    with pytest.raises(TooLarge):
        decode(b"a" * 1001, None, 1000)


@pytest.mark.parametrize(
    ("header", "body", "error", "says"),
    [
        (b"br", b"\x0b\x02\x80", UnsupportedCoding, "'br' is not supported"),
        (b"gzip", b"not gzip at all", CodingError, "corrupt"),
        (b"gzip", gzip.compress(TEXT)[:-12], CodingError, "truncated"),
        (b"deflate", b"\xff\xff", CodingError, "corrupt"),
    ],
)
def test_unreadable_bodies_say_why(header: bytes, body: bytes, error: type[CodingError], says: str) -> None:
    with pytest.raises(error, match=says) as refused:
        decode(body, header, 1 << 20)
    assert refused.value.status == {UnsupportedCoding: 415, CodingError: 400}[error]


def test_codings_and_accept_encoding() -> None:
    assert codings(b"gzip, identity") == [b"gzip"]
    assert codings(b"identity") == [] and codings(None) == []
    assert accepted(b"gzip, deflate, br, zstd") == b"gzip, deflate"
    assert accepted(b"br;q=1.0, gzip;q=0.5") == b"gzip;q=0.5"
    assert accepted(b"br") is None
