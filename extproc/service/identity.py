"""Who is calling: the API key from the request headers, looked up by its SHA-256; or, where the
policy names JWT issuers (`identity.jwt`), the claims of a token Envoy's jwt_authn filter verified.

A key the policy knows may still be refused: disabled, not valid yet, expired, or a rotated-out
digest past its grace period. `identify` answers with the key, or a `KeyRefusal` naming the problem
(the 403's error code) and the key (its id and owner: never the raw key or its digest).

A JWT is verified by Envoy (signature, expiry, issuer, audience), never here: Envoy writes its payload
to dynamic metadata (namespace JWT_NAMESPACE, under the provider's name) and forwards it with the
request. `identify_jwt` maps those claims onto the hierarchy: a principal shaped as an `ApiKey`
(key id `jwt:<provider>:<sub>`), or a `ClaimRefusal` when the claims name no tenant/project of the
policy. A bearer token shaped as a JWT is never looked up as an API key when the policy has issuers.

Where the policy names trusted headers (`identity.trusted_headers`), an authenticator Envoy consults
(ext_authz) may assert the caller in request headers. Envoy strips the client's own copies before
that service runs, so a tenant header the processor sees was set by the authenticator:
`identify_trusted` maps the headers onto the hierarchy (key id `hdr:<name>:<subject>`), refusing a
tenant/project/team the policy does not know as a `ClaimRefusal`. Without the tenant header, the
API key or JWT decides as before.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from google.protobuf.struct_pb2 import Struct, Value

from extproc.policy.keys import hash_key
from extproc.policy.model import ApiKey, JwtProvider, KeyEntry, Limits, Policy, TrustedHeaders

# Where Envoy's jwt_authn filter writes the verified payloads (`payload_in_metadata`: the provider's name).
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
# header.payload.signature, base64url: what Envoy's jwt_authn verifies (extproc.envoy.config matches it)
JWT_SHAPE = r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
_JWT = re.compile(JWT_SHAPE)
_KEY_ID_MAX = 128
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


class KeyProblem(StrEnum):
    """Why a known key is refused; the value is the error code of the 403."""

    DISABLED = "key_disabled"
    NOT_YET_VALID = "key_not_yet_valid"
    EXPIRED = "key_expired"


@dataclass(frozen=True, slots=True)
class KeyRefusal:
    key: ApiKey
    problem: KeyProblem
    entry: KeyEntry

    @property
    def code(self) -> str:
        return self.problem.value

    @property
    def message(self) -> str:
        """What the caller is told: the key id and why, and when (never the key)."""
        key_id = self.key.key_id
        if self.problem is KeyProblem.DISABLED:
            reason = self.key.disabled_reason
            return f"API key '{key_id}' is disabled" + (f": {reason}" if reason else ".")
        if self.problem is KeyProblem.NOT_YET_VALID:
            return f"API key '{key_id}' is not valid before {_iso(self.entry.valid_from)}."
        if self.entry.rotated and (self.key.expires is None or self.entry.valid_until < self.key.expires):
            return (
                f"API key '{key_id}' was rotated; the previous key stopped being valid at "
                f"{_iso(self.entry.valid_until)}. Use the new key."
            )
        return f"API key '{key_id}' expired at {_iso(self.entry.valid_until)}."


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The raw key from `Authorization: Bearer <key>` or `x-api-key`, if any."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() or None if key else None


@dataclass(frozen=True, slots=True)
class ClaimRefusal:
    """A verified token whose claims name nothing this policy knows: 403 with `code`."""

    message: str
    code: str
    key_id: str


def identify(headers: Mapping[str, str], policy: Policy, now: float | None = None) -> ApiKey | KeyRefusal | None:
    """The caller's key, valid at `now` (epoch seconds; default: the clock); a `KeyRefusal` for a
    key the policy knows but refuses at `now`; None without a key, or with one the policy does not
    know. One dict lookup: the validity window of every digest is computed when the policy loads."""
    raw = presented_key(headers)
    if raw is None:
        return None
    if policy.identity.jwt and _JWT.fullmatch(raw):
        return None  # a token, not a key: only Envoy's verification makes it an identity
    entry = policy.key_entries.get(hash_key(raw))
    if entry is None:
        return None
    key = entry.key
    if key.disabled:
        return KeyRefusal(key, KeyProblem.DISABLED, entry)
    if now is None:
        now = time.time()
    if now < entry.valid_from:
        return KeyRefusal(key, KeyProblem.NOT_YET_VALID, entry)
    if now >= entry.valid_until:
        return KeyRefusal(key, KeyProblem.EXPIRED, entry)
    return key


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def verified_claims(metadata: Mapping[str, Struct], policy: Policy) -> tuple[JwtProvider, Struct] | None:
    """The provider and payload of the token Envoy verified for this request, if any (from the
    request's forwarded dynamic metadata, by namespace)."""
    verified = metadata.get(JWT_NAMESPACE)
    if verified is None:
        return None
    for provider in policy.identity.jwt:
        value = verified.fields.get(provider.name)
        if value is not None and value.WhichOneof("kind") == "struct_value":
            return provider, value.struct_value
    return None


def identify_jwt(provider: JwtProvider, claims: Struct, policy: Policy) -> ApiKey | ClaimRefusal:
    """The principal of a verified token: its tenant (and project, team) from the provider's claims."""
    sub = _claim(claims, "sub") or ""
    tenant_name = _claim(claims, provider.tenant_claim)
    project_name = _claim(claims, provider.project_claim) if provider.project_claim else None
    project_from = f"token's '{provider.project_claim}' claim"
    if project_name is None:
        project_name = provider.default_project
        if provider.project_claim is None:
            project_from = "token's provider's default_project"
    said = _Said(
        key_id=jwt_key_id(provider.name, sub), missing="missing_claim",
        no_tenant=f"The token has no '{provider.tenant_claim}' claim naming a tenant.",
        no_project=f"The token has no '{provider.project_claim}' claim naming a project.",
        tenant_from=f"token's '{provider.tenant_claim}' claim", project_from=project_from,
        team_from=f"token's '{provider.team_claim}' claim",
    )
    team = _claim(claims, provider.team_claim) if provider.team_claim else None
    return _placed(said, tenant_name, project_name, team, provider.subjects.get(sub, _NO_LIMITS), policy)


@dataclass(frozen=True, slots=True)
class _Said:
    """Who asserted a principal's place (a token's claims, an authenticator's headers), as its
    refusals name it: `*_from` completes "The ... names no tenant/project/team"."""

    key_id: str
    missing: str  # the code of a refusal for a name not given
    no_tenant: str
    no_project: str
    tenant_from: str
    project_from: str
    team_from: str


def _placed(
    said: _Said, tenant_name: str | None, project_name: str | None, team: str | None, limits: Limits, policy: Policy
) -> ApiKey | ClaimRefusal:
    """The principal at tenant/project (/team) when the policy knows each, else why not."""
    if tenant_name is None:
        return ClaimRefusal(said.no_tenant, said.missing, said.key_id)
    tenant = policy.tenants.get(tenant_name)
    if tenant is None:
        return ClaimRefusal(
            f"The {said.tenant_from} names no tenant of this gateway: '{_shown(tenant_name)}'.", "unknown_tenant",
            said.key_id)
    if project_name is None:
        return ClaimRefusal(said.no_project, said.missing, said.key_id)
    project = tenant.projects.get(project_name)
    if project is None:
        return ClaimRefusal(
            f"The {said.project_from} names no project of tenant '{tenant.name}': '{_shown(project_name)}'.",
            "unknown_project", said.key_id)
    if team is not None and team not in project.teams:
        return ClaimRefusal(
            f"The {said.team_from} names no team of project '{tenant.name}.{project.name}': '{_shown(team)}'.",
            "unknown_team", said.key_id)
    return ApiKey(key_id=said.key_id, sha256="", tenant=tenant.name, project=project.name, team=team, limits=limits)


_NO_LIMITS = Limits()


def jwt_key_id(provider: str, sub: str) -> str:
    """`jwt:<provider>:<sub>`, at most 128 printable characters: a longer or unprintable subject is
    shortened with a digest of it, so that two subjects never share an id."""
    return _principal_id(f"jwt:{provider}:", sub)


def trusted_key_id(name: str, subject: str) -> str:
    """`hdr:<name>:<subject>`, bounded and printable as `jwt_key_id`."""
    return _principal_id(f"hdr:{name}:", subject)


def _principal_id(prefix: str, sub: str) -> str:
    key_id = prefix + sub
    if len(key_id) <= _KEY_ID_MAX and _PRINTABLE.fullmatch(sub):
        return key_id
    digest = hashlib.sha256(sub.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head = "".join(c if "!" <= c <= "~" else "?" for c in sub)
    return (prefix + head)[: _KEY_ID_MAX - 17] + "~" + digest


# -- trusted headers -------------------------------------------------------------------------


def asserted_by(headers: Mapping[str, str], policy: Policy) -> TrustedHeaders | None:
    """The policy's trusted headers, when the request carries their tenant header: Envoy removed
    any copy the client sent, so only the authenticator could have set it."""
    trusted = policy.identity.trusted_headers
    if trusted is None or headers.get(trusted.tenant_header) is None:
        return None
    return trusted


def identify_trusted(headers: Mapping[str, str], trusted: TrustedHeaders, policy: Policy) -> ApiKey | ClaimRefusal:
    """The principal the authenticator asserted: its tenant (and project, team) from the headers,
    each checked against the policy; its subject (else the tenant) names it, and its limits are the
    subject's in `trusted.subjects`."""
    tenant_name = _header(headers, trusted.tenant_header)
    subject = _header(headers, trusted.subject_header)
    key_id = trusted_key_id(trusted.name, subject if subject is not None else tenant_name or "")
    for name in trusted.headers:
        if len(headers.get(name, "")) > _HEADER_MAX:
            return ClaimRefusal(
                f"The authenticator's '{name}' header is longer than {_HEADER_MAX} characters.", "invalid_header",
                key_id)
    project_name = _header(headers, trusted.project_header)
    project_from = f"authenticator's '{trusted.project_header}' header"
    if project_name is None:
        project_name, project_from = trusted.default_project, f"'{trusted.name}' default_project"
    said = _Said(
        key_id=key_id, missing="missing_header",
        no_tenant=f"The authenticator's '{trusted.tenant_header}' header names no tenant.",
        no_project=f"The authenticator's '{trusted.project_header}' header names no project.",
        tenant_from=f"authenticator's '{trusted.tenant_header}' header", project_from=project_from,
        team_from=f"authenticator's '{trusted.team_header}' header",
    )
    limits = trusted.subjects.get(subject, _NO_LIMITS) if subject is not None else _NO_LIMITS
    return _placed(said, tenant_name, project_name, _header(headers, trusted.team_header), limits, policy)


_HEADER_MAX = 1024  # a longer asserted value is refused (no name of a policy comes close)


def _header(headers: Mapping[str, str], name: str | None) -> str | None:
    """A header's value, trimmed; None when absent or empty."""
    value = headers.get(name) if name is not None else None
    if value is None:
        return None
    return value.strip() or None


def _claim(claims: Struct, name: str) -> str | None:
    value: Value | None = claims.fields.get(name)
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value or None
    if kind == "number_value" and value.number_value.is_integer():
        return str(int(value.number_value))
    return None


def _shown(text: str) -> str:
    """A value the caller is told about: at most 64 characters, unprintable ones as '?'."""
    cut = text if len(text) <= 64 else text[:64] + "..."
    return cut if cut.isprintable() else "".join(c if c.isprintable() else "?" for c in cut)
