"""The fake model server (extproc.fakes.model_server), with a send-time stamp in every SSE event.

Every streamed event gets ``"system_fingerprint": "ts<ns>"`` where ``<ns>`` is
``time.monotonic_ns()`` when the event was built, right before it is written to the socket.
CLOCK_MONOTONIC is one clock for all processes of a Linux machine, so the benchmark client can
compute each chunk's one-way lag (client receive time - server send time) directly, through
Envoy alone and through Envoy + processor, instead of inferring it from inter-arrival gaps
(a constant per-chunk delay does not change the gaps). ``system_fingerprint`` is a real field of
OpenAI chunks, so a metering parser reads these events as ordinary ones. Non-streaming replies
are untouched.

Run: ``python -m bench.upstream --pool h100 --port 8001 [--chunk-delay-ms 5]`` (same flags).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from extproc.fakes import model_server


def _stamped_sse_data(payload: Any) -> bytes:
    if isinstance(payload, dict):
        payload = {**payload, "system_fingerprint": f"ts{time.monotonic_ns()}"}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def install() -> bool:
    """Patch the fake server's SSE encoder; False if its internals changed (stamps then missing)."""
    if not callable(getattr(model_server, "_sse_data", None)):
        return False
    model_server._sse_data = _stamped_sse_data
    return True


if __name__ == "__main__":
    install()
    model_server.main()
