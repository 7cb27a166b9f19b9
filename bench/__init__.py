"""Token Meter benchmark harness: `python -m bench.run [--quick] [--out bench/out]` (see bench/RESULTS.md)."""
