"""The one error a policy file can give: `file:line: reason`."""

from __future__ import annotations


class PolicyError(Exception):
    """A policy file that cannot be used: `file:line: reason` (line is 1-based, may be unknown)."""

    def __init__(self, file: str, line: int | None, reason: str) -> None:
        super().__init__(file, line, reason)
        self.file = file
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.reason}"
        return f"{self.file}:{self.line}: {self.reason}"
