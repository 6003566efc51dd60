"""Rebuild one task's model from a TALL-mask bundle: theta_t = theta_0 + m_t * tau_MTL.

Streaming, per output part: base tensors by range, tau_MTL and the task's packed
masks from the bundle, every bundle file checked against its recorded sha256
before its bytes are trusted.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch

from mergeflow.infra.storage import StorageOptions, sha256_of
from mergeflow.workers.bits import unpack
from mergeflow.workers.dtypes import TORCH_DTYPES
from mergeflow.errors import CheckpointError
from mergeflow.workers.safetensors_io import StreamingWriter, TensorInfo, read_header
from mergeflow.workers.shard import ShardReader, _bytes, chunk_ranges


@dataclass(frozen=True)
class RebuildSpec:
    task: str
    base: tuple[TensorInfo, ...]  # every tensor of this part, in output order
    tau_file: str | None  # None when the part has no float tensors
    mask_file: str | None
    expected: dict[str, str]  # bundle file URI -> sha256 from the manifest
    output: str  # output file URI
    chunk_elems: int = 1 << 22
    storage: StorageOptions = StorageOptions()


def verify(uri: str, expected: str, options: StorageOptions) -> None:
    got = sha256_of(uri, options)
    if got != expected:
        raise CheckpointError(f"{uri}: sha256 {got[:12]}... does not match the manifest ({expected[:12]}...); the bundle is corrupt")


def rebuild_part(spec: RebuildSpec) -> tuple[str, int]:
    for uri, sha in spec.expected.items():
        verify(uri, sha, spec.storage)
    tau = read_header(spec.tau_file, spec.storage).tensors if spec.tau_file else {}
    masks = read_header(spec.mask_file, spec.storage).tensors if spec.mask_file else {}
    entries = [(b.name, b.dtype, b.shape) for b in spec.base]
    with ExitStack() as files:
        reader = ShardReader(spec.storage, files)
        writer = StreamingWriter(spec.output, entries, spec.storage)
        try:
            for b in spec.base:
                if b.name not in tau:
                    for lo, hi in chunk_ranges(b.numel, spec.chunk_elems):
                        writer.write(b.name, reader.elements(b, lo, hi).numpy().tobytes())
                    continue
                t, m = tau[b.name], masks.get(b.name)
                if m is None or t.numel != b.numel:
                    raise CheckpointError(f"{spec.tau_file}: tensor {b.name!r} does not match the base checkpoint")
                for lo, hi in chunk_ranges(b.numel, spec.chunk_elems):
                    base = reader.elements(b, lo, hi).float()
                    delta = reader.elements(t, lo, hi).float()
                    bits = unpack(reader.elements(m, lo // 8, (hi + 7) // 8), hi - lo)
                    rebuilt = base + torch.where(bits, delta, torch.zeros((), dtype=delta.dtype))
                    writer.write(b.name, _bytes(rebuilt.to(TORCH_DTYPES[b.dtype])))
            sha = writer.commit()
        except BaseException:
            writer.abort()
            raise
    return sha, writer.bytes_written
