"""Test doubles shared by the unit tests: a sink that keeps what it is given."""

from __future__ import annotations

from extproc.records.record import UsageRecord


class ListSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def emit(self, record: UsageRecord) -> None:
        self.records.append(record)
