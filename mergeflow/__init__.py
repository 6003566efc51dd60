"""mergeflow: merge many fine-tuned checkpoints of one model into one model, or into a compressed
bundle that rebuilds each of them, on a Ray cluster.

    import mergeflow
    result = mergeflow.merge("merge.yaml", output="runs/x")   # also plan, reconstruct, inspect, remerge

The layers live in mergeflow.workers (per-shard compute, no ray), mergeflow.workflows (the Ray
recipe, the CLI) and mergeflow.infra (storage, locks, tracking); mergeflow.dev holds the
benchmark suite and local services. Importing this package imports none of them.
"""

from __future__ import annotations

import os
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergeflow")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0.0.0+source"

# In a source checkout that was never installed (a GPU box with torch alone), the layers sit
# beside this folder rather than in it: let mergeflow.workers and friends resolve there.
_here = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_here, "workers")):
    __path__.append(os.path.dirname(_here))  # type: ignore[name-defined]  # noqa: F821

_API = {
    "merge": "mergeflow.api",
    "plan": "mergeflow.api",
    "load": "mergeflow.api",
    "reconstruct": "mergeflow.api",
    "inspect": "mergeflow.api",
    "remerge": "mergeflow.api",
    "MergeResult": "mergeflow.api",
    "RunInfo": "mergeflow.api",
    "MergeflowError": "mergeflow.errors",
    "ConfigError": "mergeflow.errors",
    "CheckpointError": "mergeflow.errors",
    "StorageError": "mergeflow.errors",
    "OutputError": "mergeflow.errors",
    "LockHeld": "mergeflow.infra.lock",
    "TrackingError": "mergeflow.infra.tracking",
    "Method": "mergeflow.workers.methods",
    "MethodOutput": "mergeflow.workers.methods",
    "methods": "mergeflow.workers.methods",
    "register_backend": "mergeflow.infra.storage",
}
_RENAMED = {"register_method": ("mergeflow.workers.methods", "register")}


def __getattr__(name: str):
    """The public API, imported on first use (ray, torch and mlflow take seconds to import)."""
    if name in _API:
        return getattr(import_module(_API[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'mergeflow' has no attribute {name!r}")


__all__ = ["__version__", *_API, *_RENAMED]
