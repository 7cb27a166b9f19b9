"""The demo's live view: what its clients saw -> snapshots once a second -> lines (pure, no stack)."""

from __future__ import annotations

import io
import json

from extproc.demo import PHASES, Screen, phase_at, schedule
from extproc.demo_view import (
    PoolView,
    Seen,
    Snapshot,
    Tally,
    Use,
    bar,
    plain_line,
    pool_summary,
    redraw,
    reported_tokens,
    table_lines,
    throttle_summary,
)
from extproc.policy.model import Pool, Share
from extproc.records.record import UsageRecord
from extproc.settlement.outcome import Decision

POOLS = (
    Pool("h100", 3000, shares={"acme": Share(1500, 2700), "globex": Share(1000, 1500)}),
    Pool("a100", 6000, models=frozenset({"llama-3.1-70b"})),
    Pool("cheap"),
)


def _tally() -> Tally:
    return Tally(POOLS, ["acme", "globex"], window_s=6)


def _ok(at: float, tenant: str, pool: str, tokens: int = 100, first: str = "h100") -> Seen:
    return Seen(at, tenant, 200, pool, first, tokens)


def test_a_second_sums_the_last_second_and_the_window_per_pool_and_tenant() -> None:
    tally = _tally()
    for at in (0.5, 1.5, 2.5):
        tally.add(_ok(at, "acme", "h100", 900))
    tally.add(Seen(2.6, "globex", 429, retry_after=2))
    snap = tally.tick(3, "acme alone")
    h100 = snap.pools[0]
    assert (h100.name, h100.ceiling, h100.window, h100.last) == ("h100", 3000, 2700, 900)
    assert h100.uses[0] == Use("acme", last=900, window=2700, guaranteed=1500, maximum=2700)
    assert h100.uses[1] == Use("globex", last=0, window=0, guaranteed=1000, maximum=1500)
    assert snap.throttled == (("acme", 0), ("globex", 1))
    assert snap.events == () and snap.spills == ()
    # seven seconds on, the first two have left the 6 s window
    assert tally.tick(7.9, "quiet").pools[0].window == 900


def test_a_spill_is_an_event_once_and_counted_every_second() -> None:
    tally = _tally()
    tally.add(_ok(0.5, "acme", "h100", 2655))
    tally.add(_ok(1.2, "acme", "a100", 135))
    tally.add(_ok(1.4, "acme", "cheap", 115))
    first = tally.tick(2, "acme alone")
    assert first.spills == (("acme", "h100", "a100", 1), ("acme", "h100", "cheap", 1))
    assert first.events == (
        "acme spills from h100 to a100 (h100 2655/3000 in the window, acme 2655 of its max 2700)",
        "acme spills from h100 to cheap (h100 2655/3000 in the window, acme 2655 of its max 2700)",
    )
    tally.add(_ok(2.5, "acme", "a100", 135))
    again = tally.tick(3, "acme alone")
    assert again.spills == (("acme", "h100", "a100", 1),) and again.events == ()


def test_a_returning_owner_wins_back_its_guarantee_and_the_borrower_is_pushed_off() -> None:
    tally = _tally()
    tally.add(_ok(0.5, "acme", "h100", 1000))
    tally.add(_ok(2.5, "acme", "h100", 1000))  # acme: 2000, above its guarantee of 1500
    assert tally.tick(3, "acme alone").events == ()
    tally.add(_ok(3.5, "globex", "h100", 300))
    assert tally.tick(4, "globex comes back").events == (
        "globex comes back to h100 (guarantee 1000) while acme borrows (2000 in the window, above its guarantee "
        "of 1500): borrowers are refused first",)
    tally.add(_ok(4.5, "globex", "h100", 300))
    tally.add(_ok(4.6, "acme", "a100", 500))
    assert tally.tick(5, "globex comes back").events == (
        "acme spills from h100 to a100 (h100 2600/3000 in the window, acme 2000 of its max 2700)",)
    tally.add(_ok(6.5, "globex", "h100", 300))  # 900: a request of its size no longer fits within 1000
    assert tally.tick(7, "globex comes back").events == (
        "globex wins back its guarantee on h100 (900 in the window, within a request of its 1000): "
        "acme down from 2000 to 1000 on h100, pushed to a100",)  # where it went since globex came back
    tally.add(_ok(7.5, "globex", "h100", 10))
    assert tally.tick(8, "globex comes back").events == ()  # once


def test_no_win_back_when_nobody_borrowed() -> None:
    tally = _tally()
    tally.add(_ok(0.5, "acme", "h100", 1000))  # within its guarantee
    tally.tick(1, "p")
    tally.add(_ok(1.5, "globex", "h100", 1000))
    assert tally.tick(2, "p").events == ()


def test_a_pool_drains_and_a_tenant_is_back_after_a_whole_window_without_a_spill() -> None:
    tally = _tally()
    tally.add(_ok(0.5, "acme", "h100", 2700))
    tally.add(_ok(0.6, "acme", "a100", 100))
    assert len(tally.tick(1, "acme alone").events) == 1
    assert tally.tick(7, "quiet").events == ("h100 drained: 0/3000 in the window", "a100 drained: 0/6000 in the window")
    tally.add(_ok(7.5, "acme", "h100", 100))
    assert tally.tick(8, "acme again").events == (
        "acme back on h100 (h100 100/3000 in the window): no spill for a whole window",)
    tally.add(_ok(8.5, "acme", "a100", 100))  # spilling again is news again
    assert tally.tick(9, "acme again").events[0].startswith("acme spills from h100 to a100")


def test_a_refused_or_failed_request_is_no_tokens_and_no_spill() -> None:
    seen = Seen(1, "globex", 429, first="h100", retry_after=1)
    assert not seen.ok and not seen.spilled
    assert not Seen(1, "acme", 0).ok  # the connection failed
    assert _ok(1, "acme", "a100").spilled and not _ok(1, "acme", "h100").spilled


SNAP = Snapshot(
    at=9, phase="globex comes back", window_s=6,
    pools=(
        PoolView("h100", 3000, (Use("acme", 350, 1500, 1500, 2700), Use("globex", 250, 900, 1000, 1500))),
        PoolView("a100", 6000, (Use("acme", 600, 3100), Use("globex", 0, 0))),
        PoolView("cheap", None, (Use("acme", 0, 0), Use("globex", 0, 0))),
    ),
    throttled=(("acme", 0), ("globex", 2)),
    spills=(("acme", "h100", "a100", 5),),
)


def test_the_plain_line_names_each_pool_its_window_and_who_used_it() -> None:
    assert plain_line(SNAP) == (
        "t=9s [globex comes back] | h100 2400/3000: acme 1500 (+350) globex 900 (+250) | "
        "a100 3100/6000: acme 3100 (+600) | cheap 0 | 429/s: globex 2 | spilled/s: acme h100->a100 5"
    )


def test_the_table_has_a_bar_per_tenant_against_the_ceiling_with_its_guarantee_and_max() -> None:
    lines = table_lines(SNAP)
    assert lines[0] == "t=9s  globex comes back  (pool window 6 s)"
    assert lines[1] == "  tenant last 1s window  of the ceiling ('|' guaranteed, ']' max)"
    assert lines[2] == "h100    2400/3000 in the window, +600 in the last second"
    assert lines[3] == "  acme      +350   1500  ██████████████|···········]···  g1500 max2700"
    assert lines[4] == "  globex    +250    900  █████████|····]···············  g1000 max1500"
    assert lines[6] == "  acme      +600   3100  ████████████████··············"
    assert lines[8] == "cheap   0 (no ceiling) in the window, +0 in the last second"
    assert lines[9] == "  acme        +0      0"
    assert lines[-1] == "429/s: acme 0  globex 2    spilled/s: acme h100->a100 5"
    assert len(lines) == 12 and max(len(line) for line in lines) < 80


def test_bar_marks() -> None:
    assert bar(0, 3000, width=10) == "··········"
    assert bar(3000, 3000, width=10) == "██████████"
    assert bar(9999, 3000, width=10) == "██████████"
    assert bar(1500, 3000, guaranteed=1500, maximum=2700, width=10) == "████|···]·"
    assert bar(100, 3000, maximum=3000, width=10) == "··········"  # a max at the ceiling is no mark


def test_redraw_replaces_the_lines_drawn_last() -> None:
    assert redraw(0, ["a", "b"]) == "\x1b[Ja\nb\n"
    assert redraw(2, ["c"]) == "\x1b[2F\x1b[Jc\n"


def test_the_screen_redraws_the_table_in_a_terminal_and_prints_a_line_a_second_elsewhere() -> None:
    plain = io.StringIO()
    screen = Screen(plain, tty=False)
    screen.say(["== phase 1/4"])
    screen.show(["t=1s", "h100 ..."], "t=1s [p] | h100 0/3000")
    screen.show(["t=2s", "h100 ..."], "t=2s [p] | h100 0/3000")
    assert plain.getvalue() == "== phase 1/4\nt=1s [p] | h100 0/3000\nt=2s [p] | h100 0/3000\n"
    tty = io.StringIO()
    screen = Screen(tty, tty=True)
    screen.show(["t=1s", "h100 ..."], "")
    screen.say(["   t=1s  acme spills"])  # above the table, which is drawn again
    screen.show(["t=2s", "h100 ...."], "")
    assert tty.getvalue() == ("\x1b[Jt=1s\nh100 ...\n"
                              "\x1b[2F\x1b[J   t=1s  acme spills\nt=1s\nh100 ...\n"
                              "\x1b[2F\x1b[Jt=2s\nh100 ....\n")


def _record(tenant: str, pool: str | None, model: str, decision: Decision = Decision.ADMITTED) -> UsageRecord:
    return UsageRecord(request_id="r", time=0, decision=decision, policy_version="v", tenant=tenant, model=model,
                       pool=pool, prompt_tokens=15, completion_tokens=100)


def test_the_pool_summary_counts_requests_tokens_and_spills_per_pool_and_tenant() -> None:
    records = [
        _record("acme", "h100", "llama-3.1-70b"),
        _record("acme", "a100", "llama-3.1-70b"),
        _record("acme", "cheap", "llama-3.1-8b"),
        _record("acme", "cheap", "llama-3.1-70b"),  # past a100 too
        _record("globex", "h100", "llama-3.1-70b"),
        _record("globex", None, "llama-3.1-70b", Decision.THROTTLED),
    ]
    assert pool_summary(records, POOLS).splitlines() == [
        "pool   tenant  requests  tokens  spilled here",
        "-----  ------  --------  ------  ------------",
        "h100   acme           1     115             -",
        "h100   globex         1     115             -",
        "a100   acme           1     115             1",
        "cheap  acme           2     230             2",
        "spills: acme 3 (h100->a100 1, h100->cheap 2)",
    ]


def test_throttles_are_summed_with_their_retry_after() -> None:
    assert throttle_summary([]) == "429s: none"
    seen = [Seen(1, "globex", 429, retry_after=1), Seen(2, "globex", 429, retry_after=3), Seen(3, "acme", 429)]
    assert throttle_summary(seen) == "429s: acme 1; globex 2, Retry-After 1-3 s"


def test_reported_tokens_of_json_bodies_and_streams() -> None:
    openai = {"usage": {"prompt_tokens": 15, "completion_tokens": 100, "total_tokens": 115}}
    anthropic = {"usage": {"input_tokens": 15, "output_tokens": 100}}
    assert reported_tokens(json.dumps(openai).encode()) == 115
    assert reported_tokens(json.dumps(anthropic).encode()) == 115
    assert reported_tokens(b'{"error": {"message": "slow down"}}') == 0
    chat_stream = (
        'data: {"choices": [{"delta": {"content": "tok0"}}], "usage": null}\n\n'
        'data: {"choices": [], "usage": {"prompt_tokens": 15, "completion_tokens": 2}}\n\n'
        "data: [DONE]\n\n"
    )
    assert reported_tokens(chat_stream.encode()) == 17
    messages_stream = (
        "event: message_start\n"
        'data: {"type": "message_start", "message": {"usage": {"input_tokens": 15, "output_tokens": 1}}}\n\n'
        "event: message_delta\n"
        'data: {"type": "message_delta", "usage": {"output_tokens": 100}}\n\n'
        'event: message_stop\ndata: {"type": "message_stop"}\n\n'
    )
    assert reported_tokens(messages_stream.encode()) == 115
    assert reported_tokens(b"") == 0


def test_the_demo_schedule_runs_its_phases_in_order() -> None:
    sends = schedule(PHASES)
    assert [s.at for s in sends] == sorted(s.at for s in sends)
    assert len({s.n for s in sends}) == len(sends)
    total = sum(p.seconds for p in PHASES)
    assert 20 <= total <= 40
    quiet = [i for i, p in enumerate(PHASES) if not p.flows]
    assert quiet and not any(phase_at(PHASES, s.at) in quiet for s in sends)
    assert phase_at(PHASES, 0) == 0 and phase_at(PHASES, total + 5) == len(PHASES) - 1
    globex = [s for s in sends if s.flow.key == "globex-search"]
    assert globex and min(s.at for s in globex) == PHASES[0].seconds, "globex comes in phase 2"
