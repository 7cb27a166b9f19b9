"""Names this project owns on the wire: the dynamic-metadata namespace and the header space."""

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
