"""Summaries of usage records: the demo's table and `tokenmeter report`."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from extproc.records.record import UsageRecord
from extproc.settlement.outcome import Decision


@dataclass
class Row:
    tenant: str
    key_id: str
    admitted: int = 0
    throttled: int = 0
    refused: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: int = 0
    pools: Counter[str] = field(default_factory=Counter)


def summarize(records: Iterable[UsageRecord]) -> list[Row]:
    rows: dict[tuple[str, str], Row] = defaultdict(lambda: Row("", ""))
    for r in records:
        k = (r.tenant or "(unknown)", r.key_id or "(unknown key)")
        row = rows[k]
        row.tenant, row.key_id = k
        if r.decision.admitted:
            row.admitted += 1
            row.prompt_tokens += r.prompt_tokens
            row.completion_tokens += r.completion_tokens
            row.estimated += r.usage_source == "estimated"
            if r.pool:
                row.pools[r.pool] += 1
        elif r.decision in (Decision.THROTTLED, Decision.BLOCKED):
            row.throttled += 1
        else:
            row.refused += 1
    return sorted(rows.values(), key=lambda x: (x.tenant, x.key_id))


def format_table(rows: list[Row]) -> str:
    header = ("tenant", "key", "admitted", "throttled", "refused", "prompt tok", "completion tok", "pools")
    body = [
        (
            r.tenant,
            r.key_id,
            str(r.admitted),
            str(r.throttled),
            str(r.refused),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            " ".join(f"{p}={n}" for p, n in sorted(r.pools.items())) or "-",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)
