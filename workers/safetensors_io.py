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
import re
import struct
from dataclasses import dataclass

from mergeflow.errors import CheckpointError
from mergeflow.infra.storage import StorageOptions, storage_for
from mergeflow.workers.dtypes import TORCH_DTYPES, itemsize

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's MAX_HEADER_SIZE (safetensors/src/tensor.rs)
USIZE_MAX = 2**64 - 1  # the reference reads every size into a 64-bit usize and refuses what overflows it


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


class _Corrupt(ValueError):
    """What is wrong with a header; parse_header adds the file name and raises CheckpointError."""


def parse_header(file: str, prefix: bytes, size: int) -> FileHeader:
    """Validate and parse a header. `prefix` must hold at least the first 8 + header bytes.

    The rules are the reference's (safetensors/src/tensor.rs, SafeTensors::read_metadata and
    Metadata::validate): a file it refuses to load is refused here, at plan time, with one line,
    rather than merged or read into garbage. Duplicate JSON keys are refused too (the reference lets
    the last one win): two readers could disagree on which tensor a name means."""
    n = _header_length(file, prefix, size)
    if len(prefix) < 8 + n:
        raise ValueError("prefix shorter than the header")  # caller's bug, not the user's
    try:
        raw = _header_json(bytes(prefix[8 : 8 + n]))
        metadata = _metadata(raw.pop("__metadata__", None))
        entries = [(name, *_entry(name, entry)) for name, entry in raw.items()]
        end, last = _tiled_end(entries)
    except _Corrupt as e:
        raise CheckpointError(f"{file}: corrupt safetensors header: {e}") from None
    data_start = 8 + n
    # The last tensor must end exactly where the file does (MetadataIncompleteBuffer in the reference).
    if data_start + end > size:
        raise CheckpointError(
            f"{file}: tensor {last!r} ends at byte {data_start + end} but the file has {size} bytes (truncated file?)"
        )
    if data_start + end < size:
        raise CheckpointError(
            f"{file}: corrupt safetensors header: the {size - data_start - end} bytes after its "
            "last tensor belong to no tensor"
        )
    tensors = {
        name: TensorInfo(name, file, dtype, shape, data_start + lo, data_start + hi)
        for name, dtype, shape, lo, hi in entries
    }
    return FileHeader(file, size, tensors, metadata)


def _header_length(file: str, prefix: bytes, size: int) -> int:
    """The 8-byte length prefix, checked against the file size. Never quoted in the message: for a
    file that is not safetensors at all it is just the file's first 8 bytes (say, of a text file)."""
    if size < 8 or len(prefix) < 8:
        raise CheckpointError(f"{file}: too short to be a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(
            f"{file}: not a safetensors file, or a corrupt safetensors header "
            f"(its length prefix is impossible for a {size}-byte file)"
        )
    return n


def _header_json(blob: bytes) -> dict:
    """The header as a dict, refusing what serde_json (the reference's parser) refuses."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Corrupt(f"not valid UTF-8 (at header byte {e.start})") from None
    try:
        raw = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_json_int,
        )
    except _Corrupt:
        raise
    except ValueError as e:  # json.JSONDecodeError says where, never what the bytes are
        raise _Corrupt(f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _Corrupt("not a JSON object")
    # Valid UTF-8 cannot hold a surrogate, but a \ud800 escape can; serde_json refuses lone ones.
    if "\\u" in text and re.search(r"\\u[dD][89a-fA-F]", text):
        try:
            json.dumps(raw, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _Corrupt("a string in it holds an unpaired surrogate escape") from None
    return raw


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Corrupt(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str):
    raise _Corrupt(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Corrupt("a number in it is out of range")
    return value


def _json_int(text: str):
    # serde_json reads "-0" as the float -0.0, which no size may be; Python would make it 0.
    return -0.0 if text == "-0" else int(text)


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _Corrupt("__metadata__ must map strings to strings")
    return value


def _entry(name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor entry. Unknown keys are ignored, as the reference does."""
    if not isinstance(entry, dict):
        raise _Corrupt(f"tensor {name!r}: entry is not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise _Corrupt(f"tensor {name!r}: no {key}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise _Corrupt(f"tensor {name!r}: dtype must be a string")
    if dtype not in TORCH_DTYPES:
        raise _Corrupt(f"tensor {name!r}: unsupported dtype {dtype!r} (supported: {', '.join(TORCH_DTYPES)})")
    if not isinstance(shape, list) or not all(map(_is_size, shape)):
        raise _Corrupt(f"tensor {name!r}: shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_size, offsets)):
        raise _Corrupt(f"tensor {name!r}: data_offsets must be a list of two non-negative integers")
    lo, hi = offsets
    if hi < lo:
        raise _Corrupt(f"tensor {name!r}: data_offsets end before they begin")
    expected = _nbytes(shape, dtype)
    if expected is None:
        raise _Corrupt(f"tensor {name!r}: shape {_shape_text(shape)} overflows 64-bit sizes")
    if hi - lo != expected:
        raise _Corrupt(f"tensor {name!r} spans {hi - lo} bytes but {dtype}{_shape_text(shape)} needs {expected}")
    return dtype, tuple(shape), lo, hi


def _is_size(x: object) -> bool:
    # bool is an int to Python but not to JSON; floats (4.0, 1e2) are refused by the reference too
    return type(x) is int and 0 <= x <= USIZE_MAX


def _nbytes(shape: list[int], dtype: str) -> int | None:
    """Bytes a tensor needs, or None where the reference's checked 64-bit arithmetic overflows
    (it multiplies the dims left to right, so [2**40, 2**40, 0] overflows and [0, 2**40, 2**40] does not)."""
    numel = 1
    for d in shape:
        numel *= d
        if numel > USIZE_MAX:
            return None
    nbits = numel * itemsize(dtype) * 8
    return None if nbits > USIZE_MAX else nbits // 8


def _shape_text(shape: list[int]) -> str:
    return str(shape) if len(shape) <= 8 else f"[{shape[0]}, ... {len(shape)} dims]"


def _tiled_end(entries: list[tuple[str, str, tuple[int, ...], int, int]]) -> tuple[int, str | None]:
    """Where the data ends, and its last tensor. Sorted by offsets, tensors must tile the data
    section from 0 with no hole and no overlap (Metadata::validate)."""
    end, last = 0, None
    for name, _, _, lo, hi in sorted(entries, key=lambda e: (e[3], e[4])):
        if lo > end:
            raise _Corrupt(f"tensor {name!r}: the {lo - end} bytes before it belong to no tensor")
        if lo < end:
            raise _Corrupt(f"tensor {name!r}: its bytes overlap another tensor's")
        end, last = hi, name
    return end, last


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

    def __init__(
        self,
        uri: str,
        entries: list[tuple[str, str, tuple[int, ...]]],
        options: StorageOptions | None = None,
        rel: str = "",
    ):
        self.uri = uri
        self.rel = rel  # the file's path in its run, for the manifest
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
