"""Request ids this replica recorded recently: to count the ones that come again (issue 12 D6).

A client chooses its request ids (X-Request-Id), and outcomes are joined to predictions by id, so sending
the same id again with crafted inputs was a way to weigh one outcome many times. The analysis scores each
id once per deployment; the router records every request anyway (its answer went to a client) and counts
the repeats it sees in `shadowgate_router_duplicate_request_ids_total`, so an operator can see them.

Bounded: two generations of at most `capacity` ids each (as 64-bit hashes), the older dropped when the
newer fills, so an id is remembered for at least the last `capacity` recorded requests; one set lookup and
one insert per prediction. Each replica sees its own share of the traffic.
"""

from __future__ import annotations


class RecentIds:
    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._current: set[int] = set()
        self._previous: set[int] = set()

    def seen(self, request_id: bytes) -> bool:
        """Whether `request_id` was recorded recently; remembers it either way."""
        key = hash(request_id)
        if key in self._current:
            return True
        again = key in self._previous
        self._current.add(key)
        if len(self._current) >= self.capacity:
            self._previous, self._current = self._current, set()
        return again
