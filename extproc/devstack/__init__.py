"""Starting and stopping the real processes of a local stack (Redis, Envoy, processor, fakes).

Used by `tokenmeter demo`, the benchmark harness and the end-to-end tests, so that all three run
the same binaries with the same configs.
"""
