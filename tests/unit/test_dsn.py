"""What the operator says about a database Secret that holds no usable DSN (issue 12, D12): in words,
never quoting the value (it goes into status and Events, and may be a password)."""

from __future__ import annotations

import pytest

from shadowgate_operator.store import dsn_problem


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "it is empty"),
        ("hunter2-not-a-dsn", "does not start with postgresql://"),
        ("host=db dbname=shadowgate password=pw", "does not start with postgresql://"),
        ("mysql://u:pw@db:3306/x", "does not start with postgresql://"),
        ("postgresql://u:pw@db:5432/shadowgate\n", "a space or a line break"),
        ("postgresql://u:pw@db:port/shadowgate", "not a number from 1 to 65535"),
        ("postgresql://u:pw@db:70000/shadowgate", "not a number from 1 to 65535"),
        ("postgresql://db1:5432,db2:0/shadowgate", "not a number from 1 to 65535"),
        ("postgresql://u:pw@[::1/shadowgate", "no closing ]"),
    ],
)
def test_a_value_that_is_not_a_dsn_is_described_without_quoting_it(value: str, words: str) -> None:
    problem = dsn_problem(value)
    assert problem is not None and words in problem
    assert "pw" not in problem and "hunter2" not in problem


@pytest.mark.parametrize(
    "value",
    [
        "postgresql://shadowgate:change-me@timescaledb.shadowgate-system.svc:5432/shadowgate",
        "postgres://u@db/x?sslmode=require",
        "postgresql://db1:5432,db2:5433/x",
        "postgresql://[fd00::7]:5432/x",
        "postgresql:///x?host=/var/run/postgresql",
    ],
)
def test_usable_dsns_pass(value: str) -> None:
    assert dsn_problem(value) is None
