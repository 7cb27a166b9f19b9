"""Names this project owns on the wire: the dynamic-metadata namespace and the header space."""

import re

NAMESPACE = "tokenmeter"

# Every header under this prefix is set by the processor only; client-sent ones are removed.
HEADER_PREFIX = "x-tokenmeter-"
H_TENANT = "x-tokenmeter-tenant"
H_PROJECT = "x-tokenmeter-project"
H_TEAM = "x-tokenmeter-team"
H_KEY_ID = "x-tokenmeter-key-id"
H_POOL = "x-tokenmeter-pool"
H_REQUEST_ID = "x-tokenmeter-request-id"

# The caller's credentials are the gateway's business, not the model server's: never forwarded.
CREDENTIAL_HEADERS = ("authorization", "x-api-key")

# The namespace Envoy's json_to_metadata / sse_to_metadata write counted usage to, and the name of
# the gRPC access log whose entries settle requests.
USAGE_NAMESPACE = "tokenmeter.usage"
SETTLE_LOG_NAME = "tokenmeter.settle"

# Admission metadata key: the gateway injected stream_options.include_usage for a client that did
# not ask, and the route that takes that usage event back out of the stream must serve it.
STRIP_USAGE_KEY = "strip_usage"

# Admission metadata key: the output maximum the forwarded request carries (the reserved one);
# the route returns it to the client as H_OUTPUT_LIMIT.
OUTPUT_LIMIT_KEY = "max_output_tokens"
H_OUTPUT_LIMIT = "x-tokenmeter-max-output-tokens"

# Envoy skips the request headers: it sends these CEL attributes with the body instead (its
# request_attributes), each standing for a header. request.id is the id Envoy issues for the
# request (never the client's: the listener regenerates x-request-id): how an access log entry
# without our metadata finds an admission whose reply Envoy never applied.
ATTRIBUTE_HEADERS = {
    "request.path": ":path",
    "request.method": ":method",
    "request.headers['authorization']": "authorization",
    "request.headers['x-api-key']": "x-api-key",
    "request.headers['content-type']": "content-type",
    "request.id": "x-request-id",
}


def header_attribute(header: str) -> str:
    """The CEL attribute that brings request header `header` to the processor with the body: how
    the configuration carries headers beyond ATTRIBUTE_HEADERS (the policy's trusted identity
    headers, `identity.trusted_headers`)."""
    quoted = header.replace("\\", "\\\\").replace("'", "\\'")  # a CEL string literal (' is a tchar)
    return f"request.headers['{quoted}']"


_HEADER_ATTRIBUTE = ("request.headers['", "']")


def attribute_header(attribute: str) -> str | None:
    """The header a request attribute stands for: one of ATTRIBUTE_HEADERS, or the header of any
    `header_attribute` (Envoy sends only the attributes its configuration asks for)."""
    known = ATTRIBUTE_HEADERS.get(attribute)
    if known is not None:
        return known
    head, tail = _HEADER_ATTRIBUTE
    if attribute.startswith(head) and attribute.endswith(tail) and len(attribute) > len(head) + len(tail):
        inner = attribute[len(head):-len(tail)]
        return inner if "\\" not in inner else re.sub(r"\\(.)", r"\1", inner)
    return None
