"""A storage backend in one file, defined outside mergeflow: mem://key, bytes held in this process
(so for merges that run in it: tests/test_plugins.py). What a user's own backend looks like."""

from __future__ import annotations

import hashlib

import mergeflow
from mergeflow.errors import StorageError
from mergeflow.infra.storage import Backend
from mergeflow.infra.storage.base import Versioned

OBJECTS: dict[str, bytes] = {}


class _Reader:
    def __init__(self, data: bytes):
        self._data = data

    def read(self, start: int, end: int) -> bytearray:
        return bytearray(self._data[start:end])

    def read_into(self, start: int, view: memoryview) -> None:
        view[:] = self._data[start : start + len(view)]

    def close(self) -> None:
        pass


class _Writer:
    def __init__(self, uri: str):
        self._uri, self._buf = uri, bytearray()

    def write(self, data) -> None:
        self._buf += data

    def commit(self) -> None:
        OBJECTS[self._uri] = bytes(self._buf)

    def abort(self) -> None:
        self._buf = bytearray()


class MemoryStorage(Backend):
    scheme = "mem"

    def _get(self, uri: str) -> bytes:
        try:
            return OBJECTS[uri]
        except KeyError:
            raise StorageError(f"{uri}: object not found") from None

    def exists(self, uri):
        return uri in OBJECTS or any(k.startswith(uri.rstrip("/") + "/") for k in OBJECTS)

    def size(self, uri):
        return len(self._get(uri))

    def fingerprint(self, uri):
        return f"{len(self._get(uri))}:{hashlib.md5(self._get(uri)).hexdigest()}"

    def read_bytes(self, uri):
        return self._get(uri)

    def write_bytes(self, uri, data):
        OBJECTS[uri] = bytes(data)

    def open_reader(self, uri):
        return _Reader(self._get(uri))

    def open_writer(self, uri):
        return _Writer(uri)

    def list(self, prefix):
        root = prefix.rstrip("/") + "/"
        return sorted(k for k in OBJECTS if k.startswith(root))

    def delete(self, uri):
        OBJECTS.pop(uri, None)

    def delete_prefix(self, prefix):
        for k in self.list(prefix):
            OBJECTS.pop(k)

    def drop_partial_writes(self, prefix):
        pass  # nothing is visible before commit

    def create_if_absent(self, uri, data):
        if uri in OBJECTS:
            return None
        OBJECTS[uri] = bytes(data)
        return hashlib.sha256(data).hexdigest()

    def read_versioned(self, uri):
        data = OBJECTS.get(uri)
        return None if data is None else Versioned(data, hashlib.sha256(data).hexdigest(), 0.0)

    def replace_if_match(self, uri, data, version):
        seen = self.read_versioned(uri)
        if seen is None or seen.version != version:
            return None
        OBJECTS[uri] = bytes(data)
        return hashlib.sha256(data).hexdigest()

    def delete_if_match(self, uri, version):
        seen = self.read_versioned(uri)
        if seen is None or seen.version != version:
            return False
        del OBJECTS[uri]
        return True


mergeflow.register_backend("mem", MemoryStorage)
