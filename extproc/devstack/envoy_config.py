"""Render the shipped Envoy config for a local run.

`envoy/envoy.yaml` is written for docker-compose (service hostnames). A local run (demo, tests,
benchmarks) changes only addresses: the listener and admin ports, and the endpoints of the
processor and pool clusters. Everything else (filters, routes, access log) is the shipped file,
so what the tests exercise is what operators deploy.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.service.metadata import (
    ATTRIBUTE_HEADERS,
    H_KEY_ID,
    H_POOL,
    H_PROJECT,
    H_REQUEST_ID,
    H_TEAM,
    H_TENANT,
    HEADER_PREFIX,
    SETTLE_LOG_NAME,
    USAGE_NAMESPACE,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO_ROOT / "envoy" / "envoy.yaml"
OBSERVE_CONFIG = REPO_ROOT / "envoy" / "envoy-observe.yaml"
NATIVE_CONFIG = REPO_ROOT / "envoy" / "envoy-native.yaml"
METER_FILTER = "tokenmeter.meter"


@dataclass(frozen=True)
class Endpoint:
    """A host:port endpoint, or a Unix domain socket path when `uds` is set."""

    host: str = "127.0.0.1"
    port: int = 0
    uds: str | None = None

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


def render(
    *,
    listen_port: int,
    admin_port: int,
    clusters: Mapping[str, Sequence[Endpoint]],
    source: Path = SHIPPED_CONFIG,
    access_log_path: str | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    config["admin"]["address"] = Endpoint("127.0.0.1", admin_port).to_address()
    resources = config["static_resources"]
    listener = resources["listeners"][0]
    listener["address"] = Endpoint("127.0.0.1", listen_port).to_address()
    if access_log_path is not None:
        _log_to_file(listener, access_log_path)
    by_name = {c["name"]: c for c in resources["clusters"]}
    for name, endpoints in clusters.items():
        if name not in by_name:
            raise KeyError(f"{source} has no cluster named {name!r}")
        cluster = by_name[name]
        cluster["type"] = "STATIC" if all(e.is_static for e in endpoints) else "STRICT_DNS"
        cluster["load_assignment"] = {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": e.to_address()}} for e in endpoints]}
            ],
        }
    return config


def observe_variant(config: Mapping[str, Any]) -> dict[str, Any]:
    """envoy.yaml with the response path metered by a second, observability-mode ext_proc filter.

    Envoy then never waits for the processor on the response path (no added latency per chunk);
    the price: the meter's replies are not read, so Envoy's access log has no token counts (the usage
    records do). envoy/envoy-observe.yaml is exactly this function's output (a test checks it).
    """
    out: dict[str, Any] = copy.deepcopy(dict(config))
    hcm = out["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    admission = filters[0]["typed_config"]
    admission["processing_mode"]["response_body_mode"] = "NONE"
    admission.pop("response_attributes", None)
    meter = {
        "@type": admission["@type"],
        "grpc_service": copy.deepcopy(admission["grpc_service"]),
        "observability_mode": True,
        # A meter that cannot reach the processor must not fail a response already admitted.
        "failure_mode_allow": True,
        "stat_prefix": "meter",
        "processing_mode": {
            "request_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            # Headers too: the meter is not waited for, and a response without a body then still
            # reaches it (status and end of stream) and gets its record.
            "response_header_mode": "SEND",
            "response_body_mode": "STREAMED",
            "response_trailer_mode": "SKIP",
        },
        "forward_rules": {"allowed_headers": {"patterns": [{"exact": ":status"}]}},
        "metadata_options": {"forwarding_namespaces": {"untyped": ["tokenmeter"]}},
    }
    filters.insert(1, {"name": METER_FILTER, "typed_config": meter})
    return out


# What the processor reads when Envoy sends it the request body alone (request headers skipped).
NATIVE_REQUEST_ATTRIBUTES = list(ATTRIBUTE_HEADERS)

# Where each API reports usage, as JSON paths -> the key in the tokenmeter.usage namespace
# (read back by extproc.metering.envoy_usage). OpenAI: `usage` on the JSON body and on the final SSE
# chunk (include_usage); the Responses API also in `response.usage` of its last event. Anthropic:
# `usage` on the JSON body; in a stream, input tokens on message_start (`message.usage`) and
# cumulative output tokens on every message_delta (`usage`). The last value seen wins.
_USAGE_PATHS: list[tuple[list[str], str]] = [
    (["usage", "prompt_tokens"], "prompt_tokens"),
    (["usage", "completion_tokens"], "completion_tokens"),
    (["usage", "total_tokens"], "total_tokens"),
    (["usage", "prompt_tokens_details", "cached_tokens"], "cached_tokens"),
    (["usage", "completion_tokens_details", "reasoning_tokens"], "reasoning_tokens"),
    (["usage", "input_tokens"], "input_tokens"),
    (["usage", "output_tokens"], "output_tokens"),
    (["usage", "cache_creation_input_tokens"], "cache_creation_input_tokens"),
    (["usage", "cache_read_input_tokens"], "cache_read_input_tokens"),
    (["usage", "input_tokens_details", "cached_tokens"], "input_cached_tokens"),
    (["usage", "output_tokens_details", "reasoning_tokens"], "output_reasoning_tokens"),
    (["message", "usage", "input_tokens"], "input_tokens"),
    (["message", "usage", "cache_creation_input_tokens"], "cache_creation_input_tokens"),
    (["message", "usage", "cache_read_input_tokens"], "cache_read_input_tokens"),
    (["response", "usage", "input_tokens"], "input_tokens"),
    (["response", "usage", "output_tokens"], "output_tokens"),
    (["response", "usage", "input_tokens_details", "cached_tokens"], "input_cached_tokens"),
    (["response", "usage", "output_tokens_details", "reasoning_tokens"], "output_reasoning_tokens"),
    (["model"], "response_model"),
    (["message", "model"], "response_model"),
]


JSON_CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "application/json;charset=utf-8",
    "application/json; charset=UTF-8",
    "application/json;charset=UTF-8",
)

_ATTRIBUTION_METADATA = [
    (H_TENANT, "tenant"),
    (H_PROJECT, "project"),
    (H_TEAM, "team"),
    (H_KEY_ID, "key_id"),
    (H_POOL, "pool"),
    (H_REQUEST_ID, "request_id"),
]


def _usage_rules() -> list[dict[str, Any]]:
    rules = []
    for path, key in _USAGE_PATHS:
        kind = "STRING" if key == "response_model" else "NUMBER"
        rules.append({
            "selectors": [{"key": p} for p in path],
            "on_present": {"metadata_namespace": USAGE_NAMESPACE, "key": key, "type": kind},
        })
    return rules


def native_variant(config: Mapping[str, Any]) -> dict[str, Any]:
    """envoy.yaml with the response metered by Envoy itself; the processor only admits.

    * The request exchanges ONE message with the processor: the buffered body, with the path,
      method and credentials as CEL attributes (request headers are skipped). A buffer filter holds
      the headers meanwhile, so the route is chosen on the processor's answer; the route (not the
      processor, whose header mutations Envoy ignores without a headers phase) sets the attribution
      headers from the processor's metadata and removes the caller's credentials.
    * The response never goes to the processor: json_to_metadata (JSON bodies) and sse_to_metadata
      (SSE streams) write the reported usage to the `tokenmeter.usage` namespace as it passes.
    * At the end of every request Envoy's gRPC access log (log name `tokenmeter.settle`) carries
      status, usage and the admission's metadata to the processor, which settles and records.
    * Routes: a request reaches a model pool only with the processor's `tokenmeter:pool` metadata.
      A POST that never reached the processor (no body) gets a 400 from Envoy; other methods
      (GET /v1/models, ...) send their headers to the processor (per-route override).
    envoy/envoy-native.yaml is exactly this function's output (a test checks it).
    """
    out: dict[str, Any] = copy.deepcopy(dict(config))
    hcm = out["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    admission = filters[0]["typed_config"]
    mode = admission["processing_mode"]
    mode["request_header_mode"] = "SKIP"
    mode["response_header_mode"] = "SKIP"
    mode["response_body_mode"] = "NONE"
    admission.pop("response_attributes", None)
    admission["request_attributes"] = list(NATIVE_REQUEST_ATTRIBUTES)
    # Envoy clears the route cache on a body reply only if it also mutates headers (DEFAULT), and
    # header mutations are ignored here: always re-route after the processor's answer.
    admission["route_cache_action"] = "CLEAR"
    rules = _usage_rules()
    filters.insert(0, {
        # The processor cannot see (or remove) headers here: no client-sent x-tokenmeter-* header
        # goes past Envoy; the route sets the real ones.
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove_on_match": {"key_matcher": {"prefix": HEADER_PREFIX}}}]},
        },
    })
    filters[2:2] = [
        {
            # Holds the request headers until the processor has answered the body: only then does
            # the router pick the route (on the processor's pool metadata) and the upstream.
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": out["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"],
            },
        },
        {
            "name": "envoy.filters.http.json_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
                # Model servers differ in how they spell JSON (llama.cpp, Ollama: "; charset=utf-8").
                "response_rules": {"rules": copy.deepcopy(rules), "allow_content_types": list(JSON_CONTENT_TYPES)},
            },
        },
        {
            "name": "envoy.filters.http.sse_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
                "response_rules": {
                    "content_parser": {
                        "name": "envoy.content_parsers.json",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser",
                            "rules": [{"rule": r} for r in rules],
                        },
                    }
                },
            },
        },
    ]
    hcm["access_log"].append({
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": SETTLE_LOG_NAME,
                "transport_api_version": "V3",
                "grpc_service": copy.deepcopy(admission["grpc_service"]),
                "buffer_flush_interval": "0.1s",
            },
        },
    })
    for log_cfg in hcm["access_log"]:
        fmt = log_cfg["typed_config"].get("log_format", {}).get("json_format")
        if fmt is not None:
            fmt["prompt_tokens"] = f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:prompt_tokens)%"
            fmt["completion_tokens"] = f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:completion_tokens)%"
            fmt["input_tokens"] = f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:input_tokens)%"
            fmt["output_tokens"] = f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:output_tokens)%"
            fmt.pop("usage_source", None)
    vhost = hcm["route_config"]["virtual_hosts"][0]
    # Envoy ignores the processor's header mutations when the request headers were skipped: the
    # route sets attribution from the processor's metadata and drops the caller's credentials.
    vhost["request_headers_to_add"] = [
        {
            "header": {"key": header, "value": f"%DYNAMIC_METADATA(tokenmeter:{key})%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            "keep_empty_value": True,  # an absent value still replaces a client-sent one
        }
        for header, key in _ATTRIBUTION_METADATA
    ]
    vhost["request_headers_to_remove"] = ["authorization", "x-api-key"]
    h100, _fallback = vhost["routes"]
    cheap_cluster = _fallback["route"]["cluster"]
    vhost["routes"] = [
        h100,
        {
            "match": {
                "prefix": "/",
                "dynamic_metadata": [
                    {"filter": "tokenmeter", "path": [{"key": "pool"}], "value": {"present_match": True}}
                ],
            },
            "route": {"cluster": cheap_cluster, "timeout": "0s"},
        },
        {
            # Only a POST the processor never saw lands here: Envoy sends no message for an empty body.
            "match": {"prefix": "/", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
            "direct_response": {
                "status": 400,
                "body": {"inline_string": '{"error":{"message":"A request body is required.",'
                                          '"type":"invalid_request_error","param":null,"code":"invalid_request"}}'},
            },
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        },
        {
            # Other methods have no body to wait for: the processor sees their headers instead.
            "match": {"prefix": "/"},
            "route": {"cluster": cheap_cluster, "timeout": "0s"},
            "typed_per_filter_config": {
                "envoy.filters.http.ext_proc": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                    "overrides": {"processing_mode": {
                        "request_header_mode": "SEND",
                        "request_body_mode": "BUFFERED",
                        "request_trailer_mode": "SKIP",
                        "response_header_mode": "SKIP",
                        "response_body_mode": "NONE",
                        "response_trailer_mode": "SKIP",
                    }},
                }
            },
        },
    ]
    return out


def _log_to_file(listener: dict[str, Any], path: str) -> None:
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for log in hcm.get("access_log", []):
        if log["name"] == "envoy.access_loggers.stdout":
            fmt = log["typed_config"]["log_format"]
            log["name"] = "envoy.access_loggers.file"
            log["typed_config"] = {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "log_format": fmt,
            }


def write(config: Mapping[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


_OBSERVE_HEADER = """\
# Token Meter, low-latency variant: like envoy.yaml, but the response body is metered by a second
# ext_proc filter in observability mode, so Envoy never waits for the processor on the response path.
# Trade-off: Envoy's access log has no token counts (the processor's usage records do).
# GENERATED from envoy.yaml by extproc.devstack.envoy_config.observe_variant; tests check they match.
#   .venv/bin/python -c 'from extproc.devstack.envoy_config import write_observe_config; write_observe_config()'
"""


_NATIVE_HEADER = """\
# Token Meter, lean variant: the processor only admits; Envoy meters the response itself.
# One ext_proc message per request (the buffered body, with path and credentials as attributes);
# json_to_metadata / sse_to_metadata count the reported usage as the response passes, and the gRPC
# access log (log name tokenmeter.settle) carries each request's end to the processor, which settles
# the reservation and writes the usage record. Nothing of the response waits for the processor.
# GENERATED from envoy.yaml by extproc.devstack.envoy_config.native_variant; tests check they match.
#   .venv/bin/python -c 'from extproc.devstack.envoy_config import write_native_config; write_native_config()'
"""


def write_native_config() -> Path:
    config = native_variant(yaml.safe_load(SHIPPED_CONFIG.read_text()))
    NATIVE_CONFIG.write_text(_NATIVE_HEADER + yaml.safe_dump(config, sort_keys=False, width=200))
    return NATIVE_CONFIG


def write_observe_config() -> Path:
    config = observe_variant(yaml.safe_load(SHIPPED_CONFIG.read_text()))
    OBSERVE_CONFIG.write_text(_OBSERVE_HEADER + yaml.safe_dump(config, sort_keys=False, width=200))
    return OBSERVE_CONFIG
