"""The one Envoy configuration, generated from the policy: `tokenmeter envoy-config`.

Routes, clusters and policy come from one source, so they cannot drift: one cluster per pool of
the policy (its `endpoints`), one route per pool and response plan, and the filters below. The same
filter chain is rendered standalone (a bootstrap) or for Istio (an EnvoyFilter).

The request path, in Envoy's filter order (requests top-down, responses bottom-up):

  compressor         compresses for the client what it accepts; asks the upstream for identity, so
                     every filter below reads the model server's usage in plain text
  header_mutation    drops every client-sent x-tokenmeter-* header (only the processor sets them),
                     and the policy's trusted identity headers (only the authenticator sets them)
  jwt_authn          (only when the policy names JWT issuers, `identity.jwt`) verifies a bearer token
                     shaped as a JWT (an API key is not one): an invalid one is refused here (401),
                     a valid one's payload goes to the processor as metadata; no token: no check
  ext_authz          (only when the policy names trusted headers, `identity.trusted_headers`) asks
                     the authenticator (an HTTP service) about the credentials: its refusal goes to
                     the client (its status, as JSON); on success the identity headers it returns
                     (only the policy's names) are set on the request for the processor. The
                     header_mutation above removed the client's own copies, so only it sets them.
  ext_proc           admission: ONE message per request (the buffered body, with path, method,
                     credentials and trusted identity headers as attributes); the reply carries the
                     admission's metadata, the pool, and an edited body (include_usage, ...). Never
                     on the response path.
  buffer             holds the request until the processor has answered, so the route is chosen on
                     the processor's metadata (pool, response plan)
  ext_proc (meter)   the processor on the response, only on the routes of a pool whose servers report
                     no usage: it reads the streamed body and counts the tokens -> tokenmeter.usage
  lua                (only on strip_usage routes) takes out of the stream the usage event the
                     gateway asked for on a client's behalf; synchronous, never holds a chunk
  json_to_metadata   reads the server's usage from JSON bodies  -> tokenmeter.usage
  sse_to_metadata    reads it from SSE events as they pass      -> tokenmeter.usage
  router

No decompressor: a model server that compresses although the request accepts no encoding is
metered from the size of what it sent (estimated). Envoy 1.40's decompressor adds trailers at the
end of a response, which stalls json_to_metadata (envoyproxy/envoy#29879), and the compressor's
removal of accept-encoding already makes every well-behaved server answer in plain text.

Each request ends in Envoy's gRPC access log (log `tokenmeter.settle`), which brings its status,
response flags, counted usage and the admission's sealed metadata to the processor: the one place
a request is settled and recorded (extproc.service.access_log).
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from extproc.policy.model import JwtProvider, Policy, TrustedHeaders
from extproc.service.identity import JWT_NAMESPACE, JWT_SHAPE
from extproc.service.metadata import (
    ATTRIBUTE_HEADERS,
    CREDENTIAL_HEADERS,
    H_KEY_ID,
    H_OUTPUT_LIMIT,
    H_POOL,
    H_PROJECT,
    H_REQUEST_ID,
    H_TEAM,
    H_TENANT,
    HEADER_PREFIX,
    NAMESPACE,
    OUTPUT_LIMIT_KEY,
    SETTLE_LOG_NAME,
    STRIP_USAGE_KEY,
    USAGE_NAMESPACE,
    header_attribute,
)
from extproc.service.ratelimit_headers import QUOTA_HEADERS, RATELIMIT_HEADERS, metadata_key

PROCESSOR_CLUSTER = "tokenmeter_processor"
AUTHORIZER_CLUSTER = "tokenmeter_authorizer"  # the ext_authz service of `identity.trusted_headers`
STRIP_USAGE_SCRIPT = "strip_usage"
METER_FILTER = "tokenmeter.meter"  # the processor on the response, for pools that report no usage
_T = "type.googleapis.com/envoy.extensions"


def pool_cluster(pool: str) -> str:
    """The Envoy cluster of a policy pool."""
    return f"{pool}_pool"


@dataclass(frozen=True)
class Endpoint:
    """A host:port endpoint, or a Unix domain socket path when `uds` is set."""

    host: str = "127.0.0.1"
    port: int = 0
    uds: str | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """`host:port`, `[v6]:port` or `unix:/path`."""
        if text.startswith("unix:"):
            return cls(uds=text[len("unix:"):])
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"{text!r} is not host:port or unix:PATH")
        return cls(host.strip("[]"), int(port))

    def to_address(self) -> dict[str, Any]:
        if self.uds:
            return {"pipe": {"path": self.uds}}
        return {"socket_address": {"address": self.host, "port_value": self.port}}

    @property
    def is_static(self) -> bool:
        if self.uds:
            return True
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class Deployment:
    """Where things are: not policy, and not reloadable (Envoy reads its config at start)."""

    listen_address: str = "0.0.0.0"
    listen_port: int = 8080
    admin_port: int = 9901
    processor: tuple[Endpoint, ...] = (Endpoint("processor", 50051),)
    # pool name -> endpoints, overriding the policy's (local stacks, tests)
    pool_endpoints: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    access_log_path: str | None = None  # None: JSON lines on stdout
    buffer_limit_bytes: int = 4 * 1024 * 1024


# Where each API reports usage, as JSON paths -> the key in the tokenmeter.usage namespace: the union
# of every API module's rules (extproc.apis.envoy_usage_rules), read back by the same module's
# ApiSchema.usage_from_envoy. One filter chain serves every API, so Envoy applies them all to every
# response; the last rule present in a document wins, and a later SSE event overrides an earlier
# one (Anthropic's cumulative message_delta usage).
def _usage_paths() -> list[tuple[list[str], str]]:
    from extproc.apis import envoy_usage_rules

    return [(list(path), key) for path, key in envoy_usage_rules()]


USAGE_PATHS: list[tuple[list[str], str]] = _usage_paths()

# Model servers differ in how they spell JSON (llama.cpp, Ollama: "; charset=utf-8").
JSON_CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "application/json;charset=utf-8",
    "application/json; charset=UTF-8",
    "application/json;charset=UTF-8",
)

# The route sets these from the processor's metadata (Envoy applies no header mutation of a body
# reply when the request headers were skipped) and so overwrites anything a client sent.
_ATTRIBUTION_METADATA = [
    (H_TENANT, "tenant"),
    (H_PROJECT, "project"),
    (H_TEAM, "team"),
    (H_KEY_ID, "key_id"),
    (H_POOL, "pool"),
    (H_REQUEST_ID, "request_id"),
]


def strip_usage_script() -> str:
    return resources.files("extproc.envoy").joinpath("strip_usage.lua").read_text()


# -- filters -------------------------------------------------------------------------------


def _usage_rules() -> list[dict[str, Any]]:
    return [
        {
            "selectors": [{"key": p} for p in path],
            "on_present": {
                "metadata_namespace": USAGE_NAMESPACE,
                "key": key,
                "type": "STRING" if key == "response_model" else "NUMBER",
            },
        }
        for path, key in USAGE_PATHS
    ]


def _modes(*, request_headers: bool = False, response_body: bool = False, admission: bool = False) -> dict[str, str]:
    return {
        "request_header_mode": "SEND" if request_headers else "SKIP",
        "request_body_mode": "BUFFERED" if admission else "NONE",
        "request_trailer_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "STREAMED" if response_body else "NONE",
        "response_trailer_mode": "SKIP",
    }


def _processor_grpc() -> dict[str, Any]:
    return {
        "envoy_grpc": {"cluster_name": PROCESSOR_CLUSTER},
        "timeout": "1s",
        # A stream that cannot be opened (a replica just died) is tried again, on another host.
        "retry_policy": {
            "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
            "num_retries": 2,
            "retry_on": "connect-failure,refused-stream,reset,unavailable",
        },
    }


def jwt_authn_filter(providers: Sequence[JwtProvider]) -> dict[str, Any]:
    """Envoy verifies the policy's JWTs. Only a bearer token shaped as a JWT is checked (an API key
    passes unchecked, to the processor): it must be valid for one of the providers, else Envoy
    refuses it (401). The verified payload is written to metadata under the provider's name, for the
    processor; the token itself is removed from the request (`forward: false`)."""
    requirements = [{"provider_name": p.name} for p in providers]
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": f"{_T}.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                p.name: {
                    "issuer": p.issuer,
                    **({"audiences": list(p.audiences)} if p.audiences else {}),
                    "local_jwks": {"inline_string": p.jwks},
                    "forward": False,
                    "payload_in_metadata": p.name,
                }
                for p in providers
            },
            "rules": [{
                "match": {"prefix": "/", "headers": [{"name": "authorization", "string_match": {
                    "safe_regex": {"regex": f"^Bearer {JWT_SHAPE}$"}}}]},
                "requires": requirements[0] if len(requirements) == 1 else {
                    "requires_any": {"requirements": requirements}},
            }],
        },
    }


def ext_authz_filter(trusted: TrustedHeaders) -> dict[str, Any]:
    """Envoy asks the authenticator (an HTTP service, `trusted.authorizer`) about every request, with
    its credentials. A refusal (any status but 200) goes to the client: its status, and an
    OpenAI-style body (the local reply mapper); the service unreachable or failing is a 503. On 200,
    the trusted headers it answers with, and no others, are set on the request (replacing any
    value), for the processor to attribute; it may answer with none (an API key's caller)."""
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": f"{_T}.filters.http.ext_authz.v3.ExtAuthz",
            "http_service": {
                "server_uri": {
                    "uri": f"http://{trusted.authorizer}",
                    "cluster": AUTHORIZER_CLUSTER,
                    "timeout": "0.5s",
                },
                "authorization_response": {"allowed_upstream_headers": {
                    "patterns": [{"exact": h} for h in trusted.headers]}},
            },
            # what the authenticator is shown besides method, path and host: the credentials
            "allowed_headers": {"patterns": [{"exact": h} for h in CREDENTIAL_HEADERS]},
            # Fail closed: no answer is no identity.
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
            "stat_prefix": "authorizer",
        },
    }


def authorizer_cluster(trusted: TrustedHeaders) -> dict[str, Any]:
    return _cluster(AUTHORIZER_CLUSTER, [Endpoint.parse(trusted.authorizer)])


def http_filters(deployment: Deployment, policy: Policy | None = None) -> list[dict[str, Any]]:
    """The filter chain, in order (see the module docstring)."""
    rules = _usage_rules()
    jwt = policy.identity.jwt if policy is not None else ()
    trusted = policy.identity.trusted_headers if policy is not None else None
    trusted_headers = trusted.headers if trusted is not None else ()
    wait_ms = policy.routing.max_wait_ms if policy is not None else 0
    # the response meter exists only where a pool needs it: elsewhere it would be one more filter
    # instance per request, with every mode off
    counted = policy is not None and any(not p.reports_usage for p in policy.pools)
    chain = [
        {
            "name": "envoy.filters.http.compressor",
            "typed_config": {
                "@type": f"{_T}.filters.http.compressor.v3.Compressor",
                "response_direction_config": {
                    "common_config": {"content_type": list(JSON_CONTENT_TYPES)},
                    # the upstream answers in identity, so the meters below read its usage
                    "remove_accept_encoding_header": True,
                },
                "compressor_library": {
                    "name": "gzip",
                    "typed_config": {"@type": f"{_T}.compression.gzip.compressor.v3.Gzip"},
                },
            },
        },
        {
            # CONNECT would open a tunnel the body-buffering filters below wait on until the idle
            # timeout: refused at once (403, as OpenAI-style JSON by the local reply mapper).
            "name": "envoy.filters.http.rbac",
            "typed_config": {
                "@type": f"{_T}.filters.http.rbac.v3.RBAC",
                "rules": {"action": "DENY", "policies": {"no_connect": {
                    "permissions": [{"header": {"name": ":method", "string_match": {"exact": "CONNECT"}}}],
                    "principals": [{"any": True}],
                }}},
            },
        },
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": f"{_T}.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {"request_mutations": [
                    {"remove_on_match": {"key_matcher": {"prefix": HEADER_PREFIX}}},
                    *({"remove": h} for h in trusted_headers),
                ]},
            },
        },
        *([jwt_authn_filter(jwt)] if jwt else []),
        *([ext_authz_filter(trusted)] if trusted is not None else []),
        {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": f"{_T}.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": _processor_grpc(),
                # Fail closed: an ungoverned request is never let through.
                "failure_mode_allow": False,
                # the admission decides in well under 0.5 s, plus the wait for pool room the policy allows
                "message_timeout": f"{0.5 + wait_ms / 1000:g}s",
                "processing_mode": _modes(admission=True),
                "allow_mode_override": True,
                "forward_rules": {"allowed_headers": {"patterns": [
                    {"exact": ":path"}, {"exact": ":method"}, {"exact": "authorization"}, {"exact": "x-api-key"},
                    {"exact": "content-type"}, *({"exact": h} for h in trusted_headers),
                ]}},
                "mutation_rules": {"allow_all_routing": True},
                "metadata_options": {
                    "receiving_namespaces": {"untyped": [NAMESPACE]},
                    # the verified JWT payloads (jwt_authn), only where the policy has issuers
                    **({"forwarding_namespaces": {"untyped": [JWT_NAMESPACE]}} if jwt else {}),
                },
                # (and the headers the authenticator set: the trusted identity)
                "request_attributes": [*ATTRIBUTE_HEADERS, *(header_attribute(h) for h in trusted_headers)],
                # Envoy re-routes after a body reply only if told to: the pool is in the reply.
                "route_cache_action": "CLEAR",
            },
        },
        {
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": f"{_T}.filters.http.buffer.v3.Buffer",
                "max_request_bytes": deployment.buffer_limit_bytes,
            },
        },
        {
            # The processor on the response path, only where counting needs it: rendered only when a
            # pool's servers report no usage (`reports_usage: false`); that pool's routes turn on
            # STREAMED response bodies, everywhere else every mode is off and no stream is opened.
            # It answers each chunk at once and writes its count to tokenmeter.usage at the end;
            # it never fails a response that was admitted (failure_mode_allow).
            "name": METER_FILTER,
            "typed_config": {
                "@type": f"{_T}.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": _processor_grpc(),
                "failure_mode_allow": True,
                "message_timeout": "0.5s",
                "processing_mode": _modes(),
                "allow_mode_override": False,
                "forward_rules": {"allowed_headers": {"patterns": [{"exact": ":status"}]}},
                "response_attributes": ["response.code"],
                "metadata_options": {
                    "forwarding_namespaces": {"untyped": [NAMESPACE]},
                    "receiving_namespaces": {"untyped": [USAGE_NAMESPACE]},
                },
                "stat_prefix": "meter",
            },
        },
        {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": f"{_T}.filters.http.lua.v3.Lua",
                # no default code: it runs only where a route names it
                "source_codes": {STRIP_USAGE_SCRIPT: {"inline_string": strip_usage_script()}},
            },
        },
        {
            "name": "envoy.filters.http.json_to_metadata",
            "typed_config": {
                "@type": f"{_T}.filters.http.json_to_metadata.v3.JsonToMetadata",
                "response_rules": {"rules": copy.deepcopy(rules), "allow_content_types": list(JSON_CONTENT_TYPES)},
            },
        },
        {
            "name": "envoy.filters.http.sse_to_metadata",
            "typed_config": {
                "@type": f"{_T}.filters.http.sse_to_metadata.v3.SseToMetadata",
                "response_rules": {"content_parser": {
                    "name": "envoy.content_parsers.json",
                    "typed_config": {
                        "@type": f"{_T}.content_parsers.json.v3.JsonContentParser",
                        "rules": [{"rule": r} for r in rules],
                    },
                }},
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": f"{_T}.filters.http.router.v3.Router"},
        },
    ]
    return [f for f in chain if counted or f["name"] != METER_FILTER]


# -- routes --------------------------------------------------------------------------------


def _md_match(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"filter": NAMESPACE, "path": [{"key": key}], "value": value}


def routes(policy: Policy) -> list[dict[str, Any]]:
    """A request reaches a model pool only with the processor's pool metadata, which no client can
    set. Per pool, two routes: the response plan that takes the injected usage event out of the
    stream (Lua), and the plain one."""
    out: list[dict[str, Any]] = []
    lua_on = {"envoy.filters.http.lua": {
        "@type": f"{_T}.filters.http.lua.v3.LuaPerRoute", "name": STRIP_USAGE_SCRIPT}}
    meter_on = {METER_FILTER: {
        "@type": f"{_T}.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {"processing_mode": _modes(response_body=True)}}}
    for pool in policy.pools:
        pool_is = _md_match("pool", {"string_match": {"exact": pool.name}})
        route = {"cluster": pool_cluster(pool.name), "timeout": "0s"}
        metered = {} if pool.reports_usage else copy.deepcopy(meter_on)
        out.append({
            "name": f"{pool.name}.strip_usage",
            "match": {"prefix": "/", "dynamic_metadata": [
                pool_is, _md_match(STRIP_USAGE_KEY, {"bool_match": True})]},
            "route": dict(route),
            "typed_per_filter_config": {**copy.deepcopy(lua_on), **metered},
        })
        plain: dict[str, Any] = {
            "name": pool.name,
            "match": {"prefix": "/", "dynamic_metadata": [pool_is]},
            "route": dict(route),
        }
        if metered:
            plain["typed_per_filter_config"] = metered
        out.append(plain)
    out.append({
        # Only a POST the processor never saw lands here: Envoy sends no message for an empty body.
        "name": "post_without_body",
        "match": {"prefix": "/", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
        "direct_response": {"status": 400, "body": {"inline_string":
            '{"error":{"message":"A request body is required.",'
            '"type":"invalid_request_error","param":null,"code":"invalid_request"}}'}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    })
    out.append({
        # Other methods (GET /v1/models, ...) have no body to wait for: the processor sees their
        # headers instead, and its answer routes them like any other request.
        "name": "without_body",
        "match": {"prefix": "/"},
        "route": {"cluster": pool_cluster(policy.pools[-1].name), "timeout": "0s"},
        "typed_per_filter_config": {"envoy.filters.http.ext_proc": {
            "@type": f"{_T}.filters.http.ext_proc.v3.ExtProcPerRoute",
            "overrides": {"processing_mode": _modes(request_headers=True, admission=True)},
        }},
    })
    return out


def virtual_host(policy: Policy) -> dict[str, Any]:
    # the pool that served the request, where the policy lets clients see it (`routing.show_pool`)
    shown = [(H_POOL, "pool")] if policy.routing.show_pool else []
    return {
        "name": "llm",
        "domains": ["*"],
        "routes": routes(policy),
        # Set by the processor at admission (dynamic metadata); empty values add no header.
        "response_headers_to_add": [
            {"header": {"key": header, "value": f"%DYNAMIC_METADATA({NAMESPACE}:{key})%"},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for header, key in [
                (H_REQUEST_ID, "request_id"),
                (H_OUTPUT_LIMIT, OUTPUT_LIMIT_KEY),
                *[(h, metadata_key(h)) for h in (*RATELIMIT_HEADERS, *QUOTA_HEADERS)],
                *shown,
            ]
        ],
        # an upstream's own header of that name never reaches the client
        **({} if shown else {"response_headers_to_remove": [H_POOL]}),
        "request_headers_to_add": [
            {
                "header": {"key": header, "value": f"%DYNAMIC_METADATA({NAMESPACE}:{key})%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                "keep_empty_value": True,  # an absent value still replaces a client-sent one
            }
            for header, key in _ATTRIBUTION_METADATA
        ],
        # the credentials, and the identity the authenticator asserted: the gateway's business
        "request_headers_to_remove": [*CREDENTIAL_HEADERS, *(
            policy.identity.trusted_headers.headers if policy.identity.trusted_headers is not None else ())],
    }


# -- the listener, clusters and bootstrap --------------------------------------------------


def _access_logs(deployment: Deployment) -> list[dict[str, Any]]:
    fields = {
        "time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "status": "%RESPONSE_CODE%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "duration_ms": "%DURATION%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        **{k: f"%DYNAMIC_METADATA({NAMESPACE}:{k})%" for k in (
            "request_id", "tenant", "project", "team", "key_id", "model", "pool", "decision", "policy_version")},
        **{k: f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:{k})%" for k in (
            "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")},
        # What `tokenmeter ledger recover` needs to end a request from this line exactly as the
        # processor does from the gRPC entry: the sealed admission facts, Envoy's usage counts, and
        # how the response ended. Envoy writes it whatever happens to the processor.
        "envoy_request_id": "%REQ(X-REQUEST-ID)%",
        "response_flags": "%RESPONSE_FLAGS%",
        "bytes_sent": "%BYTES_SENT%",
        "upstream_host": "%UPSTREAM_HOST%",
        "ttfb_ms": "%RESPONSE_DURATION%",
        "admission": f"%DYNAMIC_METADATA({NAMESPACE})%",
        "usage": f"%DYNAMIC_METADATA({USAGE_NAMESPACE})%",
    }
    log_format = {"json_format": fields}
    readable: dict[str, Any]
    if deployment.access_log_path is None:
        readable = {"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": f"{_T}.access_loggers.stream.v3.StdoutAccessLog", "log_format": log_format}}
    else:
        readable = {"name": "envoy.access_loggers.file", "typed_config": {
            "@type": f"{_T}.access_loggers.file.v3.FileAccessLog",
            "path": deployment.access_log_path, "log_format": log_format}}
    return [readable, settle_access_log()]


def settle_access_log() -> dict[str, Any]:
    """The gRPC access log whose entries settle requests (one message per flush, not per request)."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": f"{_T}.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": SETTLE_LOG_NAME,
                "transport_api_version": "V3",
                "grpc_service": _processor_grpc(),
                "buffer_flush_interval": "0.1s",
            },
        },
    }


def _cel(expression: str) -> dict[str, Any]:
    return {"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {"@type": f"{_T}.access_loggers.filters.cel.v3.ExpressionFilter", "expression": expression},
    }}


def _json_error(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"content_type": "application/json",
            "json_format": {"error": {"message": message, "type": type_, "param": None, "code": code}}}


def _local_reply_config(deployment: Deployment, policy: Policy | None = None) -> dict[str, Any]:
    """Every answer Envoy makes itself is an OpenAI-style JSON error, as the processor's are: its
    413 (a body over its buffer, before the processor sees it), and any other (the processor
    unreachable, a codec error, an overflow), with Envoy's reason as the code. The processor's own
    refusals (details tokenmeter_*) and the generated routes' direct responses keep their bodies."""
    mib = deployment.buffer_limit_bytes / (1024 * 1024)
    jwt = [{
        # jwt_authn's refusal of a token (bad signature, expired, unknown issuer, wrong audience)
        "filter": _cel("response.code_details.startsWith('jwt_authn_access_denied')"),
        "body_format_override": _json_error(
            "Invalid bearer token (%RESPONSE_CODE_DETAILS%).", "invalid_request_error", "invalid_token"),
    }] if policy is not None and policy.identity.jwt else []
    authz = [{
        # the authenticator's refusal (ext_authz): its status, the gateway's JSON
        "filter": _cel("response.code_details == 'ext_authz_denied'"),
        "body_format_override": _json_error(
            "The gateway's authenticator refused the request's credentials (HTTP %RESPONSE_CODE%).",
            "invalid_request_error", "invalid_credentials"),
    }] if policy is not None and policy.identity.trusted_headers is not None else []
    return {"mappers": [
        *jwt,
        *authz,
        {
            "filter": _cel("response.code == 413 && response.code_details == 'request_payload_too_large'"),
            "body_format_override": _json_error(
                f"Request body exceeds the gateway's buffer limit ({mib:g} MiB).", "invalid_request_error",
                "request_too_large"),
        },
        {
            "filter": _cel("response.code >= 400 && !response.code_details.startsWith('tokenmeter_')"
                           " && response.code_details != 'direct_response'"),
            "body_format_override": _json_error(
                "The gateway could not complete the request (%RESPONSE_CODE_DETAILS%). Retry shortly.",
                "api_error", "gateway_error"),
        },
    ]}


def http_connection_manager(policy: Policy, deployment: Deployment) -> dict[str, Any]:
    filters = http_filters(deployment, policy)
    return {
        "@type": f"{_T}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llm_ingress",
        "codec_type": "AUTO",
        # The edge: the client is the TCP peer, and Envoy issues every request's x-request-id itself
        # (a client's own is replaced), so the id that joins an access log entry is never the client's.
        "use_remote_address": True,
        "preserve_external_request_id": False,
        # A header spelled with underscores (x_tokenmeter_tenant) is one a CGI/WSGI-style server
        # folds into a dashed name: none reaches a model server. (Client x-envoy-* headers, such as
        # x-envoy-original-path, are stripped at the edge by use_remote_address.)
        "common_http_protocol_options": {"headers_with_underscores_action": "DROP_HEADER"},
        # One spelling per path before routing and before the processor decides what is metered.
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
        "stream_idle_timeout": "300s",
        "request_timeout": "0s",
        "access_log": _access_logs(deployment),
        "local_reply_config": _local_reply_config(deployment, policy),
        "http_filters": filters,
        "route_config": {"name": "llm_routes", "virtual_hosts": [virtual_host(policy)]},
    }


def _cluster(name: str, endpoints: Sequence[Endpoint], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC" if all(e.is_static for e in endpoints) else "STRICT_DNS",
        "connect_timeout": "1s",
        **extra,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": e.to_address()}} for e in endpoints]}],
        },
    }


def processor_cluster(deployment: Deployment) -> dict[str, Any]:
    """The processor replicas: a replica that is gone (connection refused or reset) is ejected at its
    first failure, and one that drains (its gRPC health reports NOT_SERVING on SIGTERM) or dies
    is taken out by the active health check within one interval."""
    limits = {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
    return _cluster(
        PROCESSOR_CLUSTER,
        deployment.processor,
        health_checks=[{
            "timeout": "0.25s",
            "interval": "0.5s",
            "no_traffic_interval": "0.5s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "reuse_connection": True,
            "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"},
        }],
        outlier_detection={
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "consecutive_gateway_failure": 1,
            "interval": "0.5s",
            "base_ejection_time": "2s",
            "max_ejection_percent": 100,
        },
        common_lb_config={"healthy_panic_threshold": {"value": 0}},
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": f"{_T}.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 100000}},
        }},
        circuit_breakers={"thresholds": [{"priority": "DEFAULT", **limits}, {"priority": "HIGH", **limits}]},
    )


class MissingEndpoints(ValueError):
    pass


def pool_clusters(policy: Policy, deployment: Deployment) -> list[dict[str, Any]]:
    out = []
    for pool in policy.pools:
        endpoints = deployment.pool_endpoints.get(pool.name) or tuple(Endpoint.parse(e) for e in pool.endpoints)
        if not endpoints:
            raise MissingEndpoints(f"pool '{pool.name}' has no endpoints (add `endpoints: [host:port]` to it)")
        limits = {"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000}
        out.append(_cluster(pool_cluster(pool.name), endpoints,
                            circuit_breakers={"thresholds": [{"priority": "DEFAULT", **limits}]}))
    return out


def render(policy: Policy, deployment: Deployment | None = None) -> dict[str, Any]:
    """The standalone Envoy bootstrap for `policy`."""
    d = deployment or Deployment()
    return {
        "admin": {"address": Endpoint("127.0.0.1", d.admin_port).to_address()},
        "static_resources": {
            "listeners": [{
                "name": "llm_ingress",
                "address": Endpoint(d.listen_address, d.listen_port).to_address(),
                # Bodies are buffered only on the request side (bounded by the policy's
                # max_body_bytes, kept below this so the processor answers 413 with a clear error).
                "per_connection_buffer_limit_bytes": d.buffer_limit_bytes,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": http_connection_manager(policy, d),
                }]}],
            }],
            "clusters": [processor_cluster(d), *pool_clusters(policy, d), *(
                [authorizer_cluster(policy.identity.trusted_headers)]
                if policy.identity.trusted_headers is not None else [])],
        },
    }


# -- Istio ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IstioTarget:
    namespace: str = "istio-system"
    gateway_selector: Mapping[str, str] = field(default_factory=lambda: {"istio": "ingressgateway"})
    processor_host: str = "tokenmeter.tokenmeter.svc.cluster.local"
    processor_port: int = 50051
    # pool name -> Kubernetes service host serving it (default: the policy's endpoints' host)
    pool_hosts: Mapping[str, str] = field(default_factory=dict)


def render_istio(policy: Policy, target: IstioTarget | None = None) -> list[dict[str, Any]]:
    """The same filters and routes as an EnvoyFilter for an Istio ingress gateway.

    Istio has no first-class ext_proc API (istio#32490): the filters are inserted before the router,
    the settle access log is merged into the HTTP connection manager, and the processor and pool
    clusters are Istio's own (`outbound|PORT||HOST`); routes are rendered into the gateway's route
    configuration (a ROUTE_CONFIGURATION patch on its virtual host) so that they match the
    processor's metadata exactly as standalone, which no VirtualService can express.
    """
    t = target or IstioTarget()
    processor = f"outbound|{t.processor_port}||{t.processor_host}"
    filters = [copy.deepcopy(f) for f in http_filters(Deployment(), policy)
               if f["name"] != "envoy.filters.http.router"]
    for f in filters:
        _point_grpc(f, processor, t.processor_host)
    trusted = policy.identity.trusted_headers
    if trusted is not None:  # the authenticator: Istio's cluster of its service
        host, _, port = trusted.authorizer.rpartition(":")
        authz = next(f for f in filters if f["name"] == "envoy.filters.http.ext_authz")
        authz["typed_config"]["http_service"]["server_uri"]["cluster"] = f"outbound|{port}||{host.strip('[]')}"
    settle = settle_access_log()
    _point_grpc(settle, processor, t.processor_host)

    def pool_host(pool_name: str, endpoints: Sequence[str]) -> str:
        if pool_name in t.pool_hosts:
            return t.pool_hosts[pool_name]
        if endpoints:
            return endpoints[0]
        raise MissingEndpoints(f"pool '{pool_name}' has no endpoints for Istio (give it `endpoints`)")

    vhost = virtual_host(policy)
    for route in vhost["routes"]:
        cluster = route.get("route", {}).get("cluster")
        if cluster is None:
            continue
        pool = next(p for p in policy.pools if pool_cluster(p.name) == cluster)
        host, _, port = pool_host(pool.name, pool.endpoints).rpartition(":")
        route["route"]["cluster"] = f"outbound|{port or 8000}||{host or pool.name}"
    context = "GATEWAY"
    listener_match = {"context": context, "listener": {"filterChain": {"filter": {
        "name": "envoy.filters.network.http_connection_manager"}}}}
    patches: list[dict[str, Any]] = [
        {
            "applyTo": "HTTP_FILTER",
            "match": {**listener_match, "listener": {"filterChain": {"filter": {
                "name": "envoy.filters.network.http_connection_manager",
                "subFilter": {"name": "envoy.filters.http.router"}}}}},
            "patch": {"operation": "INSERT_BEFORE", "value": f},
        }
        for f in filters
    ]
    patches.append({
        "applyTo": "NETWORK_FILTER",
        "match": listener_match,
        "patch": {"operation": "MERGE", "value": {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": f"{_T}.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "access_log": [settle],
            },
        }},
    })
    patches.append({
        "applyTo": "VIRTUAL_HOST",
        "match": {"context": context},
        "patch": {"operation": "MERGE", "value": {k: v for k, v in vhost.items() if k not in ("name", "domains")}},
    })
    return [{
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": "tokenmeter", "namespace": t.namespace},
        "spec": {"workloadSelector": {"labels": dict(t.gateway_selector)}, "configPatches": patches},
    }]


def _point_grpc(f: dict[str, Any], cluster: str, authority: str) -> None:
    """Aim a filter's (or access log's) gRPC service at Istio's cluster for the processor."""
    typed = f["typed_config"]
    holder = typed.get("common_config", typed)
    service = holder.get("grpc_service")
    if service is not None:
        service["envoy_grpc"] = {"cluster_name": cluster, "authority": authority}


# -- output and CLI ------------------------------------------------------------------------

_HEADER = """\
# Token Meter: Envoy in front of LLM model servers, governed by the tokenmeter ext_proc.
# GENERATED by `tokenmeter envoy-config --policy {policy}`{extra}: do not edit; edit the policy
# (its pools and their endpoints) and generate again. tests/e2e checks the shipped file is current.
"""


def dump(config: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, header: str = "") -> str:
    if isinstance(config, Mapping):
        return header + yaml.safe_dump(dict(config), sort_keys=False, width=120)
    return header + yaml.safe_dump_all([dict(c) for c in config], sort_keys=False, width=120)


def write(config: Mapping[str, Any], path: Path) -> Path:
    path.write_text(dump(config))
    return path


def header_for(policy_arg: str, *, istio: bool) -> str:
    return _HEADER.format(policy=policy_arg, extra=" --istio" if istio else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="policy YAML file (its pools become clusters and routes)")
    parser.add_argument("--istio", action="store_true", help="render an Istio EnvoyFilter instead")
    parser.add_argument("--processor", default="processor:50051",
                        help="the processor's host:port or unix:PATH (standalone; default processor:50051)")
    parser.add_argument("--listen-port", type=int, default=8080)
    parser.add_argument("--admin-port", type=int, default=9901)
    parser.add_argument("--istio-namespace", default="istio-system")
    parser.add_argument("--istio-processor-host", default="tokenmeter.tokenmeter.svc.cluster.local")
    parser.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")


def run(args: argparse.Namespace) -> int:
    """`tokenmeter envoy-config` (extproc.cli)."""
    from extproc.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    try:
        if args.istio:
            text = dump(render_istio(policy, IstioTarget(
                namespace=args.istio_namespace, processor_host=args.istio_processor_host)),
                header=header_for(args.policy, istio=True))
        else:
            deployment = Deployment(listen_port=args.listen_port, admin_port=args.admin_port,
                                    processor=(Endpoint.parse(args.processor),))
            text = dump(render(policy, deployment), header=header_for(args.policy, istio=False))
    except ValueError as exc:
        print(f"tokenmeter envoy-config: {exc}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0
