"""Reading a shard's tensors: byte ranges of the base and every task, widened to float32 task
vectors chunk by chunk, into buffers reused across chunks. What methods see of their inputs.

Memory is O(T x chunk): no tensor is held whole unless a method asks for it (TensorAccess.whole).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING

import torch

from mergeflow.errors import CheckpointError
from mergeflow.infra.storage import RangeReader, StorageOptions, storage_for
from mergeflow.workers import lora
from mergeflow.workers.dtypes import TORCH_DTYPES, itemsize
from mergeflow.workers.safetensors_io import TensorInfo

if TYPE_CHECKING:
    from mergeflow.workers.shard import ShardSpec, TensorJob

# Stage CUDA shards' reads in page-locked memory (bench/gpu_stages.py --staging turns it off to compare).
PIN_CUDA_READS = True


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
        self.memo: dict = {}  # small tensors read whole once per shard (LoRA factors)

    @classmethod
    def for_spec(cls, spec: ShardSpec, stack: ExitStack) -> ShardReader:
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
        self._reader(info).read_into(info.start + lo * size, memoryview(scratch.numpy()))
        self.bytes_read += nbytes
        return scratch.view(TORCH_DTYPES[info.dtype])


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
            if isinstance(info, TensorInfo):
                _finite(reader.elements(info, lo, hi), f"task {name!r}", job)
            elif isinstance(info, lora.LoraFactor):
                lora.check_finite(info, reader, f"task {name!r}", job.name)


class ChunkBuffers:
    """Float32 work buffers reused across the chunks and tensors of a shard: a (T, chunk)
    block of task-vector rows and one base row. Allocating them per chunk would cost a
    fresh mmap, zeroed pages and a torch.stack copy every time."""

    def __init__(self, spec: ShardSpec, chunk_elems: int | None = None):
        self._spec = spec
        self._chunk = chunk_elems or spec.chunk_elems
        self._taus: torch.Tensor | None = None
        self._base: torch.Tensor | None = None

    def get(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = len(self._spec.task_names)
        if self._taus is None or self._base.numel() < n:
            device = torch.device(self._spec.device)
            size = max(n, min(self._chunk, max((j.numel for j in self._spec.tensors), default=n)))
            self._taus = torch.empty(t * size, dtype=torch.float32, device=device)
            self._base = torch.empty(size, dtype=torch.float32, device=device)
        # rows of one contiguous (T, n) block: methods may view or reshape it freely
        return self._base[:n], self._taus[: t * n].view(t, n)


def task_chunks(
    spec: ShardSpec,
    job: TensorJob,
    reader: ShardReader,
    buffers: ChunkBuffers | None = None,
    ranges=None,
    chunk_elems: int | None = None,
):
    """Yield (lo, hi, base_f32, taus) over a float tensor (or the element ranges given, each at
    most a chunk long), taus = (T, n) float32.

    Both are views of reused buffers, overwritten by the next chunk: consume them before
    asking for the next one. Values are not checked for NaN/Inf here (see check_finite)."""
    chunk = chunk_elems or spec.chunk_elems
    buffers = buffers or ChunkBuffers(spec, chunk)
    for lo, hi in ranges if ranges is not None else chunk_ranges(job.numel, chunk):
        base, taus = buffers.get(hi - lo)
        base.copy_(reader.scratch_elements(job.base, lo, hi))  # exact widening to float32, on the device
        for row, info in zip(taus, job.tasks):
            task_row(row, info, base, lo, hi, reader)
        yield lo, hi, base, taus


def task_row(row: torch.Tensor, info, base: torch.Tensor, lo: int, hi: int, reader: ShardReader) -> None:
    """row[:] = tau_t over elements [lo, hi): a task checkpoint's value minus the base's (exact
    widening to float32 on the device), a LoRA adapter's scale * B @ A, or 0 for what it leaves."""
    if isinstance(info, TensorInfo):
        row.copy_(reader.scratch_elements(info, lo, hi))
        row.sub_(base)
    elif isinstance(info, lora.LoraFactor):
        lora.fill_chunk(row, info, lo, hi, reader)
    else:
        row.zero_()


class TensorAccess:
    """One float tensor of a shard, as a method reads it: in chunks (the engine's loop), in chunks
    of whole rows, or whole. Task vectors are float32, one row per task, in task order."""

    def __init__(self, spec: ShardSpec, job: TensorJob, reader: ShardReader, buffers: ChunkBuffers):
        self.spec, self.job, self.reader, self._buffers = spec, job, reader, buffers

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.device)

    def chunks(self, ranges=None) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(lo, hi, base, taus) over the tensor, in reused buffers (see task_chunks)."""
        return task_chunks(self.spec, self.job, self.reader, self._buffers, ranges)

    def row_chunks(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Chunks of whole rows of a 2-D tensor: about chunk_elems elements, never less than a row."""
        width = self.job.shape[-1]
        return task_chunks(self.spec, self.job, self.reader, chunk_elems=max(1, self.spec.chunk_elems // width) * width)

    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, taus) of the whole tensor: base shaped like it, taus (T, *shape). Memory T x tensor."""
        n = self.job.numel
        base = torch.empty(n, dtype=torch.float32, device=self.device)
        taus = torch.empty((len(self.spec.task_names), n), dtype=torch.float32, device=self.device)
        for lo, hi, b, t in self.chunks():
            base[lo:hi] = b
            taus[:, lo:hi] = t
        return base.view(self.job.shape), taus.view(-1, *self.job.shape)

    def elements(self, info: TensorInfo, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Raw elements of any tensor the shard can read (a statistics file's, say), stored dtype."""
        return self.reader.elements(info, lo, info.numel if hi is None else hi)

    def check_finite(self) -> None:
        check_finite(self.spec, self.job, self.reader)


def copy_exact(spec: ShardSpec, job: TensorJob, reader: ShardReader, writer) -> None:
    """Integer and bool tensors are copied from the base and must agree everywhere (checked even
    when this pass writes no model)."""
    for lo, hi in chunk_ranges(job.numel, spec.chunk_elems):
        base = reader.elements(job.base, lo, hi)
        for name, info in zip(spec.task_names, job.tasks):
            if not isinstance(info, TensorInfo):
                continue  # an adapter leaves it as the base has it
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
