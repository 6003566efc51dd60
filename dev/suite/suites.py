"""The benchmark suites, by name. Each is a module with NAME, TASK_COUNTS, EVALUATOR, ZERO_SHOT_OPTIONS
(the evaluator's options that score the base as zero-shot), DEFAULT_DIR,
build_suite(out_dir, tasks, seed, *, force, log), evaluate(...) and lot_method(suite_dir, tasks)
(LOT / RegMean's model source on that suite)."""

from __future__ import annotations

import importlib
from types import ModuleType

SUITES = {"digits": "mergeflow.dev.suite.models", "words": "mergeflow.dev.suite.words"}


def get(name: str) -> ModuleType:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; the suites are {', '.join(SUITES)}")
    return importlib.import_module(SUITES[name])
