"""One shard of whole layers: read its tensors from the base and every task by byte range, run
the method over them, write the shard's own output files.

`merge_shard(spec)` is the notebook-sized entry point; Ray only wraps it. The spec carries the
method object itself, so nothing here knows any method: the method's kernel (or tensor kernel)
yields merged chunks, and this writes model/ (theta_0 + scale * delta), delta/ (the unscaled
float32 delta) and the method's own files, and adds up what the method reports.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mergeflow.infra.storage import StorageOptions, join
from mergeflow.workers.chunking import GPU_CHUNK
from mergeflow.workers.dtypes import TORCH_DTYPES, is_float
from mergeflow.workers.layers import layer_of
from mergeflow.workers.methods.base import ChunkContext, Method
from mergeflow.workers.reading import (
    ChunkBuffers,
    ShardReader,
    TensorAccess,
    check_finite,
    chunk_ranges,
    copy_exact,
    tau_sq_sums,
)
from mergeflow.workers.safetensors_io import StreamingWriter, TensorInfo, read_header


@dataclass(frozen=True)
class TensorJob:
    """One tensor: where it lives in the base and in each task checkpoint."""

    name: str
    base: TensorInfo
    tasks: tuple[TensorInfo, ...]

    @property
    def dtype(self) -> str:
        return self.base.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def numel(self) -> int:
        return self.base.numel

    @property
    def is_float(self) -> bool:
        return is_float(self.base.dtype)


@dataclass(frozen=True)
class ShardSpec:
    index: int  # 0-based
    count: int  # shards in the plan
    tensors: tuple[TensorJob, ...]
    task_names: tuple[str, ...]
    method: Method
    params: Any  # the method's parameters (method.Params)
    output: str  # run root URI
    chunk_elems: int = GPU_CHUNK
    device: str = "cpu"
    storage: StorageOptions = StorageOptions()
    globals: Mapping[str, Any] = field(default_factory=dict)  # what the method's driver-side passes reduced
    write_model: bool = True  # model/: theta_0 + scale * delta (off while the scale is selected)
    write_delta: bool = False  # delta/: the unscaled merged vector in float32 (scale selection, re-merging)

    @property
    def part(self) -> str:
        return f"{self.index + 1:05d}-of-{self.count:05d}"

    @property
    def scale(self) -> float:
        return float(self.method.scale_of(self.params))

    def with_globals(self, **values) -> ShardSpec:
        return dataclasses.replace(self, globals={**self.globals, **values})

    def model_file(self) -> str:
        return f"model/model-{self.part}.safetensors"

    def delta_file(self) -> str:
        return f"delta/delta-{self.part}.safetensors"

    @property
    def nbytes(self) -> int:
        return sum(j.base.nbytes + sum(t.nbytes for t in j.tasks) for j in self.tensors)


@dataclass
class LayerStats:
    """Per-layer diagnostics, additive across chunks: squared task-vector norms, plus whatever a
    method adds per layer (masks: "kept" per task, "count_hist" of how many tasks keep a weight)."""

    numel: int
    tau_sq: np.ndarray  # (T,) sum of tau_t^2
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, other: LayerStats) -> None:
        self.numel += other.numel
        self.tau_sq = self.tau_sq + other.tau_sq
        for key, value in other.sums.items():
            self.sums[key] = value if key not in self.sums else self.sums[key] + value


@dataclass
class ShardResult:
    index: int
    outputs: dict[str, tuple[str, int]]  # relative path -> (sha256, bytes)
    layers: dict[str, LayerStats]
    sums: dict[str, Any] = field(default_factory=dict)  # the method's per-shard reductions (MethodOutput.sums)
    globals_used: dict[str, Any] = field(default_factory=dict)  # the spec's globals (resume compares them)
    bytes_read: int = 0
    seconds: float = 0.0
    node: str = ""  # where it was computed (Ray node id and IP), filled in by the Ray wrapper
    node_ip: str = ""


def add_sums(into: dict[str, Any], sums: Mapping[str, Any]) -> None:
    for key, value in sums.items():
        into[key] = value if key not in into else into[key] + value


# --------------------------------------------------------------------------- writers


def open_writers(spec: ShardSpec, stack: ExitStack) -> dict[str, StreamingWriter]:
    """Writers by key: "model" and "delta" as the spec asks, then the method's own files
    (each writer's `rel` is its path in the run)."""
    files = {}
    if spec.write_model:
        files["model"] = (spec.model_file(), [(j.name, j.dtype, j.shape) for j in spec.tensors])
    if spec.write_delta:
        files["delta"] = (spec.delta_file(), [(j.name, "F32", j.shape) for j in spec.tensors if j.is_float])
    files |= spec.method.shard_files(spec)
    writers = {}
    for key, (rel, entries) in files.items():
        w = StreamingWriter(join(spec.output, rel), entries, spec.storage, rel=rel)
        writers[key] = w
        stack.callback(w.abort)  # popped on success; on any error the temp file goes
    return writers


def commit_writers(
    writers: dict[str, StreamingWriter], cleanup: ExitStack, reader: ShardReader, result: ShardResult
) -> None:
    """Publish every output file of a shard pass and record its hash; the temp-file cleanup is
    dropped only once all of them are committed."""
    for w in writers.values():
        result.outputs[w.rel] = (w.commit(), w.bytes_written)
    cleanup.pop_all()
    result.bytes_read = reader.bytes_read


# ------------------------------------------------------------------------------ merge


def merge_shard(spec: ShardSpec) -> ShardResult:
    """Merge one shard and write its files. Returns small stats only."""
    t0 = time.perf_counter()
    t = len(spec.task_names)
    result = ShardResult(spec.index, {}, {}, globals_used=dict(spec.globals))
    with ExitStack() as cleanup, ExitStack() as files:
        reader = ShardReader.for_spec(spec, files)
        buffers = ChunkBuffers(spec)
        shard_state = spec.method.open_shard(spec)
        writers = open_writers(spec, cleanup)
        model, delta_file = writers.get("model"), writers.get("delta")
        for job in spec.tensors:
            if not job.is_float:
                copy_exact(spec, job, reader, model)
                continue
            stats = LayerStats(0, np.zeros(t))
            out_dtype = TORCH_DTYPES[job.dtype]
            for lo, hi, base, taus, out, sq in merged_chunks(TensorAccess(spec, job, reader, buffers), shard_state):
                if model is not None:
                    model.write(job.name, to_bytes(apply_scale(base, out.delta, spec.scale, out_dtype)))
                if delta_file is not None:
                    delta_file.write(job.name, to_bytes(out.delta))
                for key, data in out.files.items():
                    writers[key].write(job.name, to_bytes(data))
                add_sums(result.sums, out.sums)
                stats.add(LayerStats(hi - lo, sq, dict(out.layer_sums)))
            result.layers.setdefault(layer_of(job.name), LayerStats(0, np.zeros(t))).add(stats)
        commit_writers(writers, cleanup, reader, result)
    result.seconds = time.perf_counter() - t0
    return result


def merged_chunks(access: TensorAccess, shard_state=None):
    """The engine's loop over one float tensor: (lo, hi, base, taus, output, tau_sq) in element
    order, from the method's kernel over chunks or from its tensor kernel, after its prepare_tensor.
    The squared norms are taken before the kernel sees the chunk, so a NaN or Inf in the inputs is
    reported as such rather than as whatever the kernel makes of it."""
    spec, job = access.spec, access.job
    method, params = spec.method, spec.params
    ctx = ChunkContext(
        job.name, job.shape, job.dtype, spec.task_names, spec.globals, shard=shard_state, device=spec.device
    )
    extra = method.prepare_tensor(access, params, ctx)
    if extra:
        ctx = dataclasses.replace(ctx, globals={**spec.globals, **extra})
    if not method.whole_tensors:
        for lo, hi, base, taus in access.chunks():
            sq = norms(access, taus)
            yield lo, hi, base, taus, method.kernel(taus, params, ctx.at(lo)), sq
        return
    for lo, hi, base, taus, out in method.tensor_kernel(access, params, ctx):
        yield lo, hi, base, taus, out, out.tau_sq if out.tau_sq is not None else norms(access, taus)


def norms(access: TensorAccess, taus: torch.Tensor) -> np.ndarray:
    """Per-task sums of tau^2 of a chunk; the one-line error when an input holds NaN or Inf."""
    sq = tau_sq_sums(taus)
    if sq is None:
        access.check_finite()  # raises when an input holds NaN or Inf
        sq = (taus.double() ** 2).sum(dim=1)  # finite inputs whose squares overflow float32
    return sq.cpu().numpy()


def apply_scale(base: torch.Tensor, delta: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """theta_0 + scale * delta in float32, cast to the stored dtype: the one formula every path uses.
    scale * delta first, then + base: two roundings as the reference has them (no fused multiply-add),
    with one float32 temporary instead of two."""
    return torch.mul(delta, scale).add_(base).to(dtype)


def to_bytes(x: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor, without a copy on the CPU (the view keeps the
    tensor alive); bf16 has no numpy dtype, so go through an int16 view."""
    x = x.contiguous().cpu().reshape(-1)
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return memoryview(x.numpy()).cast("B")


def apply_shard(spec: ShardSpec, scale: float) -> ShardResult:
    """Write this shard's model file from the base and its delta file: theta_0 + scale * delta.

    The second half of a merge whose scale was chosen after the delta was written; it reads the base
    and the float32 delta only, never the task checkpoints, and gives the bytes a direct merge with
    that scale would have written."""
    t0 = time.perf_counter()
    delta = read_header(join(spec.output, spec.delta_file()), spec.storage).tensors
    result = ShardResult(spec.index, {}, {}, globals_used=dict(spec.globals))
    with ExitStack() as cleanup, ExitStack() as files:
        reader = ShardReader.for_spec(spec, files)
        writer = StreamingWriter(
            join(spec.output, spec.model_file()), [(j.name, j.dtype, j.shape) for j in spec.tensors], spec.storage
        )
        cleanup.callback(writer.abort)
        for job in spec.tensors:
            for lo, hi in chunk_ranges(job.numel, spec.chunk_elems):
                base = reader.elements(job.base, lo, hi)
                if job.is_float:
                    d = reader.elements(delta[job.name], lo, hi)
                    base = apply_scale(base.to(spec.device).float(), d.to(spec.device), scale, TORCH_DTYPES[job.dtype])
                writer.write(job.name, to_bytes(base))
        result.outputs[spec.model_file()] = (writer.commit(), writer.bytes_written)
        cleanup.pop_all()
        result.bytes_read = reader.bytes_read
    result.seconds = time.perf_counter() - t0
    return result


__all__ = [
    "LayerStats",
    "ShardResult",
    "ShardSpec",
    "TensorJob",
    "apply_shard",
    "apply_scale",
    "check_finite",
    "merge_shard",
    "merged_chunks",
    "to_bytes",
]
