"""A validated policy document as `Policy` values: the checks that need the whole file (a key's
tenant exists, a model is listed, pool names are unique...), each a `file:line: reason` error."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path as FilePath

from extproc.billing.catalog import RATE_KINDS, ModelPrices, PriceCatalog, RateOverride
from extproc.policy.errors import PolicyError
from extproc.policy.fields import percent_of
from extproc.policy.lines import Lines, Path, where
from extproc.policy.model import (
    ApiKey,
    Identity,
    JwtProvider,
    Limits,
    Policy,
    Pool,
    PreviousDigest,
    Project,
    RequestRules,
    Routing,
    Share,
    Team,
    Tenant,
    TrustedHeaders,
)
from extproc.policy.rules import LimitsBuilder, Parent
from extproc.policy.schema import (
    IdentityDoc,
    JwtDoc,
    KeyDoc,
    ModelPriceDoc,
    PolicyDoc,
    PoolDoc,
    PricesDoc,
    ProjectDoc,
    RatesDoc,
    SubjectDoc,
    TenantDoc,
    TrustedHeadersDoc,
)


def build(doc: PolicyDoc, lines: Lines, source: str) -> Policy:
    return _Builder(lines, source).policy(doc)


class _Builder:
    def __init__(self, lines: Lines, source: str) -> None:
        self.lines = lines
        self.source = source
        self.models: frozenset[str] = frozenset()
        self.aliases: dict[str, str] = {}
        self.limits = LimitsBuilder(source, lines, self.rule_models)

    def fail(self, path: Path, reason: str) -> PolicyError:
        return PolicyError(self.source, self.lines.of(path), reason)

    def fail_key(self, path: Path, reason: str) -> PolicyError:
        """An error naming the line of the key at `path` (rather than of its value)."""
        return PolicyError(self.source, self.lines.of_key(path), reason)

    def first(self, path: Path) -> int:
        return self.lines.of(path) or 0

    # -- the file -------------------------------------------------------------------------

    def policy(self, doc: PolicyDoc) -> Policy:
        self.models = frozenset(doc.models or ())
        self.aliases = self.alias_map(doc.aliases or {})
        pools = self.pools(doc.pools)
        tenants = self.tenants(doc.tenants)
        self.share_owners(doc.pools, tenants)
        keys = self.keys(doc.keys, tenants)
        prices = self.prices(doc.prices, pools) if doc.prices is not None else None
        identity = self.identity(doc.identity) if doc.identity is not None else Identity()
        request = doc.request
        rules = RequestRules() if request is None else RequestRules(
            max_body_bytes=request.max_body_bytes,
            default_max_tokens=request.default_max_tokens,
            max_tokens_cap=request.max_tokens_cap,
            over_cap=request.over_cap,
        )
        routing = Routing() if doc.routing is None else Routing(
            hysteresis=doc.routing.hysteresis_percent / 100,
            max_wait_ms=doc.routing.max_wait_ms,
            show_pool=doc.routing.show_pool,
        )
        return Policy(
            doc.version, doc.mode, rules, pools, tenants, keys, source=self.source, models=self.models,
            prices=prices, identity=identity, aliases=self.aliases, routing=routing,
        )

    def pools(self, docs: list[PoolDoc]) -> tuple[Pool, ...]:
        seen: dict[str, int] = {}
        pools: list[Pool] = []
        for index, pool in enumerate(docs):
            path = ("pools", index, "name")
            if pool.name in seen:
                raise self.fail(path, f"duplicate pool name '{pool.name}' (first at line {seen[pool.name]})")
            seen[pool.name] = self.first(path)
            if pool.models is not None and not pool.models:
                raise self.fail(("pools", index, "models"), f"pool '{pool.name}' lists no models: it could never "
                                "serve (omit models to serve every model)")
            pools.append(Pool(
                name=pool.name, tokens_per_minute=pool.tokens_per_minute, endpoints=tuple(pool.endpoints or ()),
                reports_usage=pool.reports_usage,
                models=self.rule_models(pool.models, ("pools", index, "models")) if pool.models is not None else None,
                shares=self.shares(pool, ("pools", index)),
            ))
        # a pool without a ceiling always has room, so a later pool for one of its models could never serve
        for index, made in enumerate(pools[:-1]):
            if made.tokens_per_minute is None:
                shadowed = [p for p in pools[index + 1 :] if _overlap(made, p)]
                if not shadowed:
                    continue
                later = ", ".join(p.name for p in shadowed)
                raise self.fail(
                    ("pools", index),
                    f"pool '{made.name}' has no tokens_per_minute ceiling, so the pools after it "
                    f"({later}) could never serve; put the overflow pool last",
                )
        return tuple(pools)

    def shares(self, pool: PoolDoc, path: Path) -> dict[str, Share]:
        """A pool's shares in tokens per minute (a percent is of its ceiling)."""
        if not pool.shares:
            return {}
        ceiling = pool.tokens_per_minute
        if ceiling is None:
            raise self.fail_key((*path, "shares"), f"pool '{pool.name}' has shares but no tokens_per_minute ceiling "
                                "to share")
        out: dict[str, Share] = {}
        for owner, doc in pool.shares.items():
            at = (*path, "shares", owner)

            def amount(value: int | str | None, field: str, default: int, at: Path = at) -> int:
                if value is None:
                    return default
                pct = percent_of(value)
                tokens = math.ceil(ceiling * pct / 100) if pct is not None else int(value)
                if tokens > ceiling:
                    raise self.fail((*at, field), f"{where(at)}.{field}: {tokens} is above the pool's ceiling "
                                    f"({ceiling} tokens per minute)")
                return tokens

            guaranteed = amount(doc.guaranteed, "guaranteed", 0)
            maximum = amount(doc.max, "max", ceiling)
            if guaranteed > maximum:
                raise self.fail(at, f"{where(at)}: guaranteed ({guaranteed}) is above max ({maximum})")
            out[owner] = Share(guaranteed=guaranteed, maximum=maximum)
        return out

    def share_owners(self, docs: list[PoolDoc], tenants: Mapping[str, Tenant]) -> None:
        """Every share names a tenant (or a project) of the policy."""
        for index, pool in enumerate(docs):
            for owner in pool.shares or {}:
                tenant, _, project = owner.partition("/")
                known = tenant in tenants and (not project or project in tenants[tenant].projects)
                if not known:
                    raise self.fail_key(("pools", index, "shares", owner),
                                        f"pool '{pool.name}': share owner '{owner}' is not a tenant or tenant/project "
                                        "of this policy")

    # -- models -----------------------------------------------------------------------------

    def alias_map(self, aliases: Mapping[str, str]) -> dict[str, str]:
        """client model name -> the canonical model it stands for (one of `models`, when the policy
        lists them). An alias is not itself a served model, nor another alias's target."""
        for name, target in aliases.items():
            path = ("aliases", name)
            if name in self.models:
                raise self.fail_key(
                    path, f"alias '{name}' is a model listed under models: an alias names another model"
                )
            if self.models and target not in self.models:
                raise self.fail(path, f"alias '{name}' names '{target}', which is not listed under models")
            if target == name:
                raise self.fail(path, f"alias '{name}' names itself")
        for name, target in aliases.items():
            if target in aliases:
                raise self.fail(
                    ("aliases", name), f"alias '{name}' names '{target}', which is itself an alias; name the model"
                )
        return dict(aliases)

    def rule_models(self, names: list[str], path: Path) -> frozenset[str]:
        """A rule's models: each a listed model or an alias (resolved to its model)."""
        known = self.models | self.aliases.keys() | set(self.aliases.values())
        lines: dict[str, int] = {}
        out: set[str] = set()
        for index, name in enumerate(names):
            item = (*path, index)
            if name in lines:
                raise self.fail(item, f"duplicate model '{name}' in {where(path)} (first at line {lines[name]})")
            lines[name] = self.first(item)
            if name not in known:
                listed = "listed under models or aliases"
                if not known:
                    listed = "listed (the policy lists no models: add it to models)"
                raise self.fail(item, f"{where(path)}: model '{name}' is not {listed}")
            out.add(self.aliases.get(name, name))
        return frozenset(out)

    def key_models(self, key_id: str, names: list[str], path: Path) -> frozenset[str]:
        """A key's allow-list: the canonical models it may ask for (aliases resolved)."""
        lines: dict[str, int] = {}
        out: set[str] = set()
        for index, name in enumerate(names):
            item = (*path, index)
            if name in lines:
                raise self.fail(
                    item, f"key '{key_id}': duplicate model '{name}' in {where(path)} (first at line {lines[name]})"
                )
            lines[name] = self.first(item)
            canonical = self.aliases.get(name, name)
            if self.models and canonical not in self.models:
                raise self.fail(item, f"key '{key_id}': model '{name}' in {where(path)} is not listed under models")
            out.add(canonical)
        return frozenset(out)

    # -- tenants ----------------------------------------------------------------------------

    def tenants(self, docs: Mapping[str, TenantDoc | None]) -> dict[str, Tenant]:
        return {name: self.tenant(name, doc or TenantDoc(), ("tenants", name)) for name, doc in docs.items()}

    def tenant(self, name: str, doc: TenantDoc, path: Path) -> Tenant:
        limits = self.limits.build(doc.limits, (*path, "limits"))
        parent = Parent(limits, f"tenant '{name}'")
        projects = {
            p: self.project(name, p, body or ProjectDoc(), (*path, "projects", p), parent)
            for p, body in (doc.projects or {}).items()
        }
        return Tenant(
            name=name, limits=limits, projects=projects, mode=doc.mode, time_zone=doc.time_zone,
            billing_anchor_day=doc.billing_anchor_day,
        )

    def project(self, tenant: str, name: str, doc: ProjectDoc, path: Path, parent: Parent) -> Project:
        limits = self.limits.build(doc.limits, (*path, "limits"), parent, shares=True)
        mine = Parent(limits, f"project '{tenant}.{name}'")
        teams = {
            t: Team(t, self.limits.build((body.limits if body else None), (*path, "teams", t, "limits"), mine,
                                         shares=True))
            for t, body in (doc.teams or {}).items()
        }
        return Project(name=name, limits=limits, teams=teams)

    # -- keys -------------------------------------------------------------------------------

    def keys(self, docs: list[KeyDoc], tenants: Mapping[str, Tenant]) -> dict[str, ApiKey]:
        by_sha: dict[str, ApiKey] = {}
        # every digest in the file, current or rotated out: (key id, line), for duplicate errors
        digests: dict[str, tuple[str, int]] = {}
        id_lines: dict[str, int] = {}
        for index, doc in enumerate(docs):
            path: Path = ("keys", index)
            if doc.id in id_lines:
                raise self.fail((*path, "id"), f"duplicate key id '{doc.id}' (first at line {id_lines[doc.id]})")
            id_lines[doc.id] = self.first((*path, "id"))
            key = self.key(doc, path, tenants, digests)
            by_sha[key.sha256] = key
        return by_sha

    def key(
        self, doc: KeyDoc, path: Path, tenants: Mapping[str, Tenant], digests: dict[str, tuple[str, int]]
    ) -> ApiKey:
        key_id = doc.id
        tenant = tenants.get(doc.tenant)
        if tenant is None:
            raise self.fail((*path, "tenant"), f"key '{key_id}': unknown tenant '{doc.tenant}' (not under tenants)")
        project = tenant.projects.get(doc.project)
        if project is None:
            raise self.fail((*path, "project"), f"key '{key_id}': tenant '{doc.tenant}' has no project '{doc.project}'")
        if doc.team is not None and doc.team not in project.teams:
            raise self.fail(
                (*path, "team"), f"key '{key_id}': project '{doc.tenant}.{doc.project}' has no team '{doc.team}'"
            )
        self.claim_digest(digests, doc.sha256, key_id, (*path, "sha256"), "duplicate sha256")
        previous: list[PreviousDigest] = []
        for index, prev in enumerate(doc.previous or ()):
            self.claim_digest(digests, prev.sha256, key_id, (*path, "previous", index, "sha256"),
                              "duplicate previous sha256")
            previous.append(PreviousDigest(sha256=prev.sha256, valid_until=prev.valid_until))
        models = doc.models
        return ApiKey(
            key_id=key_id,
            sha256=doc.sha256,
            tenant=doc.tenant,
            project=doc.project,
            team=doc.team,
            limits=self.limits.build(doc.limits, (*path, "limits")),
            disabled=doc.disabled,
            disabled_reason=doc.reason,
            not_before=doc.not_before,
            expires=doc.expires,
            previous=tuple(previous),
            models=self.key_models(key_id, models, (*path, "models")) if models is not None else None,
        )

    def claim_digest(
        self, digests: dict[str, tuple[str, int]], digest: str, key_id: str, path: Path, what: str
    ) -> None:
        """A digest names one key: a second use (as a current or a previous digest) is an error that
        names the keys and lines, never the digest."""
        if digest in digests:
            other, line = digests[digest]
            owner = "this key" if other == key_id else f"key '{other}'"
            raise self.fail(path, f"key '{key_id}': {what}, already used by {owner} at line {line}")
        digests[digest] = (key_id, self.first(path))

    # -- prices -----------------------------------------------------------------------------

    def prices(self, doc: PricesDoc, pools: tuple[Pool, ...]) -> PriceCatalog:
        """The price catalog (extproc.billing.catalog): per-model rates per million tokens with
        per-pool overrides, and an optional default for models not listed."""
        pool_names = tuple(p.name for p in pools)
        models = {
            name: self.model_prices(entry, ("prices", "models", name), pool_names)
            for name, entry in (doc.models or {}).items()
        }
        default = self.model_prices(doc.default, ("prices", "default"), pool_names) if doc.default else None
        if not models and default is None:
            raise self.fail(
                ("prices",), "prices must price at least one model (prices.models) or give a prices.default"
            )
        return PriceCatalog(version=doc.version, currency=doc.currency, models=models, default=default)

    def model_prices(self, doc: ModelPriceDoc, path: Path, pool_names: tuple[str, ...]) -> ModelPrices:
        overrides: dict[str, RateOverride] = {}
        for pool, rates in (doc.pools or {}).items():
            if pool not in pool_names:
                raise self.fail_key(
                    (*path, "pools", pool), f"unknown pool '{pool}' in {where((*path, 'pools'))} "
                    f"(pools: {', '.join(pool_names)})",
                )
            overrides[pool] = _rates(rates)
        return ModelPrices(rates=_rates(doc), pools=overrides)

    # -- identity ---------------------------------------------------------------------------

    def identity(self, doc: IdentityDoc) -> Identity:
        providers: list[JwtProvider] = []
        names: dict[str, int] = {}
        issuers: dict[str, int] = {}
        for index, jwt in enumerate(doc.jwt or ()):
            path: Path = ("identity", "jwt", index)
            if jwt.name in names:
                raise self.fail(
                    (*path, "name"), f"duplicate JWT provider name '{jwt.name}' (first at line {names[jwt.name]})"
                )
            names[jwt.name] = self.first((*path, "name"))
            if jwt.issuer in issuers:
                raise self.fail(
                    (*path, "issuer"), f"duplicate JWT issuer '{jwt.issuer}' (first at line {issuers[jwt.issuer]})"
                )
            issuers[jwt.issuer] = self.first((*path, "issuer"))
            providers.append(self.jwt(jwt, path))
        trusted = self.trusted(doc.trusted_headers) if doc.trusted_headers is not None else None
        return Identity(jwt=tuple(providers), trusted_headers=trusted)

    def jwt(self, doc: JwtDoc, path: Path) -> JwtProvider:
        return JwtProvider(
            name=doc.name,
            issuer=doc.issuer,
            jwks=self.jwks(doc.jwks, (*path, "jwks")),
            tenant_claim=doc.tenant_claim,
            audiences=tuple(doc.audiences or ()),
            project_claim=doc.project_claim,
            default_project=doc.default_project,
            team_claim=doc.team_claim,
            subjects=self.subjects(doc.subjects or [], (*path, "subjects")),
        )

    def trusted(self, doc: TrustedHeadersDoc) -> TrustedHeaders:
        path: Path = ("identity", "trusted_headers")
        return TrustedHeaders(
            name=doc.name,
            authorizer=doc.authorizer,
            tenant_header=doc.tenant_header,
            project_header=doc.project_header,
            default_project=doc.default_project,
            team_header=doc.team_header,
            subject_header=doc.subject_header,
            subjects=self.subjects(doc.subjects or [], (*path, "subjects")),
        )

    def subjects(self, docs: list[SubjectDoc], path: Path) -> dict[str, Limits]:
        out: dict[str, Limits] = {}
        lines: dict[str, int] = {}
        for index, doc in enumerate(docs):
            here = (*path, index)
            if doc.sub in lines:
                raise self.fail(
                    (*here, "sub"),
                    f"duplicate subject '{doc.sub[:64]}' in {where(path)} (first at line {lines[doc.sub]})",
                )
            lines[doc.sub] = self.first((*here, "sub"))
            out[doc.sub] = self.limits.build(doc.limits, (*here, "limits"))
        return out

    def jwks(self, text: str, path: Path) -> str:
        """The JWKS JSON: inline (text starting with '{'), or a file path relative to the policy file."""
        place = where(path)
        text = text.strip()
        if not text.startswith("{"):
            file = FilePath(text) if FilePath(text).is_absolute() else FilePath(self.source).parent / text
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or exc
                raise self.fail(path, f"{place}: cannot read JWKS file {str(file)!r}: {why}") from None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise self.fail(path, f"{place} is not valid JSON: {exc}") from None
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) and "kty" in k for k in keys):
            raise self.fail(path, f"{place} must be a JWKS: {{\"keys\": [{{\"kty\": ...}}, ...]}}")
        if any(k.get(private) is not None for k in keys for private in ("d", "p", "q")):
            raise self.fail(path, f"{place} holds a private key: give only the public keys")
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _rates(doc: RatesDoc | ModelPriceDoc) -> RateOverride:
    return RateOverride(**{kind: getattr(doc, kind) for kind in RATE_KINDS if getattr(doc, kind) is not None})


def _overlap(a: Pool, b: Pool) -> bool:
    """Some model is served by both pools."""
    return a.models is None or b.models is None or bool(a.models & b.models)
