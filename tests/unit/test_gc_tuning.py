"""`tokenmeter serve` freezes what start-up built and enlarges the young generation (server.tune_gc)."""

from __future__ import annotations

import gc

from extproc.service.server import GC_THRESHOLDS, tune_gc


def test_start_up_objects_are_frozen_and_the_young_generation_enlarged() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 1000  # this test process's modules, at least
        assert GC_THRESHOLDS[0] > before[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
