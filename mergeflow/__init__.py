"""mergeflow: merge many fine-tuned checkpoints of one model into one model, or into a compressed
bundle that rebuilds each of them, on a Ray cluster.

    import mergeflow
    report = mergeflow.merge("merge.yaml", output="runs/x")

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
    "MergeflowError": "mergeflow.errors", "ConfigError": "mergeflow.errors", "CheckpointError": "mergeflow.errors",
    "StorageError": "mergeflow.errors", "OutputError": "mergeflow.errors",
}


def __getattr__(name: str):
    """The public API, imported on first use (ray, torch and mlflow take seconds to import)."""
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'mergeflow' has no attribute {name!r}")


__all__ = ["__version__", *_API]
