"""Calendar periods of access quotas (extproc.limiter.calendar): days, weeks and months in a time zone,
from an anchor day; daylight-saving days; anchors past a month's end; leap years; tiling."""

from __future__ import annotations

from calendar import monthrange
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.limiter.calendar import Calendar, Unit

HOUR = 3600.0
DAY = 86400.0
ZONES = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Europe/Berlin",
    "Asia/Tokyo",
    "Asia/Kolkata",  # +05:30, no daylight saving
    "Australia/Lord_Howe",  # a 30-minute daylight-saving shift
    "Pacific/Chatham",  # +12:45 / +13:45
    "America/St_Johns",  # -03:30
    "America/Santiago",  # springs forward at local midnight: some days have no 00:00
    "America/Havana",  # likewise
    "Asia/Beirut",  # likewise
    "Pacific/Apia",  # skipped a whole day (30 December 2011)
]


def local(ts: float, tz: str) -> datetime:
    return datetime.fromtimestamp(ts, ZoneInfo(tz))


def utc(y: int, m: int, d: int, hh: int = 0, mm: int = 0, ss: int = 0) -> float:
    return datetime(y, m, d, hh, mm, ss, tzinfo=UTC).timestamp()


def at_midnight(y: int, m: int, d: int, tz: str) -> float:
    return datetime(y, m, d, tzinfo=ZoneInfo(tz)).timestamp()


# -- examples ---------------------------------------------------------------------------------------


def test_a_utc_day_and_month() -> None:
    t = utc(2025, 6, 18, 13, 5)
    assert Calendar("day").bounds(t) == (utc(2025, 6, 18), utc(2025, 6, 19))
    assert Calendar("month").bounds(t) == (utc(2025, 6, 1), utc(2025, 7, 1))
    assert Calendar("month").bounds(utc(2025, 12, 31, 23, 59, 59)) == (utc(2025, 12, 1), utc(2026, 1, 1))


def test_daylight_saving_days_are_23_and_25_hours_long() -> None:
    ny = Calendar("day", "America/New_York")
    start, end = ny.bounds(utc(2025, 3, 9, 16))  # the day clocks spring forward
    assert (start, end) == (utc(2025, 3, 9, 5), utc(2025, 3, 10, 4))  # midnight EST .. midnight EDT
    assert end - start == 23 * HOUR
    start, end = ny.bounds(utc(2025, 11, 2, 16))  # the day they fall back
    assert (start, end) == (utc(2025, 11, 2, 4), utc(2025, 11, 3, 5))
    assert end - start == 25 * HOUR
    lord_howe = Calendar("day", "Australia/Lord_Howe")
    start, end = lord_howe.bounds(at_midnight(2025, 4, 6, "Australia/Lord_Howe") + 12 * HOUR)
    assert end - start == 24.5 * HOUR


def test_a_day_whose_midnight_does_not_exist_starts_when_it_does() -> None:
    # Santiago springs forward at 00:00 on 7 September 2025: the day begins at 01:00 local (04:00 UTC)
    start, end = Calendar("day", "America/Santiago").bounds(utc(2025, 9, 7, 12))
    assert start == utc(2025, 9, 7, 4)
    assert local(start, "America/Santiago").hour == 1
    assert end == utc(2025, 9, 8, 3)  # midnight -03
    assert end - start == 23 * HOUR
    prev_start, prev_end = Calendar("day", "America/Santiago").bounds(start - 1)
    assert (prev_start, prev_end) == (utc(2025, 9, 6, 4), start)


def test_a_skipped_day_belongs_to_no_period_of_its_own() -> None:
    # Samoa skipped 30 December 2011: the 29th ended at midnight, and the 31st began then
    apia = Calendar("day", "Pacific/Apia")
    start, end = apia.bounds(at_midnight(2011, 12, 29, "Pacific/Apia") + HOUR)
    assert start == at_midnight(2011, 12, 29, "Pacific/Apia") and end - start == DAY
    assert local(end, "Pacific/Apia").date() == date(2011, 12, 31)
    assert apia.bounds(end) == (end, at_midnight(2012, 1, 1, "Pacific/Apia"))


def test_a_monthly_anchor_past_the_months_end_means_its_last_day() -> None:
    on_31 = Calendar("month", "UTC", 31)
    assert on_31.bounds(utc(2025, 2, 15)) == (utc(2025, 1, 31), utc(2025, 2, 28))
    assert on_31.bounds(utc(2025, 2, 28)) == (utc(2025, 2, 28), utc(2025, 3, 31))
    assert on_31.bounds(utc(2025, 4, 15)) == (utc(2025, 3, 31), utc(2025, 4, 30))
    assert on_31.bounds(utc(2025, 4, 30)) == (utc(2025, 4, 30), utc(2025, 5, 31))
    # a leap year: the 29th of February exists
    assert on_31.bounds(utc(2024, 2, 15)) == (utc(2024, 1, 31), utc(2024, 2, 29))
    assert Calendar("month", "UTC", 29).bounds(utc(2024, 2, 29, 12)) == (utc(2024, 2, 29), utc(2024, 3, 29))
    assert Calendar("month", "UTC", 29).bounds(utc(2023, 2, 28, 12)) == (utc(2023, 2, 28), utc(2023, 3, 29))
    assert Calendar("month", "UTC", 30).bounds(utc(2023, 2, 27)) == (utc(2023, 1, 30), utc(2023, 2, 28))


def test_a_month_anchored_on_the_15th_in_new_york() -> None:
    cal = Calendar("month", "America/New_York", 15)
    start, end = cal.bounds(utc(2025, 3, 1))
    assert (start, end) == (at_midnight(2025, 2, 15, "America/New_York"), at_midnight(2025, 3, 15, "America/New_York"))
    assert (start, end) == (utc(2025, 2, 15, 5), utc(2025, 3, 15, 4))  # EST then EDT
    assert cal.bounds(end - 0.001) == (start, end)
    assert cal.bounds(end)[0] == end
    # the period that spans the fall-back change is an hour longer than its days
    start, end = cal.bounds(utc(2025, 11, 1))
    assert end - start == 31 * DAY + HOUR


def test_weeks_start_on_the_anchor_weekday() -> None:
    monday = Calendar("week", "UTC", 1)
    assert monday.bounds(utc(2025, 6, 18, 10)) == (utc(2025, 6, 16), utc(2025, 6, 23))  # a Wednesday
    assert monday.bounds(utc(2025, 6, 16)) == (utc(2025, 6, 16), utc(2025, 6, 23))
    assert monday.bounds(utc(2025, 6, 15, 23, 59, 59)) == (utc(2025, 6, 9), utc(2025, 6, 16))
    sunday = Calendar("week", "UTC", 7)
    assert sunday.bounds(utc(2025, 6, 18, 10)) == (utc(2025, 6, 15), utc(2025, 6, 22))
    # a week across the new year and a leap day
    assert monday.bounds(utc(2025, 1, 1)) == (utc(2024, 12, 30), utc(2025, 1, 6))
    assert Calendar("week", "UTC", 4).bounds(utc(2024, 3, 1)) == (utc(2024, 2, 29), utc(2024, 3, 7))
    # Berlin: Monday 00:00 local is Sunday 22:00 UTC in summer
    berlin = Calendar("week", "Europe/Berlin", 1)
    assert berlin.bounds(utc(2025, 6, 15, 22, 30)) == (utc(2025, 6, 15, 22), utc(2025, 6, 22, 22))


def test_leap_days() -> None:
    assert Calendar("day").bounds(utc(2024, 2, 29, 23)) == (utc(2024, 2, 29), utc(2024, 3, 1))
    assert Calendar("month").bounds(utc(2024, 2, 10)) == (utc(2024, 2, 1), utc(2024, 3, 1))
    assert Calendar("month").bounds(utc(2100, 2, 10)) == (utc(2100, 2, 1), utc(2100, 3, 1))  # not a leap year
    assert Calendar("month").bounds(utc(2000, 2, 29)) == (utc(2000, 2, 1), utc(2000, 3, 1))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("day", "Mars/Olympus_Mons"), "unknown time zone"),
        (("day", ""), "unknown time zone"),
        (("day", "../etc/passwd"), "unknown time zone"),
        (("month", "UTC", 0), "anchor"),
        (("month", "UTC", 32), "anchor"),
        (("week", "UTC", 0), "anchor"),
        (("week", "UTC", 8), "anchor"),
        (("day", "UTC", 2), "anchor"),
        (("year",), "year"),
    ],
)
def test_invalid_calendars_are_refused(args: tuple[str | int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Calendar(*args)  # type: ignore[arg-type]


def test_the_storage_key_names_the_scheme() -> None:
    assert Calendar("day").key == "day"
    assert Calendar("month").key == "month"
    assert Calendar("month", "UTC", 15).key == "month.UTC.15"
    assert Calendar("week", "Europe/Berlin", 1).key == "week.Europe/Berlin.1"
    assert Calendar("day", "Asia/Tokyo").key == "day.Asia/Tokyo.1"
    assert Calendar("day").unit is Unit.DAY


# -- properties -------------------------------------------------------------------------------------


@st.composite
def calendars(draw: st.DrawFn) -> Calendar:
    unit = draw(st.sampled_from(list(Unit)))
    top = {Unit.DAY: 1, Unit.WEEK: 7, Unit.MONTH: 31}[unit]
    return Calendar(unit, draw(st.sampled_from(ZONES)), draw(st.integers(1, top)))


instants = st.floats(min_value=utc(1971, 1, 1), max_value=utc(2099, 12, 31), allow_nan=False)


def starts_on_its_anchor(cal: Calendar, start: float) -> bool:
    """A period starts at the first instant of a local date (its midnight, or the end of a gap that
    swallowed the midnight), and the anchored date lies between the date before that instant (excluded)
    and the start's own date: {the start's date} normally, two dates where a day was skipped."""
    first = local(start, cal.time_zone).date()
    before = local(start - 0.001, cal.time_zone).date()
    if not before < first:
        return False
    days = [before + timedelta(n) for n in range(1, (first - before).days + 1)]
    if cal.unit is Unit.WEEK:
        return any(d.isoweekday() == cal.anchor for d in days)
    if cal.unit is Unit.MONTH:
        return any(d.day == min(cal.anchor, monthrange(d.year, d.month)[1]) for d in days)
    return True


@settings(max_examples=600, deadline=None)
@given(cal=calendars(), t=instants)
def test_every_instant_lies_in_one_period_and_periods_tile(cal: Calendar, t: float) -> None:
    start, end = cal.bounds(t)
    assert start <= t < end
    assert cal.bounds(t) == (start, end)  # (the cached answer is the same)
    # the period is its own from its first instant to its last; the next starts where it ends and the
    # previous ends where it starts
    assert cal.bounds(start) == (start, end)
    assert cal.bounds(end - 0.001)[1] == end
    nxt = cal.bounds(end)
    assert nxt[0] == end and nxt[1] > end
    prev = cal.bounds(start - 0.001)
    assert prev[1] == start and prev[0] < start
    length = end - start
    # a day skipped by the zone (Apia, 30 December 2011) shortens its week or month by a day
    skipped = DAY if cal.time_zone == "Pacific/Apia" and start <= utc(2011, 12, 30, 10) < end else 0.0
    shortest, longest = {Unit.DAY: (DAY, DAY), Unit.WEEK: (7 * DAY, 7 * DAY), Unit.MONTH: (28 * DAY, 31 * DAY)}[
        Unit(cal.unit)]
    assert shortest - 2 * HOUR - skipped <= length <= longest + 2 * HOUR
    assert starts_on_its_anchor(cal, start)
