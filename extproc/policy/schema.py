"""The policy file's schema: one pydantic model per kind of mapping, as written in the YAML.

These models say what a policy file may contain, field by field, and check each value on its own
(types, ranges, names, the shape of a rule). What needs the whole file (that a key's tenant
exists, a model is listed, a percent has a parent rule to be a share of) is checked where the typed
policy is built (`extproc.policy.build`). The JSON Schema of the file (`policy_json_schema`, and
`tokenmeter policy schema`) is generated from these models, with their field docs as descriptions.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from extproc.limiter.types import Measure
from extproc.policy.fields import (
    AlertAt,
    AnchorDay,
    Bool,
    Claim,
    Currency,
    Endpoint,
    Header,
    LimitValue,
    ModelName,
    Name,
    Owner,
    PositiveInt,
    Rate,
    Reason,
    Sha256,
    Text,
    Timestamp,
    TimeZone,
    Window,
    enum_of,
    list_of,
    map_of,
    problem,
)
from extproc.policy.lines import NULL
from extproc.policy.model import Action, Mode, OverCap, Period

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

ModeField = Annotated[Mode, enum_of(Mode)]
ActionField = Annotated[Action, enum_of(Action)]
PeriodField = Annotated[Period, enum_of(Period)]
OverCapField = Annotated[OverCap, enum_of(OverCap)]
ModelList = Annotated[list[ModelName], Field(min_length=1), list_of("a non-empty list of model names", non_empty=True)]


class Doc(BaseModel):
    """A mapping of the policy file: only its own keys, each once (an unknown key is an error that
    lists the allowed ones), values of exactly the declared types."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True, hide_input_in_errors=True,
        model_title_generator=lambda cls: cls.__name__.removesuffix("Doc"),
    )
    # an empty body (`name:`) stands for an empty mapping
    empty_body_ok: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if data is NULL and cls.empty_body_ok:
            return {}
        if isinstance(data, dict):
            allowed = cls.allowed_keys()
            for key in data:
                if key not in allowed:
                    raise problem(f"unknown key '{key}' in {{place}} (allowed: {', '.join(allowed)})", at_key=(key,))
        return data

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        return tuple(f.alias or name for name, f in cls.model_fields.items())


# -- limits -----------------------------------------------------------------------------

MEASURES: tuple[str, ...] = tuple(m.value for m in Measure)


class RuleDoc(Doc):
    """One limit: exactly one measure with its number, and what it is counted over."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {"oneOf": [{"required": [m]} for m in MEASURES]},
                {"not": {"required": ["window", "period"]}},
            ]
        }
    )

    tokens: LimitValue | None = None
    """Tokens (input + output) allowed in the window or period: a number, or on a project or a team
    a percent ("40%") of the parent's rule with the same measure, window or period, and models."""
    input_tokens: LimitValue | None = None
    """Input (prompt) tokens allowed: a number or a percent, as for `tokens`."""
    output_tokens: LimitValue | None = None
    """Output (completion) tokens allowed: a number or a percent, as for `tokens`."""
    requests: LimitValue | None = None
    """Requests allowed: a number or a percent, as for `tokens`."""
    concurrent: LimitValue | None = None
    """Requests in flight at once (no window or period): a number or a percent, as for `tokens`."""
    window: Window | None = None
    """A sliding window: "1s", "30s", "1m", "5m", "1h", "1d"... or whole seconds; at most 7 days.
    Give `window` or `period`, not both (neither for `concurrent`)."""
    period: PeriodField | None = None
    """A calendar period in the tenant's time zone: day, week (from Monday) or month (from the
    tenant's billing_anchor_day)."""
    models: ModelList | None = None
    """Count only requests for these models (names or aliases from `models`/`aliases`); omit it to
    count every model."""
    action: ActionField | None = None
    """What happens over this rule (default: the block's `action`)."""
    alert_at: AlertAt | None = None
    """Percents of the limit that raise an alert event, once per period (period rules only;
    default: the block's `alert_at`)."""

    @model_validator(mode="after")
    def _shape(self) -> RuleDoc:
        measures = [m for m in MEASURES if getattr(self, m) is not None]
        if not measures:
            raise problem(f"{{where}}: a rule needs one measure: {', '.join(MEASURES)}")
        if len(measures) > 1:
            raise problem(
                f"{{where}}: a rule has one measure, got {' and '.join(measures)} (write one rule each)",
                at_key=(measures[1],),
            )
        if measures[0] == Measure.CONCURRENT.value:
            for key in ("window", "period"):
                if getattr(self, key) is not None:
                    raise problem(
                        f"{{where}}: a concurrent rule counts requests in flight: it takes no {key}", at_key=(key,)
                    )
        elif self.window is not None and self.period is not None:
            raise problem("{where}: give window (sliding) or period (calendar), not both", at_key=("period",))
        elif self.window is None and self.period is None:
            raise problem(
                f"{{where}}: the {measures[0]} rule needs a window (e.g. 1m, 1h) or a period (day, week, month)"
            )
        if self.alert_at is not None and self.period is None:
            raise problem("{where}: alert_at is for period (calendar) rules only", at_key=("alert_at",))
        return self

    @property
    def measure(self) -> Measure:
        return next(Measure(m) for m in MEASURES if getattr(self, m) is not None)

    @property
    def value(self) -> int | str:
        found = getattr(self, self.measure.value)
        assert isinstance(found, int | str)
        return found


RuleList = Annotated[list[RuleDoc], list_of("a list of rules")]


class LimitsDoc(Doc):
    """Limits of one scope (a tenant, project, team, key or subject). A request is admitted only if
    every rule of every scope it belongs to has room. An omitted limit is unlimited."""

    tokens_per_minute: PositiveInt | None = None
    """Tokens (input + output) in a sliding minute."""
    requests_per_minute: PositiveInt | None = None
    """Requests in a sliding minute."""
    requests_per_hour: PositiveInt | None = None
    """Requests in a sliding hour."""
    quota_tokens: PositiveInt | None = None
    """Tokens per calendar period (`quota_period`)."""
    quota_requests: PositiveInt | None = None
    """Requests per calendar period (`quota_period`)."""
    quota_period: PeriodField = Period.MONTH
    """The calendar period of quota_tokens and quota_requests (in the tenant's time zone)."""
    concurrent_requests: PositiveInt | None = None
    """Requests in flight at once."""
    action: ActionField = Action.THROTTLE
    """What happens over any rule of this block that names no action of its own: throttle (429 and
    Retry-After), block (403, a hard stop) or alert (let through, record an event)."""
    alert_at: AlertAt | None = None
    """Percents of the limit at which the block's period rules that name none raise an alert event,
    once per period, e.g. [80, 100]."""
    rules: RuleList | None = None
    """Further rules: any measure, window or period, narrowed to some models if asked."""

    @model_validator(mode="after")
    def _alerts_have_periods(self) -> LimitsDoc:
        if self.alert_at is None:
            return self
        quotas = self.quota_tokens is not None or self.quota_requests is not None
        if not quotas and not any(rule.period is not None for rule in self.rules or ()):
            raise problem(
                "{where}: alert_at applies to period (calendar) rules, and this block has none "
                "(add quota_tokens, quota_requests or a rule with a period)",
                at_key=("alert_at",),
            )
        return self


# -- the hierarchy ----------------------------------------------------------------------


class TeamDoc(Doc):
    """A team of a project (an empty body is fine)."""

    empty_body_ok: ClassVar[bool] = True

    limits: LimitsDoc | None = None
    """The team's own limits (a percent is a share of the project's like rule)."""


class ProjectDoc(Doc):
    """A project of a tenant (an empty body is fine)."""

    empty_body_ok: ClassVar[bool] = True

    limits: LimitsDoc | None = None
    """The project's own limits (a percent is a share of the tenant's like rule)."""
    teams: Annotated[dict[Name, TeamDoc | None], map_of("a mapping of team names to teams")] | None = None
    """Teams of this project, by name."""


class TenantDoc(Doc):
    """A tenant: its limits, projects, mode and billing calendar (an empty body is fine)."""

    empty_body_ok: ClassVar[bool] = True

    limits: LimitsDoc | None = None
    """The tenant's own limits."""
    projects: Annotated[dict[Name, ProjectDoc | None], map_of("a mapping of project names to projects")] | None = None
    """Projects of this tenant, by name."""
    mode: ModeField | None = None
    """shadow: this tenant alone is metered and recorded, never refused (default: the policy's mode)."""
    time_zone: TimeZone = "UTC"
    """The IANA time zone (e.g. Europe/Berlin) in which the calendar periods of this tenant and
    everything under it start."""
    billing_anchor_day: AnchorDay = 1
    """The day of the month (1-31) monthly periods start on, at 00:00 in `time_zone`; past a short
    month's end, that month's last day."""


# -- keys -------------------------------------------------------------------------------


class PreviousDoc(Doc):
    """A digest the key had before a rotation, still accepted until `valid_until`."""

    sha256: Sha256
    """The lowercase hex SHA-256 of the old key."""
    valid_until: Timestamp
    """End of the grace period (exclusive): an ISO-8601 timestamp with a UTC offset."""


class KeyDoc(Doc):
    """An API key, stored only as the SHA-256 of the raw key."""

    id: Name
    """A printable id: named in records, metrics and errors."""
    sha256: Sha256
    """The lowercase hex SHA-256 of the raw key (`tokenmeter hash-key`)."""
    tenant: Name
    """A tenant under `tenants`."""
    project: Name
    """A project of that tenant."""
    team: Name | None = None
    """A team of that project (optional)."""
    limits: LimitsDoc | None = None
    """The key's own limits."""
    disabled: Bool = False
    """true: refused with 403 key_disabled."""
    reason: Reason | None = None
    """Why the key is disabled (only with disabled: true): told to its caller."""
    not_before: Timestamp | None = None
    """Refused (403 key_not_yet_valid) before this instant: ISO-8601 with a UTC offset."""
    expires: Timestamp | None = None
    """Refused (403 key_expired) from this instant on: ISO-8601 with a UTC offset."""
    previous: (
        Annotated[
            list[PreviousDoc],
            Field(min_length=1),
            list_of("a non-empty list of {sha256: ..., valid_until: <timestamp>}", non_empty=True),
        ]
        | None
    ) = None
    """Digests from before a rotation, each accepted until its valid_until."""
    models: (
        Annotated[
            list[ModelName],
            Field(min_length=1),
            list_of("a non-empty list of model names (omit it to allow every model)", non_empty=True),
        ]
        | None
    ) = None
    """The only models this key may ask for (names or aliases); omit it to allow any model."""

    @model_validator(mode="after")
    def _lifecycle(self) -> KeyDoc:
        if self.not_before is not None and self.expires is not None and self.expires <= self.not_before:
            raise problem("expires must be later than not_before", at=("expires",))
        if self.reason is not None and not self.disabled:
            raise problem("reason is only for a disabled key (add disabled: true)", at=("reason",))
        return self


# -- pools, request, prices -------------------------------------------------------------


class RequestDoc(Doc):
    """Bounds of a request."""

    max_body_bytes: PositiveInt = 256 * 1024
    """A larger request body is refused (413)."""
    default_max_tokens: PositiveInt = 1024
    """Output tokens reserved when the request names no maximum."""
    max_tokens_cap: PositiveInt = 16384
    """The output reservation never exceeds this."""
    over_cap: OverCapField = OverCap.CLAMP
    """A request asking for more output than the cap: clamp (forwarded with the cap) or refuse (400)."""

    @model_validator(mode="after")
    def _default_within_cap(self) -> RequestDoc:
        if self.default_max_tokens > self.max_tokens_cap:
            at = "default_max_tokens" if "default_max_tokens" in self.model_fields_set else "max_tokens_cap"
            raise problem(
                f"request.default_max_tokens ({self.default_max_tokens}) exceeds "
                f"request.max_tokens_cap ({self.max_tokens_cap})",
                at=(at,),
            )
        return self


class ShareDoc(Doc):
    """A tenant's (or project's) share of a pool's ceiling: tokens per minute, or a percent of it."""

    guaranteed: LimitValue | None = None
    """Kept for it while it uses it; others borrow it while it is idle, and are refused first when it
    comes back."""
    max: LimitValue | None = None
    """The most it may take of the pool (default: the whole ceiling)."""


class PoolDoc(Doc):
    """A pool of model servers."""

    name: Name
    """The routing value, e.g. h100."""
    tokens_per_minute: PositiveInt | None = None
    """Ceiling: when it is full, the next pool serves. Omitted: the overflow pool (last)."""
    endpoints: (
        Annotated[list[Endpoint], Field(min_length=1), list_of('a non-empty list of "host:port"', non_empty=True)]
        | None
    ) = None
    """host:port of the pool's model servers (Envoy's cluster, rendered by `tokenmeter envoy-config`)."""
    reports_usage: Bool = True
    """false: its servers report no usage, and the processor counts the response text."""
    models: Annotated[list[ModelName], list_of("a list of model names")] | None = None
    """The models it serves (names from `models`, or aliases); omitted: every model. A request goes to
    the first pool, in this list's order, that serves its model and has headroom."""
    shares: (
        Annotated[dict[Owner, ShareDoc], map_of('a mapping of "tenant" or "tenant/project" to shares')] | None
    ) = None
    """Fair shares of the ceiling, by tenant or "tenant/project"."""


class RoutingDoc(Doc):
    """How requests spread over the pools."""

    hysteresis_percent: Annotated[int, Field(ge=0, le=50)] = 10
    """A pool that spilled takes new traffic again only below this percent under its ceiling."""
    max_wait_ms: Annotated[int, Field(ge=0, le=2000)] = 0
    """When every pool for a model is at its ceiling: wait up to this long for room, then 429."""
    show_pool: Bool = True
    """Tell the client which pool served it (x-tokenmeter-pool)."""


class RatesDoc(Doc):
    """Rates of some token kinds, in the catalog's currency per million tokens."""

    input: Rate | None = None
    """Uncached input tokens."""
    cached_input: Rate | None = None
    """Input tokens read from a prompt cache (default: the input rate)."""
    cache_write: Rate | None = None
    """Input tokens written to a prompt cache (default: the input rate)."""
    output: Rate | None = None
    """Output tokens other than reasoning."""
    reasoning: Rate | None = None
    """Reasoning tokens (default: the output rate)."""

    @model_validator(mode="after")
    def _some_rate(self) -> RatesDoc:
        if not self.model_fields_set:
            raise problem(f"{{where}} must override at least one of: {', '.join(self.allowed_keys())}")
        return self


class ModelPriceDoc(Doc):
    """One model's rates per million tokens, and overrides on some pools."""

    input: Rate
    """Uncached input tokens (required)."""
    cached_input: Rate | None = None
    """Input tokens read from a prompt cache (default: the input rate)."""
    cache_write: Rate | None = None
    """Input tokens written to a prompt cache (default: the input rate)."""
    output: Rate
    """Output tokens other than reasoning (required)."""
    reasoning: Rate | None = None
    """Reasoning tokens (default: the output rate)."""
    pools: Annotated[dict[Name, RatesDoc], map_of("a mapping of pool names to rates")] | None = None
    """Pool name -> the rates that differ on that pool."""


class PricesDoc(Doc):
    """The price catalog: every usage record is priced with it."""

    version: Text
    """Named on every record it prices (price_version): change it with every price change."""
    currency: Currency
    """ISO 4217 code, e.g. USD."""
    models: (
        Annotated[dict[ModelName, ModelPriceDoc], map_of("a mapping of model names to prices")] | None
    ) = None
    """Model name -> its rates."""
    default: ModelPriceDoc | None = None
    """The rates of any model not listed."""


# -- identity ---------------------------------------------------------------------------


class SubjectDoc(Doc):
    """One principal's own limits."""

    sub: Text
    """The subject."""
    limits: LimitsDoc | None = None
    """Its limits, as a key's."""


SubjectList = Annotated[list[SubjectDoc], list_of("a list of {sub: ..., limits: ...}")]


class JwtDoc(Doc):
    """An issuer whose tokens Envoy verifies; the processor maps their claims onto the hierarchy."""

    name: Name
    """A name; also where Envoy puts the verified payload."""
    issuer: Text
    """The tokens' `iss` (one provider per issuer)."""
    audiences: (
        Annotated[list[Text], Field(min_length=1), list_of("a non-empty list of strings", non_empty=True)] | None
    ) = None
    """The token's `aud` must contain one of these (omit: any audience)."""
    jwks: Text
    """The public JWKS: inline JSON ('{"keys": [...]}') or a file beside the policy."""
    tenant_claim: Claim
    """The claim naming a tenant."""
    project_claim: Claim | None = None
    """The claim naming a project of that tenant."""
    default_project: Name | None = None
    """The project of a token without a project claim."""
    team_claim: Claim | None = None
    """The claim naming a team of that project (optional)."""
    subjects: SubjectList | None = None
    """Limits of some principals (their `sub`)."""

    @model_validator(mode="after")
    def _project(self) -> JwtDoc:
        if self.project_claim is None and self.default_project is None:
            raise problem(f"JWT provider '{self.name}': give project_claim, default_project, or both")
        return self


class TrustedHeadersDoc(Doc):
    """Identity asserted in request headers by an authenticator (an HTTP ext_authz service) that
    Envoy consults first; Envoy strips the client's own copies of these headers."""

    name: Name
    """Names the principal: its key id is hdr:<name>:<subject>."""
    authorizer: Endpoint
    """host:port of the HTTP ext_authz service that sets the headers."""
    tenant_header: Header
    """The header naming a tenant (required)."""
    project_header: Header | None = None
    """The header naming a project of that tenant (or give default_project)."""
    default_project: Name | None = None
    """The project of a request without a project header."""
    team_header: Header | None = None
    """The header naming a team of that project (optional)."""
    subject_header: Header | None = None
    """The header naming the principal within the tenant (optional; else the tenant itself)."""
    subjects: SubjectList | None = None
    """Limits of some principals (the subject header's value)."""

    @model_validator(mode="after")
    def _headers(self) -> TrustedHeadersDoc:
        if self.project_header is None and self.default_project is None:
            raise problem(f"trusted headers '{self.name}': give project_header, default_project, or both")
        seen: dict[str, str] = {}
        for key in ("tenant_header", "project_header", "team_header", "subject_header"):
            header = getattr(self, key)
            if header is None:
                continue
            if header in seen:
                raise problem(f"{{where}}: {key} '{header}' is also the {seen[header]}", at=(key,))
            seen[header] = key
        return self


class IdentityDoc(Doc):
    """How callers other than API keys are identified."""

    jwt: (
        Annotated[list[JwtDoc], Field(min_length=1), list_of("a non-empty list of providers", non_empty=True)] | None
    ) = None
    """JWT issuers whose tokens identify callers."""
    trusted_headers: TrustedHeadersDoc | None = None
    """Identity in headers set by an authenticator Envoy consults."""


# -- the file ---------------------------------------------------------------------------

_REDIS_GONE = (
    "the redis section is no longer part of the policy (it never took effect on reload): "
    "use `tokenmeter serve --redis-deadline-ms N --redis-failure-mode fail_open|fail_closed`"
)


class PolicyDoc(Doc):
    """A Token Meter policy: who the callers are (keys, JWT issuers, trusted headers), where they sit
    (tenant > project > team), their limits, the model pools and the prices."""

    model_config = ConfigDict(title="Token Meter policy")

    version: Text
    """Stamped on every usage record and audit event: change it with each edit (quote it)."""
    mode: ModeField = Mode.ENFORCE
    """enforce: over a limit, the limit's action applies; shadow: decide and record, never refuse."""
    request: RequestDoc | None = None
    """Bounds of a request."""
    models: (
        Annotated[list[ModelName], list_of("a list of model names")] | None
    ) = None
    """The models this gateway serves: the only names a model takes as a metric label."""
    aliases: Annotated[dict[ModelName, ModelName], map_of("a mapping of model names to models")] | None = None
    """Client model name -> the served model it stands for."""
    pools: Annotated[list[PoolDoc], Field(min_length=1), list_of("a list", empty="pools must list at least one pool")]
    """Model server pools, in order of preference."""
    prices: PricesDoc | None = None
    """The price catalog."""
    tenants: Annotated[dict[Name, TenantDoc | None], map_of("a mapping")]
    """Tenants by name, with their projects and teams."""
    keys: Annotated[list[KeyDoc], list_of("a list")]
    """API keys (possibly none: keys: [])."""
    identity: IdentityDoc | None = None
    """Callers identified by JWTs or by trusted headers."""
    routing: RoutingDoc | None = None
    """Spill hysteresis, bounded wait, and whether clients see their pool."""

    @model_validator(mode="before")
    @classmethod
    def _no_redis(cls, data: Any) -> Any:
        if isinstance(data, dict) and "redis" in data:
            raise problem(_REDIS_GONE, at=("redis",))
        return data


class _PolicySchema(GenerateJsonSchema):
    """JSON Schema as the file is written: an optional key is omitted, never null (except the body
    of a tenant, project or team); dicts keyed by names allow no other keys."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        out = super().default_schema(schema)
        if out.get("default", ...) is None:
            del out["default"]
        return out

    def normalize_name(self, name: str) -> str:
        return super().normalize_name(name.removesuffix("Doc"))

    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        out = super().dict_schema(schema)
        if "patternProperties" in out:
            out["additionalProperties"] = False
        return out


def policy_schema_text() -> str:
    """The JSON Schema as policies/policy.schema.json holds it (2-space indent, a final newline)."""
    return json.dumps(policy_json_schema(), indent=2, ensure_ascii=False) + "\n"


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file (what `tokenmeter policy schema` prints)."""
    schema = PolicyDoc.model_json_schema(schema_generator=_PolicySchema)
    _one_line_descriptions(schema)
    defs = schema.get("$defs", {})
    for owner, key, body in (("Tenant", "projects", "Project"), ("Project", "teams", "Team")):
        mapping = defs[owner]["properties"][key]
        for pattern in mapping["patternProperties"]:
            mapping["patternProperties"][pattern] = {"anyOf": [{"$ref": f"#/$defs/{body}"}, {"type": "null"}]}
    for pattern in schema["properties"]["tenants"]["patternProperties"]:
        schema["properties"]["tenants"]["patternProperties"][pattern] = {
            "anyOf": [{"$ref": "#/$defs/Tenant"}, {"type": "null"}]
        }
    return {"$schema": SCHEMA_DIALECT, **schema}


def _one_line_descriptions(node: Any) -> None:
    """Docstrings wrap at the source's line length; a description reads as one paragraph."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                node[key] = " ".join(value.split())
            else:
                _one_line_descriptions(value)
    elif isinstance(node, list):
        for item in node:
            _one_line_descriptions(item)
