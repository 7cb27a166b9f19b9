"""The policy: typed values, the strict file loader (on the pydantic schema of the file) and the
hot-reloading store."""

from extproc.policy.keys import hash_key
from extproc.policy.loader import PolicyError, load_policy, parse_policy
from extproc.policy.model import (
    Action,
    ApiKey,
    LimitRule,
    Limits,
    Mode,
    OverCap,
    Period,
    Policy,
    Pool,
    Project,
    RequestRules,
    Team,
    Tenant,
    TrustedHeaders,
)
from extproc.policy.watch import PolicyStore

__all__ = [
    "Action",
    "ApiKey",
    "LimitRule",
    "Limits",
    "Mode",
    "OverCap",
    "Period",
    "Policy",
    "PolicyError",
    "PolicyStore",
    "Pool",
    "Project",
    "RequestRules",
    "Team",
    "Tenant",
    "TrustedHeaders",
    "hash_key",
    "load_policy",
    "parse_policy",
]
