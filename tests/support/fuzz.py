"""Hypothesis strategies for the admission fuzz tests: model URLs and router resources, valid or nearly.

Built from the parts a person (or an attacker) gets wrong: schemes, credentials, hosts (names, IPv4 in
every spelling a resolver reads, IPv6 with and without brackets, metadata services), ports out of range
or not numbers, paths with characters that need encoding; quantities with signs, suffixes, exponents.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

_LABEL = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?\Z")
_ODD = st.sampled_from(["_", "-", ".", "%", "@", ":", "[", "]", " ", "\t", "\n", "é", "?", "#", "/", "\\", "*"])


def _ipv4() -> st.SearchStrategy[str]:
    octet = st.integers(0, 300).map(str) | st.sampled_from(["010", "0x7f", "00", "-1"])
    return st.one_of(
        st.lists(octet, min_size=4, max_size=4).map(".".join),
        st.lists(octet, min_size=1, max_size=5).map(".".join),
        st.ip_addresses(v=4).map(str),
        st.sampled_from(
            [
                "169.254.169.254",
                "100.100.100.200",
                "127.0.0.1",
                "0.0.0.0",
                "255.255.255.255",
                "224.0.0.251",
                "10.0.0.7",
                "192.168.1.20",
                "2852039166",
                "0xa9fea9fe",
                "0251.0376.0251.0376",
            ]
        ),
    )


def _ipv6() -> st.SearchStrategy[str]:
    return st.one_of(
        st.ip_addresses(v=6).map(str),
        st.ip_addresses(v=6).map(lambda a: a.exploded),
        st.sampled_from(
            [
                "::1",
                "::",
                "fe80::1",
                "fe80::1%25eth0",
                "fd00:ec2::254",
                "::ffff:169.254.169.254",
                "::ffff:a9fe:a9fe",
                "fd00::7",
                "1::2::3",
                "2001:db8::",
                "::127.0.0.1",
                "febf::1",
                "fec0::1",
                "ff02::1",
            ]
        ),
    )


def _host() -> st.SearchStrategy[str]:
    name = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
    return st.one_of(
        name,
        st.tuples(name, _ODD, name).map("".join),
        _ipv4(),
        _ipv6().map(lambda a: f"[{a}]"),
        _ipv6(),
        _ipv6().map(lambda a: f"[{a}"),
        st.sampled_from(["", "metadata.google.internal", "METADATA.goog", "localhost", "models.internal."]),
    )


def _port() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.integers(-5, 70_000).map(lambda p: f":{p}"),
        st.sampled_from([":", ":abc", ":0080", ":65535", ":65536", ":8080:9090", ": 80"]),
    )


def _path() -> st.SearchStrategy[str]:
    piece = st.text(alphabet="abz09-._~!$&'()*+,;=:@%/?# \u00e9", max_size=12)
    return st.one_of(st.just(""), st.just("/"), piece.map(lambda p: "/" + p), st.sampled_from(["/v2/%2F", "/%zz"]))


@st.composite
def model_urls(draw: st.DrawFn) -> str:
    """A URL made of parts (mostly), or any text at all (sometimes)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=40))
    scheme = draw(st.sampled_from(["http://", "https://", "http://", "https://", "HTTP://", "ftp://", "", "http:/"]))
    credentials = draw(st.sampled_from(["", "", "", "", "user@", "user:secret@", ":@"]))
    return scheme + credentials + draw(_host()) + draw(_port()) + draw(_path())


def quantities() -> st.SearchStrategy[Any]:
    number = st.one_of(
        st.integers(0, 5000).map(str),
        st.decimals(0, 100, places=3, allow_nan=False, allow_infinity=False).map(str),
        st.sampled_from(["", ".5", "1.", "0", "-1", "+1", "1e3", "1E3", "1e999", "1e-3", "1e1.5", "1.5e2"]),
    )
    suffix = st.sampled_from(["", "m", "Mi", "Gi", "Ki", "k", "M", "G", "mi", "n", "u", "Ei", "i", "e2", "E-2"])
    return st.one_of(st.integers(-3, 10**6), st.tuples(number, suffix).map("".join))


def resources() -> st.SearchStrategy[dict[str, Any]]:
    names = st.sampled_from(["cpu", "memory", "memory", "cpu", "ephemeral-storage", "nvidia.com/gpu", "cpus"])
    amounts = st.dictionaries(names, quantities(), max_size=3)
    return st.fixed_dictionaries({"requests": amounts, "limits": amounts})


def durations() -> st.SearchStrategy[str]:
    unit = st.sampled_from(["ms", "s", "m", "h", "", "d", "S"])
    return st.one_of(
        st.tuples(st.integers(0, 3000).map(str), unit).map("".join),
        st.sampled_from(["1m30s", "0.5s", "1.5h", "30 s", "-5s", "5s5", "1e3s"]),
    )


@st.composite
def spec_patches(draw: st.DrawFn) -> dict[str, Any]:
    """A merge patch over examples/shadowdeployment.yaml touching a few of the fields with rules."""
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        side = draw(st.sampled_from(["candidate", "production"]))
        spec[side] = {"service": None, "url": draw(model_urls())}
    if draw(st.booleans()):
        spec["router"] = {"resources": draw(resources())}
    analysis: dict[str, Any] = {}
    if draw(st.booleans()):
        analysis["confidence"] = draw(
            st.one_of(st.floats(0.3, 1.2, allow_nan=False), st.sampled_from([0.5, 0.9999, 1.0, 1, 0.99999]))
        )
    if draw(st.booleans()):
        analysis["interval"] = draw(durations())
    if draw(st.booleans()):
        analysis["maxStepDuration"] = draw(durations())
    if analysis:
        spec["analysis"] = analysis
    if draw(st.booleans()):
        spec["traffic"] = {
            "steps": draw(st.lists(st.integers(-1, 120), max_size=4)),
            "timeout": draw(durations()),
        }
    return {"spec": spec}
