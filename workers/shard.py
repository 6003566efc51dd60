"""Everything one shard of whole layers needs: read its tensors from the base and every
task by byte range, compute in float32 chunks, write its own output files.

`merge_shard(spec)` is the notebook-sized entry point; Ray only wraps it. Memory is
O(T x chunk): no tensor is ever held whole unless it is smaller than a chunk.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from mergeflow.infra.storage import RangeReader, StorageOptions, join, storage_for
from mergeflow.workers import kth_value
from mergeflow.workers.bits import pack_rows, row_counts
from mergeflow.workers.dtypes import TORCH_DTYPES, is_float, itemsize
from mergeflow.errors import CheckpointError
from mergeflow.workers.layers import layer_of
from mergeflow.workers.methods import ChunkGlobals, MethodParams, get_method
from mergeflow.workers.methods.tall_masks import mask_counts, task_masks
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
    params: MethodParams
    output: str  # run root URI
    chunk_elems: int = 1 << 22
    device: str = "cpu"
    storage: StorageOptions = StorageOptions()
    thresholds: tuple[float, ...] | None = None  # global-scope TIES thresholds, one per task
    majority: int = 1
    count_zeros: bool = False  # count each task's exact zeros of tau (to check thresholds of 0 guessed from a sample)
    write_model: bool = True  # model/: theta_0 + alpha * delta (off while alpha is selected)
    write_delta: bool = False  # delta/: the unscaled merged vector in float32 (alpha selection, re-merging)
    mask_grid: tuple[float, ...] = ()  # TALL lambda candidates: one mask set per value instead of params.lambdas

    @property
    def part(self) -> str:
        return f"{self.index + 1:05d}-of-{self.count:05d}"

    def model_file(self) -> str:
        return f"model/model-{self.part}.safetensors"

    def tau_file(self) -> str:
        return f"compressed/tau_mtl-{self.part}.safetensors"

    def delta_file(self) -> str:
        return f"delta/delta-{self.part}.safetensors"

    def mask_file(self, task: str) -> str:
        return f"compressed/masks/{task}/masks-{self.part}.safetensors"

    def grid_mask_file(self, i: int, task: str) -> str:
        return f"compressed/mask_grid/{i}/{task}/masks-{self.part}.safetensors"

    @property
    def nbytes(self) -> int:
        return sum(j.base.nbytes + sum(t.nbytes for t in j.tasks) for j in self.tensors)


@dataclass
class LayerStats:
    """Per-layer diagnostics, additive across chunks."""

    numel: int
    tau_sq: np.ndarray  # (T,) sum of tau_t^2
    kept: np.ndarray | None = None  # (T,) weights each task's mask keeps
    count_hist: np.ndarray | None = None  # (T+1,) weights kept by exactly c tasks

    def add(self, other: "LayerStats") -> None:
        self.numel += other.numel
        self.tau_sq = self.tau_sq + other.tau_sq
        if other.kept is not None:
            self.kept = other.kept if self.kept is None else self.kept + other.kept
            self.count_hist = other.count_hist if self.count_hist is None else self.count_hist + other.count_hist


@dataclass
class ShardResult:
    index: int
    outputs: dict[str, tuple[str, int]]  # relative path -> (sha256, bytes)
    layers: dict[str, LayerStats]
    sign_sum: int = 0
    ambiguous: int = 0
    majority_used: int = 1
    thresholds_used: tuple[float, ...] | None = None  # the spec's global TIES thresholds (resume checks them)
    zeros: tuple[int, ...] | None = None  # per task, values of tau exactly 0 (when the spec asked)
    bytes_read: int = 0
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)
    node: str = ""  # where it was computed (Ray node id and IP), filled in by the Ray wrapper
    node_ip: str = ""


# ------------------------------------------------------------------------- reading


class ShardReader:
    """Open range readers for every file a shard touches; counts bytes read."""

    def __init__(self, storage: StorageOptions, stack: ExitStack, pinned: bool = False):
        self._storage = storage
        self._readers: dict[str, RangeReader] = {}
        self._stack = stack
        # For a CUDA shard the scratch bytes go straight to the device: from page-locked memory
        # that copy runs at the bus's speed, from ordinary memory the driver first copies through
        # a pinned bounce buffer of its own (54 vs 6.8 GB/s measured on an H200 host).
        self._pinned = pinned
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self.bytes_read = 0

    @classmethod
    def for_spec(cls, spec: "ShardSpec", stack: ExitStack) -> "ShardReader":
        return cls(spec.storage, stack, pinned=PIN_CUDA_READS and torch.device(spec.device).type == "cuda")

    def _reader(self, info: TensorInfo) -> RangeReader:
        reader = self._readers.get(info.file)
        if reader is None:
            reader = storage_for(info.file, self._storage).open_reader(info.file)
            self._stack.callback(reader.close)
            self._readers[info.file] = reader
        return reader

    def elements(self, info: TensorInfo, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened tensor, in its stored dtype (a tensor of its own)."""
        size = itemsize(info.dtype)
        buf = self._reader(info).read(info.start + lo * size, info.start + hi * size)
        self.bytes_read += len(buf)
        if not buf:
            return torch.empty(0, dtype=TORCH_DTYPES[info.dtype])
        return torch.frombuffer(buf, dtype=TORCH_DTYPES[info.dtype])

    def scratch_elements(self, info: TensorInfo, lo: int, hi: int) -> torch.Tensor:
        """Like elements(), but read into one buffer reused by the next call: for bytes that are
        converted right away. Saves an allocation, its zero-fill and its page faults per read."""
        size = itemsize(info.dtype)
        nbytes = (hi - lo) * size
        if nbytes == 0:
            return torch.empty(0, dtype=TORCH_DTYPES[info.dtype])
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pinned)
        scratch = self._scratch[:nbytes]
        view = memoryview(scratch.numpy())
        reader = self._reader(info)
        read_into = getattr(reader, "read_into", None)
        if read_into is not None:
            read_into(info.start + lo * size, view)
        else:
            view[:] = reader.read(info.start + lo * size, info.start + hi * size)
        self.bytes_read += nbytes
        return scratch.view(TORCH_DTYPES[info.dtype])


# Stage CUDA shards' reads in page-locked memory (bench/gpu_stages.py --staging turns it off to compare).
PIN_CUDA_READS = True


def chunk_ranges(numel: int, chunk: int):
    for lo in range(0, numel, chunk):
        yield lo, min(numel, lo + chunk)


def _finite(x: torch.Tensor, who: str, job: TensorJob) -> None:
    if not bool(torch.isfinite(x).all()):
        raise CheckpointError(f"{who}: tensor {job.name!r} contains NaN or Inf values")


def check_finite(spec: ShardSpec, job: TensorJob, reader: ShardReader) -> None:
    """Raise the one-line error naming the checkpoint and tensor that hold a NaN or Inf.

    The hot path does not test every row: a NaN or Inf anywhere in the base or a task makes
    some tau_t non-finite, which shows in a reduction it computes anyway (the sum of squares,
    the TIES histograms' top bins). Only then is the tensor read again, here, to say where."""
    for lo, hi in chunk_ranges(job.numel, spec.chunk_elems):
        _finite(reader.elements(job.base, lo, hi), "base", job)
        for name, info in zip(spec.task_names, job.tasks):
            _finite(reader.elements(info, lo, hi), f"task {name!r}", job)


class ChunkBuffers:
    """Float32 work buffers reused across the chunks and tensors of a shard: a (T, chunk)
    block of task-vector rows and one base row. Allocating them per chunk would cost a
    fresh mmap, zeroed pages and a torch.stack copy every time."""

    def __init__(self, spec: ShardSpec):
        self._spec = spec
        self._taus: torch.Tensor | None = None
        self._base: torch.Tensor | None = None

    def get(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = len(self._spec.task_names)
        if self._taus is None or self._base.numel() < n:
            device = torch.device(self._spec.device)
            size = max(n, min(self._spec.chunk_elems, max((j.numel for j in self._spec.tensors), default=n)))
            self._taus = torch.empty(t * size, dtype=torch.float32, device=device)
            self._base = torch.empty(size, dtype=torch.float32, device=device)
        # rows of one contiguous (T, n) block: methods may view or reshape it freely
        return self._base[:n], self._taus[: t * n].view(t, n)


def task_chunks(spec: ShardSpec, job: TensorJob, reader: ShardReader, buffers: ChunkBuffers | None = None,
                ranges=None):
    """Yield (lo, hi, base_f32, taus) over a float tensor (or the element ranges given, each at
    most a chunk long), taus = (T, n) float32.

    Both are views of reused buffers, overwritten by the next chunk: consume them before
    asking for the next one. Values are not checked for NaN/Inf here (see check_finite)."""
    buffers = buffers or ChunkBuffers(spec)
    for lo, hi in ranges if ranges is not None else chunk_ranges(job.numel, spec.chunk_elems):
        base, taus = buffers.get(hi - lo)
        base.copy_(reader.scratch_elements(job.base, lo, hi))  # exact widening to float32, on the device
        for row, info in zip(taus, job.tasks):
            row.copy_(reader.scratch_elements(info, lo, hi))
            row.sub_(base)
        yield lo, hi, base, taus


def copy_exact(spec: ShardSpec, job: TensorJob, reader: ShardReader, writer: StreamingWriter | None) -> None:
    """Integer and bool tensors are copied from the base and must agree everywhere (checked even
    when this pass writes no model)."""
    for lo, hi in chunk_ranges(job.numel, spec.chunk_elems):
        base = reader.elements(job.base, lo, hi)
        for name, info in zip(spec.task_names, job.tasks):
            if info.dtype != job.dtype or not torch.equal(reader.elements(info, lo, hi), base):
                raise CheckpointError(
                    f"task {name!r}: non-float tensor {job.name!r} differs from the base "
                    "(integer/bool tensors must be identical across checkpoints)"
                )
        if writer is not None:
            writer.write(job.name, base.numpy().tobytes())


NORM_BLOCK = 1024  # float32 partial sums over this many squares are accurate to ~1e-7


def tau_sq_sums(taus: torch.Tensor) -> torch.Tensor | None:
    """Per-task sum of tau_t^2 over the chunk (float64), or None when it is not finite: a NaN or
    Inf in the inputs (or squares past float32's range, left to the caller).

    Norms of blocks of NORM_BLOCK elements in float32, squared and added in float64: one read of
    the chunk, no temporary copy of it, and a relative error near 1e-7 where one float32 norm over
    the whole row drifts to 1e-4 (and float64 conversion of the chunk costs ~10x more). Squares
    below float32's range (|tau| < ~1e-19) count as 0: these are diagnostics, not merge inputs."""
    t, n = taus.shape
    whole = n - n % NORM_BLOCK
    sq = torch.zeros(t, dtype=torch.float64, device=taus.device)
    if whole:
        blocks = torch.linalg.vector_norm(taus[:, :whole].reshape(t, -1, NORM_BLOCK), dim=2)
        sq += (blocks.double() ** 2).sum(dim=1)
    if whole < n:
        sq += (taus[:, whole:].double() ** 2).sum(dim=1)
    if not bool(torch.isfinite(sq).all()):
        return None
    return sq


# ----------------------------------------------------------------- TIES statistics


def _float_jobs(spec: ShardSpec):
    return [j for j in spec.tensors if j.is_float]


def _phase(name: str) -> int:
    return zlib.crc32(name.encode())  # a fixed, name-dependent offset for each tensor's sample blocks


def _sample(spec: ShardSpec, job: TensorJob, reader: ShardReader, buffers: ChunkBuffers, sample: kth_value.Sample) -> None:
    for _, _, _, taus in task_chunks(spec, job, reader, buffers, kth_value.sample_ranges(job.numel, _phase(job.name))):
        sample.add(taus)


def _count(spec: ShardSpec, job: TensorJob, reader: ShardReader, buffers: ChunkBuffers, plan: kth_value.Plan,
           counts: list[torch.Tensor]) -> None:
    """Add one tensor to a threshold pass's counts. A NaN or Inf shows as the largest bit
    pattern, so the finite check costs nothing unless one is there."""
    if kth_value.zeros_only(plan) and all(i.dtype == job.dtype for i in job.tasks):
        _count_zeros(spec, job, reader, plan, counts)
        return
    top = 0
    for _, _, _, taus in task_chunks(spec, job, reader, buffers):
        top = max(top, kth_value.add_counts(counts, taus, plan))
    if top >= kth_value.NONFINITE_HIGH << 16:
        check_finite(spec, job, reader)  # raises, naming the input; else a finite difference overflowed


# Integer views of the float types, to compare stored values bit by bit.
_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}


def _count_zeros(spec: ShardSpec, job: TensorJob, reader: ShardReader, plan: kth_value.Plan,
                 counts: list[torch.Tensor]) -> None:
    """The zeros-only pass in the stored dtype: tau_t is 0 exactly where the task's value equals
    the base's (widening is exact, and IEEE subtraction of two different floats is never 0).

    Equal floats have equal bits except +0.0 and -0.0, so the pass counts the nonzero xors of
    the bit patterns (~4x faster than a float comparison). Where the base holds a signed zero
    (rare) the chunk is compared as floats instead, as +0.0 == -0.0. A NaN counts as 0 when both
    sides hold the same NaN bits; the apply pass names any NaN or Inf input."""
    device = torch.device(spec.device)
    stored = TORCH_DTYPES[job.dtype]
    as_int = _SAME_WIDTH_INT[stored]
    for lo, hi in chunk_ranges(job.numel, spec.chunk_elems):
        base = reader.elements(job.base, lo, hi).to(device)
        diff = torch.empty(hi - lo, dtype=as_int, device=device)
        signed_zero = int(torch.count_nonzero(torch.bitwise_left_shift(base.view(as_int), 1, out=diff))) < hi - lo
        for t, (c, info) in enumerate(zip(plan, job.tasks)):
            if c.kind == "skip":
                continue
            value = reader.scratch_elements(info, lo, hi).to(device)
            if signed_zero:
                zeros = int(torch.count_nonzero(torch.eq(value, base)))
            else:
                torch.bitwise_xor(value.view(as_int), base.view(as_int), out=diff)
                zeros = (hi - lo) - int(torch.count_nonzero(diff))
            counts[t][1] += zeros
            counts[t][2] += (hi - lo) - zeros


def shard_ties_sample(spec: ShardSpec) -> tuple[kth_value.Sample, int]:
    """Global TIES thresholds, first step: |tau| statistics of a 1/32 sample of this shard, and
    how many values the shard holds per task."""
    sample = kth_value.Sample.empty(len(spec.task_names))
    with ExitStack() as stack:
        reader = ShardReader.for_spec(spec, stack)
        buffers = ChunkBuffers(spec)
        for job in _float_jobs(spec):
            _sample(spec, job, reader, buffers, sample)
    return sample, sum(j.numel for j in _float_jobs(spec))


def shard_counts(spec: ShardSpec, plan: kth_value.Plan) -> list[tuple[np.ndarray, np.ndarray]]:
    """One counting pass of the global TIES thresholds over this shard (see kth_value.select)."""
    counts = kth_value.new_counts(plan, spec.device)
    with ExitStack() as stack:
        reader = ShardReader.for_spec(spec, stack)
        buffers = ChunkBuffers(spec)
        for job in _float_jobs(spec):
            _count(spec, job, reader, buffers, plan, counts)
    return kth_value.compact([c.cpu().numpy() for c in counts])


def tensor_thresholds(spec: ShardSpec, job: TensorJob, reader: ShardReader, buffers: ChunkBuffers | None = None) -> torch.Tensor:
    """Per-tensor TIES thresholds (scope "tensor"): the global selection's steps over one tensor."""
    t = len(spec.task_names)
    buffers = buffers or ChunkBuffers(spec)
    sample = kth_value.Sample.empty(t)
    _sample(spec, job, reader, buffers, sample)

    def run_pass(plan: kth_value.Plan, _: int) -> list[np.ndarray]:
        counts = kth_value.new_counts(plan, spec.device)
        _count(spec, job, reader, buffers, plan, counts)
        return [c.cpu().numpy() for c in counts]

    k = np.full(t, kth_value.kth_rank(job.numel, spec.params.density), dtype=np.int64)
    return torch.from_numpy(kth_value.select(run_pass, sample, job.numel, k))


# --------------------------------------------------------------------- apply pass


def _open_writers(spec: ShardSpec, compresses: bool, stack: ExitStack) -> dict[str, StreamingWriter]:
    everything = [(j.name, j.dtype, j.shape) for j in spec.tensors]
    floats = [j for j in spec.tensors if j.is_float]
    files = {spec.model_file(): everything} if spec.write_model else {}
    if spec.write_delta:
        files[spec.delta_file()] = [(j.name, "F32", j.shape) for j in floats]
    if compresses:
        store = lambda j: "F32" if spec.params.store_dtype == "float32" else j.dtype  # noqa: E731
        files[spec.tau_file()] = [(j.name, store(j), j.shape) for j in floats]
        packed = [(j.name, "U8", (math.ceil(j.numel / 8),)) for j in floats]
        for task in spec.task_names:
            if spec.mask_grid:
                files.update({spec.grid_mask_file(i, task): packed for i in range(len(spec.mask_grid))})
            else:
                files[spec.mask_file(task)] = packed
    writers = {}
    for rel, entries in files.items():
        w = StreamingWriter(join(spec.output, rel), entries, spec.storage)
        writers[rel] = w
        stack.callback(w.abort)  # popped on success; on any error the temp file goes
    return writers


def merge_shard(spec: ShardSpec) -> ShardResult:
    """Merge one shard and write its model (and compressed) files. Returns small stats only."""
    t0 = time.perf_counter()
    method = get_method(spec.params.name)
    t = len(spec.task_names)
    result = ShardResult(spec.index, {}, {}, majority_used=spec.majority, thresholds_used=spec.thresholds)
    global_thr = torch.tensor(spec.thresholds, dtype=torch.float32) if spec.thresholds is not None else None
    zeros = np.zeros(t, dtype=np.int64)
    with ExitStack() as cleanup, ExitStack() as files:
        reader = ShardReader.for_spec(spec, files)
        buffers = ChunkBuffers(spec)
        writers = _open_writers(spec, method.compresses, cleanup)
        model = writers.get(spec.model_file())
        delta_file = writers.get(spec.delta_file())
        for job in spec.tensors:
            if not job.is_float:
                copy_exact(spec, job, reader, model)
                continue
            thresholds = global_thr
            if spec.params.uses_ties and spec.params.scope == "tensor":
                thresholds = tensor_thresholds(spec, job, reader, buffers)
            g = ChunkGlobals(thresholds=thresholds, majority=spec.majority)
            stats = LayerStats(0, np.zeros(t))
            out_dtype = TORCH_DTYPES[job.dtype]
            for lo, hi, base, taus in task_chunks(spec, job, reader, buffers):
                sq = tau_sq_sums(taus)
                if sq is None:
                    check_finite(spec, job, reader)  # raises when an input holds NaN or Inf
                    sq = (taus.double() ** 2).sum(dim=1)  # finite inputs whose squares overflow float32
                if spec.count_zeros:
                    zeros += (hi - lo) - kth_value.nonzero_counts(taus)
                out = method.fn(taus, spec.params, g)
                if model is not None:
                    model.write(job.name, _bytes(apply_alpha(base, out.delta, spec.params.alpha, out_dtype)))
                if delta_file is not None:
                    delta_file.write(job.name, _bytes(out.delta))
                result.sign_sum += out.sign_sum
                result.ambiguous += out.ambiguous
                chunk = LayerStats(hi - lo, sq.cpu().numpy())
                if method.compresses:
                    tau_file = writers[spec.tau_file()]
                    store = torch.float32 if spec.params.store_dtype == "float32" else out_dtype
                    tau_file.write(job.name, _bytes(out.tau_mtl.to(store)))
                    packed = pack_rows(out.masks).cpu()
                    if spec.mask_grid:
                        for i, lam in enumerate(spec.mask_grid):
                            grid = pack_rows(task_masks(taus, out.tau_mtl, torch.full((t,), lam, device=taus.device))).cpu()
                            for row, task in enumerate(spec.task_names):
                                writers[spec.grid_mask_file(i, task)].write(job.name, _bytes(grid[row]))
                    else:
                        for row, task in enumerate(spec.task_names):
                            writers[spec.mask_file(task)].write(job.name, _bytes(packed[row]))
                    chunk.kept = row_counts(out.masks, packed)
                    chunk.count_hist = (
                        torch.bincount(mask_counts(out.masks), minlength=t + 1).cpu().numpy().astype(np.int64)
                    )
                stats.add(chunk)
            result.layers.setdefault(layer_of(job.name), LayerStats(0, np.zeros(t))).add(stats)
        commit_writers(writers, cleanup, reader, result)
    if spec.count_zeros:
        result.zeros = tuple(int(z) for z in zeros)
    result.seconds = time.perf_counter() - t0
    return result


def commit_writers(writers: dict[str, StreamingWriter], cleanup: ExitStack, reader: ShardReader,
                   result: ShardResult) -> None:
    """Publish every output file of a shard pass and record its hash; the temp-file cleanup is
    dropped only once all of them are committed."""
    for rel, w in writers.items():
        result.outputs[rel] = (w.commit(), w.bytes_written)
    cleanup.pop_all()
    result.bytes_read = reader.bytes_read


def apply_alpha(base: torch.Tensor, delta: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """theta_0 + alpha * delta in float32, cast to the stored dtype: the one formula every path uses.
    alpha * delta first, then + base: two roundings as the reference has them (no fused multiply-add),
    with one float32 temporary instead of two."""
    return torch.mul(delta, alpha).add_(base).to(dtype)


def _bytes(x: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor, without a copy on the CPU (the view keeps the
    tensor alive); bf16 has no numpy dtype, so go through an int16 view."""
    x = x.contiguous().cpu().reshape(-1)
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return memoryview(x.numpy()).cast("B")


def apply_shard(spec: ShardSpec, alpha: float) -> ShardResult:
    """Write this shard's model file from the base and its delta file: theta_0 + alpha * delta.

    The second half of a merge whose alpha was chosen after the delta was written; it reads the base
    and the float32 delta only, never the task checkpoints, and gives the bytes a direct merge with
    that alpha would have written."""
    t0 = time.perf_counter()
    delta = read_header(join(spec.output, spec.delta_file()), spec.storage).tensors
    result = ShardResult(spec.index, {}, {}, majority_used=spec.majority)
    with ExitStack() as cleanup, ExitStack() as files:
        reader = ShardReader.for_spec(spec, files)
        writer = StreamingWriter(join(spec.output, spec.model_file()), [(j.name, j.dtype, j.shape) for j in spec.tensors],
                                 spec.storage)
        cleanup.callback(writer.abort)
        for job in spec.tensors:
            for lo, hi in chunk_ranges(job.numel, spec.chunk_elems):
                base = reader.elements(job.base, lo, hi)
                if job.is_float:
                    d = reader.elements(delta[job.name], lo, hi)
                    base = apply_alpha(base.to(spec.device).float(), d.to(spec.device), alpha, TORCH_DTYPES[job.dtype])
                writer.write(job.name, _bytes(base))
        result.outputs[spec.model_file()] = (writer.commit(), writer.bytes_written)
        cleanup.pop_all()
        result.bytes_read = reader.bytes_read
    result.seconds = time.perf_counter() - t0
    return result


def majority_redo(specs: list[ShardSpec], results: list[ShardResult]) -> tuple[int, list[ShardSpec]]:
    """TIES' majority sign is a whole-model sum known only after the map: the true one, and the
    shards that relied on a different provisional sign at an exact tie and must be redone with it."""
    majority = int(np.sign(sum(r.sign_sum for r in results)))
    by_index = {s.index: s for s in specs}
    redo = [dataclasses.replace(by_index[r.index], majority=majority)
            for r in results if r.ambiguous and r.majority_used != majority]
    return majority, redo
