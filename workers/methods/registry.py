"""The method registry.

A method is one decorated function `(taus, params, globals) -> MethodOutput` where
`taus` is a (T, n) float32 chunk of task vectors (one row per task, on any
device). It knows nothing of files, shards or Ray. The merged model is
`theta_0 + params.alpha * output.delta`; methods that compress also return the
unscaled tau_MTL and one boolean mask row per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mergeflow.errors import ConfigError


@dataclass(frozen=True)
class MethodParams:
    """Validated, resolved parameters (the YAML edge builds these)."""

    name: str
    alpha: float
    density: float = 0.2  # TIES trim: keep this fraction of |tau_t|
    scope: str = "global"  # TIES trim scope: "global" (paper) or "tensor"
    merge: str = "mean"  # TIES disjoint merge: "mean" or "sum"
    lambdas: tuple[float, ...] = ()  # TALL mask lambda per task, in task order
    base_merge: str = "task_arithmetic"  # what tau_MTL is for tall_masks / consensus
    k: int = 2  # consensus: keep weights that at least k task masks keep
    store_dtype: str = "base"  # dtype of tau_MTL in compressed/: "base" or "float32"
    exemplars: int = 64  # LOT: exemplars per task for the feature statistics
    exemplar_seed: int = 0  # LOT: which exemplars, when more are available
    model: str = ""  # LOT: how to build each task's model: "suite", "hf" or "module:function"
    exemplar_files: tuple[str, ...] = ()  # LOT with model "hf": token-id file per task, in task order

    @property
    def uses_ties(self) -> bool:
        return self.name == "ties" or (get_method(self.name).compresses and self.base_merge == "ties")

    @property
    def ties_merge(self) -> str:
        """TIES feeding TALL masks / consensus sums (paper); plain TIES uses the configured merge."""
        return self.merge if self.name == "ties" else "sum"


@dataclass(frozen=True)
class ChunkGlobals:
    """Numbers that need the whole model (or tensor) and are reduced before the apply pass."""

    thresholds: torch.Tensor | None = None  # (T,) TIES trim threshold per task, for this chunk's scope
    majority: int = 1  # TIES: sign used where the elected sign is 0 (see workflows/reduce.py)


@dataclass
class MethodOutput:
    delta: torch.Tensor  # (n,) float32; model = theta_0 + alpha * delta
    tau_mtl: torch.Tensor | None = None  # (n,) unscaled vector stored in compressed/
    masks: torch.Tensor | None = None  # (T, n) bool
    sign_sum: int = 0  # TIES: sum of elected signs (majority-sign reduction)
    ambiguous: int = 0  # TIES: coordinates whose result depended on the majority sign
    extras: dict = field(default_factory=dict)


MethodFn = Callable[[torch.Tensor, MethodParams, ChunkGlobals], MethodOutput]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn | None  # None for methods that are not element-wise (kind "features")
    compresses: bool  # writes compressed/: tau_MTL plus per-task bit-packed masks
    summary: str
    # "chunk": fn over float32 chunks of task vectors (workers/shard.py merge_shard).
    # "features": needs per-task feature statistics and solves whole tensors in its own shard
    # worker (LOT: workers/lot/shard.py lot_shard after workflows/lot_stage.py's feature pass).
    kind: str = "chunk"


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, compresses: bool = False):
    """Register `fn` as merge method `name`; its docstring's first line is its summary."""

    def register(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = MergeMethod(name, fn, compresses, summary)
        return fn

    return register


def register_features_method(name: str, summary: str) -> None:
    """Register a method whose shard worker is not element-wise (see MergeMethod.kind)."""
    if name in METHODS:
        raise ValueError(f"merge method {name!r} registered twice")
    METHODS[name] = MergeMethod(name, None, False, summary, kind="features")


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name: unknown merge method {name!r}; choose one of {sorted(METHODS)}") from None


def running_sum(rows: torch.Tensor) -> torch.Tensor:
    """Sum over tasks in a fixed order (t = 1..T), so results do not depend on chunking or backend."""
    acc = rows[0].clone()
    for t in range(1, rows.shape[0]):
        acc += rows[t]
    return acc
