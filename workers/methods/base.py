"""What a merge method is, to the engine: a name, a parameter model, a kernel, and optional stages.

A method is one module (or folder) under workers/methods/ with a `Method` subclass registered by
`@register`. The engine (workers/shard.py for a shard, workflows/merge.py for a run) calls only
what is declared here and never names a method. Long rationale: docs/design.md, "Methods".

Worker side (runs in Ray tasks, or anywhere torch runs):
- `kernel(taus, params, ctx)`: element-wise methods; `taus` is a (T, n) float32 chunk of task
  vectors, one row per task, in task order; `ctx` says which tensor and where in it.
- `tensor_kernel(access, params, ctx)`: methods that need a tensor's structure (an SVD, a
  least-squares solve); it reads the tensor through `access` (whole, or in blocks of rows) and
  yields the merged vector in element order. The default runs `kernel` over chunks.
- `prepare_tensor`: per-tensor statistics before a tensor's chunks (per-tensor TIES thresholds).
- `open_shard`: per-shard state (LOT's statistics headers); `shard_files`: the method's own
  output files for a shard (a compressed bundle).

Driver side (`run` is the engine's Run, see workflows/merge.py):
- `before_map(run)`: statistics passes before the map (TIES thresholds, LOT features, a choice
  of TALL-mask lambdas); results go into `run.globals` (every shard sees them) and `run.saved`
  (journaled: a resumed run skips the pass).
- `after_map(run, results)`: shards to merge again (TIES' majority sign); called until empty.
- `run_files(run, results)`, `manifest(run, results)`, `describe(manifest)`: what the commit
  writes besides the model and what `mergeflow inspect` prints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass(frozen=True)
class NoParams:
    """A method without parameters of its own (besides its scale)."""

    __pydantic_config__ = {"extra": "forbid"}


@dataclass(frozen=True)
class ChunkContext:
    """Where a chunk is, for kernels whose result depends on it (a seeded method draws its random
    numbers from (tensor, offset + i), so any shard or chunk size gives the same bytes)."""

    tensor: str  # the tensor's name
    shape: tuple[int, ...]  # the tensor's shape
    dtype: str  # the tensor's stored dtype (safetensors code: "BF16", ...)
    task_names: tuple[str, ...]
    globals: Mapping[str, Any]  # the run's reduced values (run.globals) plus prepare_tensor's
    offset: int = 0  # element offset of the chunk in the flattened tensor
    shard: Any = None  # what open_shard returned
    device: str = "cpu"

    def at(self, offset: int) -> ChunkContext:
        return dataclasses.replace(self, offset=offset)


@dataclass
class MethodOutput:
    """One chunk's result. The model is theta_0 + scale * delta."""

    delta: torch.Tensor  # (n,) float32
    files: dict[str, torch.Tensor] = field(default_factory=dict)  # bytes for shard_files, by key
    sums: dict[str, Any] = field(default_factory=dict)  # added over chunks and shards: ShardResult.sums
    layer_sums: dict[str, np.ndarray] = field(default_factory=dict)  # added per layer, into stats/layers.json
    tau_sq: np.ndarray | None = None  # (T,) the kernel's own squared norms of the task vectors


@dataclass(frozen=True)
class Redo:
    """Shards after_map wants merged again, and what the progress bar calls that pass."""

    shards: list
    desc: str


class Method:
    """Base class; see the module docstring. Subclasses set the class attributes they need."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams  # a frozen dataclass; pydantic validates it at the config edge
    scale: ClassVar[str] = "alpha"  # the parameter that scales the merged vector into the model
    selectable: ClassVar[tuple[str, ...]] = ()  # other parameters `auto` lets before_map choose
    compresses: ClassVar[bool] = False  # writes a bundle that `mergeflow reconstruct` rebuilds tasks from
    running_sum: ClassVar[bool] = False  # delta is the in-order float32 sum of the task vectors
    whole_tensors: ClassVar[bool] = False  # merges with tensor_kernel, not kernel
    path_params: ClassVar[tuple[str, ...]] = ()  # parameters holding paths, resolved like the config's

    # ------------------------------------------------------------------ the config edge

    def check(self, params, task_names: tuple[str, ...]) -> None:
        """Raise ValueError("key: what is wrong") when params do not fit these tasks."""

    def scale_of(self, params) -> float | str:
        return getattr(params, self.scale)

    def with_scale(self, params, value: float):
        return dataclasses.replace(params, **{self.scale: value})

    def record(self, params, task_names: tuple[str, ...]) -> dict:
        """The manifest's `method` section: the name and every declared parameter."""
        doc = {"name": self.name}
        for f in dataclasses.fields(params):
            doc[f.name.rstrip("_")] = _plain(getattr(params, f.name))
        return doc

    # ------------------------------------------------------------------ worker side

    def kernel(self, taus: torch.Tensor, params, ctx: ChunkContext) -> MethodOutput:
        raise NotImplementedError(f"{self.name}: a method needs a kernel or a tensor_kernel")

    def tensor_kernel(
        self, access, params, ctx: ChunkContext
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, MethodOutput]]:
        """Yield (lo, hi, base, taus, output) over the tensor in element order."""
        for lo, hi, base, taus in access.chunks():
            yield lo, hi, base, taus, self.kernel(taus, params, ctx.at(lo))

    def prepare_tensor(self, access, params, ctx: ChunkContext) -> Mapping[str, Any] | None:
        return None

    def open_shard(self, spec) -> Any:
        return None

    def shard_files(self, spec) -> dict[str, tuple[str, list[tuple[str, str, tuple[int, ...]]]]]:
        """{key: (file relative to the run, [(tensor, dtype, shape)])}: files this shard writes
        besides model/ and delta/, filled from MethodOutput.files[key]."""
        return {}

    # ------------------------------------------------------------------ driver side

    def before_map(self, run) -> None:
        pass

    def after_map(self, run, results: dict) -> Redo | None:
        """results: {shard index: ShardResult} of the map so far."""
        return None

    def can_reuse(self, recorded, spec) -> bool:
        """Whether a journaled shard result stands for this spec (a resumed run skips it)."""
        return _plain(dict(recorded.globals_used)) == _plain(dict(spec.globals))

    def memory(self, run) -> int | None:
        """Bytes a shard worker needs when more than the engine's O(T x chunk) estimate."""
        return None

    def run_files(self, run, results: list) -> dict[str, bytes]:
        return {}

    def manifest(self, run, results: list) -> dict:
        return {}

    def describe(self, manifest: dict) -> list[str]:
        """Lines for `mergeflow inspect` after the method line."""
        return []

    # ------------------------------------------------------------------ reconstruct (methods that compress)

    def rebuild_specs(
        self,
        run: str,
        manifest: dict,
        task: str,
        parts: dict,
        base,
        output: str,
        options,
        chunk_elems: int,
        model_order,
    ) -> list:
        """One spec per model part to rebuild task `task` from the run's bundle; each has `output`
        (a file URI) and `base` (the part's tensors, in order)."""
        raise NotImplementedError(f"{self.name} keeps no bundle to rebuild tasks from")

    rebuild_part = None  # fn(spec) -> (sha256, bytes written), run in Ray tasks

    def describe_params(self, method: dict) -> str:
        """The method line's parameters, from the manifest's `method` section."""
        return ", ".join(f"{k} {_short(v)}" for k, v in method.items() if k != "name")


# --------------------------------------------------------------- what methods share


def running_sum(rows: torch.Tensor) -> torch.Tensor:
    """Sum over tasks in a fixed order (t = 1..T), so results do not depend on chunking or backend."""
    acc = rows[0].clone()
    for t in range(1, rows.shape[0]):
        acc += rows[t]
    return acc


def check_scale(key: str, value) -> None:
    if value != "auto" and (not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ValueError(f"{key}: must be a finite number or auto, got {value!r}")


def check_fraction(key: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{key}: must be in (0, 1], got {value}")


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
