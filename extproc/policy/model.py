"""The policy as typed values. Loading and validation live in `loader.py`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from extproc.billing.catalog import PriceCatalog


class Mode(StrEnum):
    ENFORCE = "enforce"  # over a limit: the action decides
    SHADOW = "shadow"  # meter-only: decide and record, never refuse


class Action(StrEnum):
    THROTTLE = "throttle"  # 429 + Retry-After
    BLOCK = "block"  # 403, no Retry-After (a hard stop)
    ALERT = "alert"  # let it through, record an event


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True)
class Limits:
    """Limits of one scope. None means unlimited."""

    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    requests_per_hour: int | None = None
    # access quota per calendar period (UTC), e.g. a monthly token budget
    quota_tokens: int | None = None
    quota_requests: int | None = None
    quota_period: Period = Period.MONTH
    action: Action = Action.THROTTLE

    @property
    def empty(self) -> bool:
        return (
            self.tokens_per_minute is None
            and self.requests_per_minute is None
            and self.requests_per_hour is None
            and self.quota_tokens is None
            and self.quota_requests is None
        )


@dataclass(frozen=True)
class Team:
    name: str
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Project:
    name: str
    limits: Limits = field(default_factory=Limits)
    teams: Mapping[str, Team] = field(default_factory=dict)


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: Limits = field(default_factory=Limits)
    projects: Mapping[str, Project] = field(default_factory=dict)
    mode: Mode | None = None  # shadow for this tenant alone (None: the policy's mode)


@dataclass(frozen=True)
class PreviousDigest:
    """The digest a key had before a rotation: still accepted, as the same key, until `valid_until`."""

    sha256: str
    valid_until: float  # epoch seconds


@dataclass(frozen=True)
class ApiKey:
    key_id: str  # a printable id; the raw key is never stored
    sha256: str  # lowercase hex SHA-256 of the raw key
    tenant: str
    project: str
    team: str | None
    limits: Limits = field(default_factory=Limits)
    # lifecycle: a disabled key, or one outside [not_before, expires), is refused with 403
    disabled: bool = False
    disabled_reason: str | None = None  # told to the caller of a disabled key
    not_before: float | None = None  # epoch seconds; None: valid from the start
    expires: float | None = None  # epoch seconds; None: never expires
    previous: tuple[PreviousDigest, ...] = ()  # rotated-out digests within their grace period
    # the canonical models this key may ask for (aliases resolved at load); None: any model. Any
    # other model is refused with 403 model_not_allowed.
    models: frozenset[str] | None = None

    def entries(self) -> tuple[tuple[str, KeyEntry], ...]:
        """Every digest that names this key, with the time window in which it is valid."""
        start = self.not_before if self.not_before is not None else -math.inf
        end = self.expires if self.expires is not None else math.inf
        out = [(self.sha256, KeyEntry(self, start, end, rotated=False))]
        out.extend((p.sha256, KeyEntry(self, start, min(end, p.valid_until), rotated=True)) for p in self.previous)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """What one digest means, precomputed at load so that identifying a caller is one dict lookup."""

    key: ApiKey
    valid_from: float  # epoch seconds, inclusive; -inf: no lower bound
    valid_until: float  # epoch seconds, exclusive; inf: no upper bound
    rotated: bool  # a digest from before a rotation (ApiKey.previous), not the key's current one


@dataclass(frozen=True)
class JwtProvider:
    """An issuer whose tokens Envoy's jwt_authn filter verifies (signature, expiry, audience) before
    the processor sees the request; the processor maps the verified claims onto the hierarchy."""

    name: str  # also the key of its verified payload in Envoy's jwt_authn metadata
    issuer: str
    jwks: str  # the JWKS JSON (inline in the policy, or read from a file beside it)
    tenant_claim: str  # the claim naming the tenant
    audiences: tuple[str, ...] = ()  # empty: any audience
    project_claim: str | None = None  # the claim naming the project (else default_project)
    default_project: str | None = None
    team_claim: str | None = None
    # subject (`sub`) -> its own limits, as a key's (scope key:jwt:<provider>:<sub>)
    subjects: Mapping[str, Limits] = field(default_factory=dict)


@dataclass(frozen=True)
class Identity:
    """How callers other than API keys are identified (the policy's `identity` section)."""

    jwt: tuple[JwtProvider, ...] = ()


@dataclass(frozen=True)
class Pool:
    name: str  # routing value written to dynamic metadata, e.g. "h100"
    tokens_per_minute: int | None = None  # ceiling; None = no ceiling (an overflow pool)
    # where the pool's model servers listen ("host:port"): `tokenmeter envoy-config` renders one
    # Envoy cluster per pool from these (Envoy reads them at start; the processor never does)
    endpoints: tuple[str, ...] = ()
    # false: its servers do not report usage (no include_usage, no usage object): the processor
    # meters each response on the way (Envoy sends it the body) and counts the text
    reports_usage: bool = True


class OverCap(StrEnum):
    """What happens to a request whose output maximum is above `max_tokens_cap`."""

    CLAMP = "clamp"  # forwarded with its maximum lowered to the cap
    REFUSE = "refuse"  # 400, naming the parameter and the cap


@dataclass(frozen=True)
class RequestRules:
    max_body_bytes: int = 256 * 1024
    default_max_tokens: int = 1024  # output reservation when the request names none
    max_tokens_cap: int = 16384  # output reservation never exceeds this
    over_cap: OverCap = OverCap.CLAMP  # a request asking for more output than the cap


@dataclass(frozen=True)
class Policy:
    version: str
    mode: Mode
    request: RequestRules
    pools: tuple[Pool, ...]  # preference order; the first pool with room serves
    tenants: Mapping[str, Tenant]
    keys_by_sha256: Mapping[str, ApiKey]  # one entry per key, by its current digest
    source: str = ""  # file it came from
    # the models served: the only values a client-chosen model name takes as a metric label
    # (any other is "other"); empty: every model is "other"
    models: frozenset[str] = frozenset()
    # the versioned price catalog (`prices`): what each record costs; None: records carry no cost
    prices: PriceCatalog | None = None
    # JWT issuers (`identity.jwt`): verified by Envoy, mapped onto tenants by the processor
    identity: Identity = field(default_factory=Identity)
    # client model name -> the canonical model it stands for (`aliases`): what the record, the
    # metric labels, a key's allow-list and the forwarded body use
    aliases: Mapping[str, str] = field(default_factory=dict)
    # every digest that names a key (its current one and those of its grace periods after a
    # rotation), derived from keys_by_sha256
    key_entries: Mapping[str, KeyEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entries: dict[str, KeyEntry] = {}
        for key in self.keys_by_sha256.values():
            entries.update(key.entries())
        object.__setattr__(self, "key_entries", entries)

    def key_for_hash(self, digest: str) -> ApiKey | None:
        """The key a digest names (a current or a rotated-out one), whatever its lifecycle state."""
        entry = self.key_entries.get(digest)
        return entry.key if entry is not None else None

    def canonical_model(self, name: str) -> str:
        """The model `name` stands for: its alias target, or the name itself (one dict lookup)."""
        return self.aliases.get(name, name)
