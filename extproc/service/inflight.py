"""Requests admitted here whose response is accounted for elsewhere and has not ended yet.

With envoy/envoy-native.yaml (and envoy-observe.yaml) the admission stream closes as soon as the
request is answered; the request ends later, in Envoy's access log (or the meter stream). A draining
processor waits for these so that their settlements and usage records are not lost, and settles
what is still open at the end of its grace period at the reservation. An entry whose end never
arrives here (the access log went to another replica, or Envoy restarted) is forgotten after
`max_age_s`, and the table never holds more than `max_entries`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Inflight(Generic[T]):
    def __init__(
        self, *, max_age_s: float = 3600.0, max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # request id -> (admitted at, what settles it); insertion order = age order
        self._open: dict[str, tuple[float, T]] = {}
        self._max_age_s = max_age_s
        self._max_entries = max_entries
        self._clock = clock

    def add(self, request_id: str, item: T) -> None:
        now = self._clock()
        self._open[request_id] = (now, item)
        while self._open:
            oldest, (since, _) = next(iter(self._open.items()))
            if len(self._open) <= self._max_entries and now - since <= self._max_age_s:
                break
            del self._open[oldest]

    def done(self, request_id: str) -> None:
        self._open.pop(request_id, None)

    def pop(self, request_id: str) -> T | None:
        entry = self._open.pop(request_id, None)
        return None if entry is None else entry[1]

    def take_all(self) -> list[T]:
        items = [item for _, item in self._open.values()]
        self._open.clear()
        return items

    def __len__(self) -> int:
        return len(self._open)
