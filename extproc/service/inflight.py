"""Requests admitted here whose response is accounted for elsewhere and has not ended yet.

With envoy/envoy-native.yaml (and envoy-observe.yaml) the admission stream closes as soon as the
request is answered; the request ends later, in Envoy's access log (or the meter stream). A draining
processor waits for these so that their settlements and usage records are not lost. An entry whose
end never arrives here (the access log went to another replica, or Envoy restarted) is forgotten
after `max_age_s`, and the table never holds more than `max_entries`.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Inflight:
    def __init__(
        self, *, max_age_s: float = 3600.0, max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._since: dict[str, float] = {}  # request id -> admitted at (insertion order = age order)
        self._max_age_s = max_age_s
        self._max_entries = max_entries
        self._clock = clock

    def add(self, request_id: str) -> None:
        now = self._clock()
        self._since[request_id] = now
        while self._since:
            oldest, since = next(iter(self._since.items()))
            if len(self._since) <= self._max_entries and now - since <= self._max_age_s:
                break
            del self._since[oldest]

    def done(self, request_id: str) -> None:
        self._since.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._since)
