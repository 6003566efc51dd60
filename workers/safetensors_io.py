"""Read safetensors headers and tensor byte ranges; write safetensors files as a stream.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to {dtype, shape, data_offsets}, then the data. Knowing the header is
enough to read any tensor with one ranged read, and enough to write a file whose
tensors arrive chunk by chunk: we lay out the header first, then append bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass

from infra.storage import StorageOptions, storage_for
from workers.dtypes import TORCH_DTYPES, itemsize
from workers.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: [start, end) absolute offsets in `file`."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FileHeader:
    file: str
    size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def parse_header(file: str, prefix: bytes, size: int) -> FileHeader:
    """Validate and parse a header. `prefix` must hold at least the first 8 + header bytes."""
    if size < 8 or len(prefix) < 8:
        raise CheckpointError(f"{file}: too short to be a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{file}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file)")
    if len(prefix) < 8 + n:
        raise ValueError("prefix shorter than the header")  # caller's bug, not the user's
    try:
        raw = json.loads(bytes(prefix[8 : 8 + n]).decode("utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    metadata = raw.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in raw.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry") from None
        if dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        expected = math.prod(shape) * itemsize(dtype)
        if hi - lo != expected or lo < 0:
            raise CheckpointError(
                f"{file}: tensor {name!r} spans {hi - lo} bytes but {dtype}{list(shape)} needs {expected} (corrupt header)"
            )
        if data_start + hi > size:
            raise CheckpointError(
                f"{file}: tensor {name!r} ends at byte {data_start + hi} but the file has {size} bytes (truncated file?)"
            )
        tensors[name] = TensorInfo(name, file, dtype, shape, data_start + lo, data_start + hi)
    return FileHeader(file, size, tensors, {str(k): str(v) for k, v in metadata.items()})


def read_header(uri: str, options: StorageOptions | None = None) -> FileHeader:
    """Read only the header: two small ranged reads, whatever the file's size."""
    store = storage_for(uri, options)
    size = store.size(uri)
    reader = store.open_reader(uri)
    try:
        head = reader.read(0, min(size, 64 * 1024))
        if len(head) >= 8:
            (n,) = struct.unpack("<Q", head[:8])
            if 8 + n <= size and n <= MAX_HEADER_BYTES and len(head) < 8 + n:
                head += reader.read(len(head), 8 + n)
        return parse_header(uri, head, size)
    finally:
        reader.close()


def layout_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
    """Header bytes and per-tensor byte lengths for tensors written in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    sizes = []
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(nbytes)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section as the reference writer does
    return struct.pack("<Q", len(blob)) + blob, sizes


class StreamingWriter:
    """Writes a safetensors file whose tensors are known up front and whose bytes
    arrive in order, chunk by chunk. Hashes as it writes, so the sha256 recorded in
    the manifest costs no second read."""

    def __init__(self, uri: str, entries: list[tuple[str, str, tuple[int, ...]]], options: StorageOptions | None = None):
        self.uri = uri
        header, sizes = layout_header(entries)
        self._remaining = dict(zip([e[0] for e in entries], sizes))
        self._order = [e[0] for e in entries]
        self._pos = 0
        self._sha = hashlib.sha256()
        self._writer = storage_for(uri, options).open_writer(uri)
        self.bytes_written = 0
        self._emit(header)

    def _emit(self, data) -> None:
        self._writer.write(data)
        self._sha.update(data)
        self.bytes_written += len(data)

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append bytes of tensor `name`; tensors must come in declaration order."""
        while self._remaining[self._order[self._pos]] == 0 and self._order[self._pos] != name:
            self._pos += 1
        if self._order[self._pos] != name:
            raise ValueError(f"{self.uri}: wrote {name} while {self._order[self._pos]} is incomplete")
        if len(data) > self._remaining[name]:
            raise ValueError(f"{self.uri}: too many bytes for {name}")
        self._remaining[name] -= len(data)
        self._emit(data)

    def commit(self) -> str:
        missing = [n for n, r in self._remaining.items() if r]
        if missing:
            self.abort()
            raise ValueError(f"{self.uri}: tensors left incomplete: {missing[:3]}")
        self._writer.commit()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._writer.abort()
