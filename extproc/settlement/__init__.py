"""How requests end: the outcome types (outcome.py) and the one function that ends them
(settle.py: Settlement.end)."""

from extproc.settlement.outcome import Decision, Ending

__all__ = ["Decision", "Ending"]
