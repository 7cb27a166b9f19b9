"""GC pauses of a `tokenmeter serve` process: put this directory on its PYTHONPATH.

    TM_GC_STATS=/tmp/gc PYTHONPATH=bench/gc_pauses .venv/bin/python -m bench.tail --targets b

Python imports `sitecustomize` at start-up. In a process whose arguments include `serve`, this one
times every collection (gc.callbacks) after the first TM_GC_SKIP_S seconds (start-up, default 4)
and, at exit, writes per generation the count, the total and the longest pause to
$TM_GC_STATS-<pid>.txt. Other processes are left alone.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time

if "serve" in sys.argv and os.environ.get("TM_GC_STATS"):
    _out = os.environ["TM_GC_STATS"]
    _skip = float(os.environ.get("TM_GC_SKIP_S", "4"))
    _t0 = time.perf_counter()
    _started: list[float] = [0.0]
    _pauses: dict[int, list[float]] = {}

    def _callback(phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            _started[0] = now
        elif now - _t0 > _skip:
            _pauses.setdefault(info["generation"], []).append(now - _started[0])

    def _write() -> None:
        with open(f"{_out}-{os.getpid()}.txt", "w") as f:
            f.write(f"thresholds {gc.get_threshold()}, frozen objects {gc.get_freeze_count()}\n")
            for gen, ds in sorted(_pauses.items()):
                f.write(f"gen{gen}: {len(ds)} collections, {sum(ds) * 1000:.1f} ms in all, "
                        f"longest {max(ds) * 1000:.2f} ms\n")

    gc.callbacks.append(_callback)
    atexit.register(_write)
