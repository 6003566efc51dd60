"""What a storage backend is: one class per URI scheme (see the package docstring)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol


class RangeReader(Protocol):
    def read(self, start: int, end: int) -> bytearray: ...
    def read_into(self, start: int, view: memoryview) -> None: ...  # fill view with the bytes from start on
    def close(self) -> None: ...


class Writer(Protocol):
    """Sequential writer: nothing is visible at the URI until commit()."""

    def write(self, data: bytes | memoryview) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...  # never raises


@dataclass(frozen=True)
class Versioned:
    """An object as a conditional operation sees it: its bytes, an opaque version tag, and its age by
    the store's own clock (so clients' clock skew does not matter)."""

    data: bytes
    version: str
    age: float


class Backend:
    """Base class of a backend for URIs `scheme://...` with "/" separators. Subclasses implement the
    I/O; the lock (infra/lock.py) needs the three conditional operations to be atomic."""

    scheme = ""
    HASH_BLOCK = 16 * 1024 * 1024

    def __init__(self, options=None):
        self.options = options

    # -------------------------------------------------------------- paths (class-level: no I/O)

    @classmethod
    def join(cls, uri: str, *parts: str) -> str:
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])

    @classmethod
    def parent(cls, uri: str) -> str:
        return uri.rstrip("/").rsplit("/", 1)[0]

    @classmethod
    def basename(cls, uri: str) -> str:
        return uri.rstrip("/").rsplit("/", 1)[-1]

    @classmethod
    def normalize(cls, uri: str) -> str:
        return uri.rstrip("/")

    # -------------------------------------------------------------- objects

    def exists(self, uri: str) -> bool: ...  # an object, or a "folder": a prefix with objects under it
    def size(self, uri: str) -> int: ...
    def fingerprint(self, uri: str) -> str: ...  # cheap change detection: size and mtime or ETag
    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, uri: str, data: bytes) -> None: ...
    def open_reader(self, uri: str) -> RangeReader: ...
    def open_writer(self, uri: str) -> Writer: ...
    def list(self, prefix: str) -> list[str]: ...  # every object under prefix/, recursively, sorted
    def delete(self, uri: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def drop_partial_writes(self, prefix: str) -> None: ...  # what writers killed mid-file left under prefix
    def remove_empty_dirs(self, root: str, names: tuple[str, ...]) -> None:
        pass  # object stores have no folders

    def missing_hint(self, uri: str) -> str:
        """What to add to "not found" for a URI that names nothing."""
        return ""

    def sha256(self, uri: str) -> str:
        """Streamed sha256 of a whole object."""
        size = self.size(uri)
        reader = self.open_reader(uri)
        h = hashlib.sha256()
        try:
            for start in range(0, size, self.HASH_BLOCK):
                h.update(reader.read(start, min(size, start + self.HASH_BLOCK)))
        finally:
            reader.close()
        return h.hexdigest()

    # -------------------------------------------------------------- conditional operations (the lock)

    def create_if_absent(self, uri: str, data: bytes) -> str | None: ...  # the version, or None if it exists
    def read_versioned(self, uri: str) -> Versioned | None: ...
    def replace_if_match(self, uri: str, data: bytes, version: str) -> str | None: ...  # new version, or None
    def delete_if_match(self, uri: str, version: str) -> bool: ...
