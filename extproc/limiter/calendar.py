"""Calendar periods for access quotas: a day, a week or a month in a time zone, from an anchor.

A monthly contract that renews on the 15th has periods [15th 00:00, next 15th 00:00) in the tenant's
time zone; an anchor beyond a month's length means that month's last day (a contract of the 31st renews
on 30 April and 28/29 February). A week starts on the anchor's ISO weekday (1 = Monday). Local midnight
is converted with the zone's rules of that date, so a period across a daylight-saving change is 23 or 25
hours longer or shorter, as a customer's calendar is.

Pure functions of an epoch time: the caller's clock decides (tests inject one; no sleeps).
"""

from __future__ import annotations

import calendar as _cal
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class Unit(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`; ValueError if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


@dataclass(frozen=True, slots=True)
class Calendar:
    unit: Unit | str
    time_zone: str = "UTC"
    anchor: int = 1  # month: day of the month (1-31); week: ISO weekday (1-7); day: 1

    def __post_init__(self) -> None:
        unit = Unit(self.unit)  # ValueError for anything else
        object.__setattr__(self, "unit", unit)
        zone(self.time_zone)
        top = {Unit.DAY: 1, Unit.WEEK: 7, Unit.MONTH: 31}[unit]
        if not 1 <= self.anchor <= top:
            raise ValueError(f"the anchor of a {unit.value} period must be in 1..{top}, not {self.anchor}")

    @property
    def key(self) -> str:
        """Identifies the period scheme in storage keys (a changed zone or anchor starts a new counter)."""
        if self.unit is Unit.DAY and self.time_zone == "UTC":
            return "day"
        if self.unit is Unit.MONTH and self.time_zone == "UTC" and self.anchor == 1:
            return "month"
        return f"{self.unit}.{self.time_zone}.{self.anchor}"

    def bounds(self, epoch: float) -> tuple[float, float]:
        """(start, end) in epoch seconds of the period holding `epoch`: start <= epoch < end."""
        cached = _last.get(self)
        if cached is not None and cached[0] <= epoch < cached[1]:
            return cached
        tz = zone(self.time_zone)
        today = datetime.fromtimestamp(epoch, tz).date()
        first = self._start_on_or_before(today)
        nxt = self._next_start(first)
        start, end = _midnight(first, tz), _midnight(nxt, tz)
        # a local midnight that does not exist (a zone that springs forward at 00:00) maps forward or back
        # by the gap: keep the containing period
        if epoch < start:
            prev = self._start_on_or_before(first - timedelta(days=1))
            start, end = _midnight(prev, tz), start
        elif epoch >= end:
            start, end = end, _midnight(self._next_start(nxt), tz)
        out = (start, end)
        if len(_last) > 4096:
            _last.clear()
        _last[self] = out
        return out

    def _start_on_or_before(self, d: date) -> date:
        if self.unit is Unit.DAY:
            return d
        if self.unit is Unit.WEEK:
            return d - timedelta(days=(d.isoweekday() - self.anchor) % 7)
        this = _anchored(d.year, d.month, self.anchor)
        if d >= this:
            return this
        y, m = (d.year - 1, 12) if d.month == 1 else (d.year, d.month - 1)
        return _anchored(y, m, self.anchor)

    def _next_start(self, start: date) -> date:
        if self.unit is Unit.DAY:
            return start + timedelta(days=1)
        if self.unit is Unit.WEEK:
            return start + timedelta(days=7)
        y, m = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return _anchored(y, m, self.anchor)


_last: dict[Calendar, tuple[float, float]] = {}


def _anchored(year: int, month: int, anchor: int) -> date:
    return date(year, month, min(anchor, _cal.monthrange(year, month)[1]))


def _midnight(d: date, tz: ZoneInfo) -> float:
    return datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()
