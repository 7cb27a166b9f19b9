"""At most one event per key per interval, locally, in a bounded table.

Over-limit alerts would otherwise fire on every request over the limit; the caller names them by a
key (scope and limit) and an interval. The table keeps the last time each key went through, the
least recently passed key first: when it is full the oldest entry goes, and that key may then pass
again early (an extra alert, never a lost one). Every operation is O(1).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["DEFAULT_MAX_KEYS", "Dedupe"]

DEFAULT_MAX_KEYS = 10_000


class Dedupe:
    def __init__(self, *, max_keys: int = DEFAULT_MAX_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys <= 0:
            raise ValueError("max_keys must be positive")
        self.max_keys = max_keys
        self._clock = clock
        self._passed: OrderedDict[str, float] = OrderedDict()  # key -> when it last passed

    def __len__(self) -> int:
        return len(self._passed)

    def admit(self, key: str, interval_s: float) -> bool:
        """True when `key` has not passed within the last `interval_s` seconds (and record that it
        passes now); False: a repeat, to suppress."""
        now = self._clock()
        last = self._passed.get(key)
        if last is not None and now - last < interval_s:
            return False
        self._passed[key] = now
        self._passed.move_to_end(key)
        if len(self._passed) > self.max_keys:
            self._passed.popitem(last=False)
        return True
