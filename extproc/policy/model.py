"""The policy as typed values. Loading and validation live in `loader.py`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from extproc.billing.catalog import PriceCatalog
from extproc.limiter.types import Measure


class Mode(StrEnum):
    ENFORCE = "enforce"  # over a limit: the action decides
    SHADOW = "shadow"  # meter-only: decide and record, never refuse


class Action(StrEnum):
    THROTTLE = "throttle"  # 429 + Retry-After
    BLOCK = "block"  # 403, no Retry-After (a hard stop)
    ALERT = "alert"  # let it through, record an event


class Period(StrEnum):
    """A calendar period of an access quota, in the tenant's time zone."""

    DAY = "day"
    WEEK = "week"  # from Monday 00:00
    MONTH = "month"  # from the tenant's anchor day (`billing_anchor_day`) 00:00


@dataclass(frozen=True)
class LimitRule:
    """One limit: a measure, a number, and what it is counted over.

    Exactly one of `window_s` (an exact sliding window, a second to days) and `period` (a calendar
    period of the scope's tenant) is set, except for `Measure.CONCURRENT`, which has neither.
    """

    measure: Measure
    limit: int
    window_s: float | None = None
    period: Period | None = None
    # canonical model names the rule is narrowed to (aliases resolved at load); None: every model.
    # A request for another model is not counted by this rule.
    models: frozenset[str] | None = None
    action: Action = Action.THROTTLE
    # percents of the limit (calendar rules) that raise an alert event once per period per scope
    alert_at: tuple[int, ...] = ()

    def applies_to(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def describe(self) -> str:
        """How it reads in an error: "output tokens per hour", "requests in flight", "token quota per month"."""
        what = {
            Measure.TOKENS: "tokens",
            Measure.INPUT_TOKENS: "input tokens",
            Measure.OUTPUT_TOKENS: "output tokens",
            Measure.REQUESTS: "requests",
            Measure.CONCURRENT: "requests in flight",
        }[self.measure]
        if self.period is not None:
            text = f"{what} per {self.period.value} (billing period)"
        elif self.window_s is not None:
            text = f"{what} per {window_text(self.window_s)}"
        else:
            text = what
        if self.models is not None:
            text += f" of {', '.join(sorted(self.models))}"
        return text


def window_text(seconds: float) -> str:
    """60 -> "minute", 3600 -> "hour", 1 -> "second", 90 -> "90s", 7200 -> "2h"."""
    names = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
    if seconds in names:
        return names[seconds]
    for size, suffix in ((86400.0, "d"), (3600.0, "h"), (60.0, "m")):
        if seconds % size == 0:
            return f"{int(seconds // size)}{suffix}"
    return f"{seconds:g}s"


# A `limits` block's shorthand keys: (key, measure, window in seconds, calendar). A calendar key
# counts over the block's `quota_period`; a key with neither window nor calendar counts requests in flight.
SHORTHAND: tuple[tuple[str, Measure, float | None, bool], ...] = (
    ("tokens_per_minute", Measure.TOKENS, 60.0, False),
    ("requests_per_minute", Measure.REQUESTS, 60.0, False),
    ("requests_per_hour", Measure.REQUESTS, 3600.0, False),
    ("quota_tokens", Measure.TOKENS, None, True),
    ("quota_requests", Measure.REQUESTS, None, True),
    ("concurrent_requests", Measure.CONCURRENT, None, False),
)


def shorthand_rule(
    measure: Measure, value: int, window: float | None, period: Period | None, action: Action, alert_at: tuple[int, ...]
) -> LimitRule:
    """One shorthand key's rule: the block's action; its alert thresholds when it counts a calendar period."""
    return LimitRule(measure, value, window_s=window, period=period, action=action,
                     alert_at=alert_at if period is not None else ())


@dataclass(frozen=True)
class Limits:
    """Limits of one scope: its rules (none: unlimited) and the action of a rule that names none."""

    rules: tuple[LimitRule, ...] = ()
    action: Action = Action.THROTTLE

    @property
    def empty(self) -> bool:
        return not self.rules

    @classmethod
    def of(
        cls,
        *,
        tokens_per_minute: int | None = None,
        requests_per_minute: int | None = None,
        requests_per_hour: int | None = None,
        quota_tokens: int | None = None,
        quota_requests: int | None = None,
        quota_period: Period = Period.MONTH,
        concurrent_requests: int | None = None,
        action: Action = Action.THROTTLE,
        alert_at: tuple[int, ...] = (),
    ) -> Limits:
        """The policy file's shorthand keys as rules (`SHORTHAND`, the mapping the loader applies)."""
        given = {
            "tokens_per_minute": tokens_per_minute, "requests_per_minute": requests_per_minute,
            "requests_per_hour": requests_per_hour, "quota_tokens": quota_tokens, "quota_requests": quota_requests,
            "concurrent_requests": concurrent_requests,
        }
        rules = [
            shorthand_rule(measure, value, window, quota_period if calendar else None, action, alert_at)
            for key, measure, window, calendar in SHORTHAND
            if (value := given[key]) is not None
        ]
        return cls(rules=tuple(rules), action=action)


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
    # calendar quotas of this tenant and everything under it are counted in this zone...
    time_zone: str = "UTC"
    # ...and its months start on this day (1-31; past a short month's end: that month's last day)
    billing_anchor_day: int = 1


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
class TrustedHeaders:
    """Identity asserted in request headers by an authenticator Envoy consults before the processor
    (an HTTP ext_authz service the configuration generator renders). Envoy strips the client's own
    copies of these headers before that service runs, so only the authenticator can set them."""

    name: str  # names the principal: key id `hdr:<name>:<subject>`
    authorizer: str  # "host:port" of the HTTP ext_authz service
    tenant_header: str  # lowercase header names
    project_header: str | None = None  # else default_project
    default_project: str | None = None
    team_header: str | None = None
    subject_header: str | None = None  # the principal within the tenant (else the tenant itself)
    # subject -> its own limits, as a key's
    subjects: Mapping[str, Limits] = field(default_factory=dict)

    @property
    def headers(self) -> tuple[str, ...]:
        return tuple(h for h in (self.tenant_header, self.project_header, self.team_header, self.subject_header)
                     if h is not None)


@dataclass(frozen=True)
class Identity:
    """How callers other than API keys are identified (the policy's `identity` section)."""

    jwt: tuple[JwtProvider, ...] = ()
    trusted_headers: TrustedHeaders | None = None


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
    # the canonical models it serves (None: every model); a request goes to the first pool, in the
    # policy's order, that serves its model and has headroom
    models: frozenset[str] | None = None
    # owner ("tenant" or "tenant/project") -> its share of the ceiling (tokens per minute, resolved)
    shares: Mapping[str, Share] = field(default_factory=dict)

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class Share:
    """A tenant's (or project's) fair share of a pool's ceiling, in tokens per minute.

    `guaranteed` is kept for it while it uses it: others may borrow it while it is idle, but once it
    asks again, borrowers are refused first. `maximum` caps what it may take of the pool at all."""

    guaranteed: int = 0
    maximum: int | None = None  # None: up to the ceiling


@dataclass(frozen=True)
class Routing:
    """How requests are spread over the pools (the policy's `routing` section)."""

    # a pool that spilled takes new traffic again only below (1 - hysteresis) x its ceiling
    hysteresis: float = 0.1
    # every pool for the model at its ceiling: wait up to this long for room before the 429
    max_wait_ms: int = 0
    show_pool: bool = True  # tell the client which pool served it (x-tokenmeter-pool)


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
    # spill hysteresis, bounded wait, and whether clients see their pool (`routing`)
    routing: Routing = field(default_factory=Routing)
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
