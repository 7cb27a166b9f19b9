"""The audit trail: what happened, to whom, under which policy, in a hash-chained append-only log.

`chain`: the line format and `verify`; `log`: `AuditLog`, the non-blocking writer; `events`: the
events (policy loads and rejections, enforcement, the circuit breaker). `tokenmeter audit verify FILE`
checks a log with nothing but this package.
"""

from extproc.audit.chain import GENESIS, ChainError, VerifyResult, verify
from extproc.audit.events import (
    AuditEvent,
    BreakerState,
    EnforcementKind,
    breaker,
    enforcement,
    policy_changes,
    policy_loaded,
    policy_rejected,
)
from extproc.audit.log import AuditLog, AuditLogError

__all__ = [
    "GENESIS",
    "AuditEvent",
    "AuditLog",
    "AuditLogError",
    "BreakerState",
    "ChainError",
    "EnforcementKind",
    "VerifyResult",
    "breaker",
    "enforcement",
    "policy_changes",
    "policy_loaded",
    "policy_rejected",
    "verify",
]
