"""Local files (plain paths and file://) as a storage backend: pread ranges, temp-file-then-rename
writes synced before they are published, an mmap'd sha256, and flock/hard-link compare-and-swap."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from mergeflow.errors import StorageError
from mergeflow.infra.storage.base import Backend, RangeReader, Versioned, Writer

TMP_SUFFIX = ".tmp"  # writers' temporary files: ".<name>.<8 hex digits>.tmp" next to the target
_TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


class _LocalReader:
    def __init__(self, path: str):
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StorageError(f"{path}: file not found") from None
        except OSError as e:
            raise StorageError(f"{path}: cannot open ({e.strerror})") from None
        self._path = path

    def read(self, start: int, end: int) -> bytearray:
        buf = bytearray(end - start)
        self.read_into(start, memoryview(buf))
        return buf

    def read_into(self, start: int, view: memoryview) -> None:
        """Fill `view` with the bytes from `start` on (no allocation: for reused buffers)."""
        got = 0
        while got < len(view):
            n = os.preadv(self._fd, [view[got:]], start + got)
            if n == 0:
                raise StorageError(
                    f"{self._path}: file ends at byte {start + got}, expected data up to {start + len(view)} "
                    "(truncated?)"
                )
            got += n

    def close(self) -> None:
        os.close(self._fd)


def _storage_error(path: Path, err: OSError, doing: str) -> StorageError:
    """One line for a failed local write; a full disk says how much room is left."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(path.parent).free / 1e6:.1f} MB free"
        except OSError:
            free = "free space unknown"
        return StorageError(
            f"{path}: no space left on the device while {doing} ({free} on "
            f"{_mount_point(path.parent)}); free some space or choose another output"
        )
    return StorageError(f"{path}: cannot write ({err.strerror or err}) while {doing}")


def _mount_point(path: Path) -> str:
    p = path.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """mkdir -p, syncing the parent of every folder it creates: a rename into a new folder is
    durable only once the folder's own entry is."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


class _LocalWriter:
    """Writes to a hidden temporary file next to the target and renames on commit,
    so a reader never sees a half-written file under the final name. The data and the
    rename are synced before commit() returns: a manifest written after it can never point
    at a file that a power loss left empty."""

    def __init__(self, path: str):
        self._path = Path(path)
        try:
            _make_dirs(self._path.parent)
            self._tmp = self._path.with_name(f".{self._path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
            self._f = open(self._tmp, "wb")
        except OSError as e:
            raise _storage_error(self._path, e, "creating it") from None

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            self.abort()
            raise _storage_error(self._path, e, "writing it") from None

    def commit(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self._path)
            _fsync_dir(self._path.parent)
        except OSError as e:
            self.abort()
            raise _storage_error(self._path, e, "finishing it") from None

    def abort(self) -> None:
        """Drop the temporary file; never raises (closing a file on a full disk can fail)."""
        try:
            self._f.close()
        except OSError:
            pass
        try:
            self._tmp.unlink(missing_ok=True)
        except OSError:
            pass


class LocalStorage(Backend):
    """Files on this machine (or a file system every node mounts at the same path)."""

    @classmethod
    def join(cls, uri: str, *parts: str) -> str:
        return str(Path(_path(uri), *parts))

    @classmethod
    def parent(cls, uri: str) -> str:
        return str(Path(_path(uri)).parent)

    @classmethod
    def basename(cls, uri: str) -> str:
        return Path(_path(uri)).name

    @classmethod
    def normalize(cls, uri: str) -> str:
        return str(Path(_path(uri)).expanduser().resolve())

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def size(self, uri: str) -> int:
        try:
            return Path(uri).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"{uri}: file not found") from None

    def fingerprint(self, uri: str) -> str:
        st = Path(uri).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"

    def read_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{uri}: file not found") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        w = _LocalWriter(uri)
        w.write(data)
        w.commit()

    def open_reader(self, uri: str) -> RangeReader:
        return _LocalReader(uri)

    def open_writer(self, uri: str) -> Writer:
        return _LocalWriter(uri)

    def list(self, prefix: str) -> list[str]:
        root = Path(prefix)
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file())

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        p = Path(prefix)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def drop_partial_writes(self, prefix: str) -> None:
        """Remove the temp files of writers that died before commit() or abort()."""
        root = Path(prefix)
        if root.is_dir():
            for p in root.rglob(f".*{TMP_SUFFIX}"):
                if _TMP_NAME.match(p.name):
                    p.unlink(missing_ok=True)

    def remove_empty_dirs(self, root: str, names: tuple[str, ...]) -> None:
        """Remove the folders `names` under root (and their sub-folders) where they hold no files."""
        for name in names:
            top = Path(root, name)
            if not top.is_dir():
                continue
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                if not any(d.iterdir()):
                    d.rmdir()
            if not any(top.iterdir()):
                top.rmdir()

    def sha256(self, uri: str) -> str:
        return _sha256_local(uri, self.HASH_BLOCK)

    # Compare-and-swap on a local file: create by hard-linking a fully written temp file (fails if
    # the name exists; readers never see half a file); replace or delete under an flock of the file
    # itself, only if the path still names the inode we locked and holds the version we read, so a
    # contender that waited on a file since replaced or deleted sees the change and loses.

    def _tmp(self, path: Path, data: bytes) -> Path:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create_if_absent(self, uri: str, data: bytes) -> str | None:
        path = Path(uri)
        _make_dirs(path.parent)
        tmp = self._tmp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def read_versioned(self, uri: str) -> Versioned | None:
        try:
            with open(uri, "rb") as f:
                data, mtime = f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Versioned(data, hashlib.sha256(data).hexdigest(), max(0.0, time.time() - mtime))

    @contextmanager
    def _locked_if(self, path: Path, version: str):
        """Yield True, holding the file's flock, when the file is still at `version`; else False."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            yield False
            return
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when f closes, also if we die
            try:
                same_inode = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same_inode = False
            yield same_inode and hashlib.sha256(f.read()).hexdigest() == version

    def replace_if_match(self, uri: str, data: bytes, version: str) -> str | None:
        path = Path(uri)
        with self._locked_if(path, version) as ours:
            if not ours:
                return None
            os.replace(self._tmp(path, data), path)
        return hashlib.sha256(data).hexdigest()

    def delete_if_match(self, uri: str, version: str) -> bool:
        path = Path(uri)
        with self._locked_if(path, version) as ours:
            if ours:
                path.unlink()
            return ours


def _path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _sha256_local(path: str, block: int) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return h.hexdigest()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    for start in range(0, size, block):
                        h.update(view[start : start + block])
                finally:
                    view.release()
    except FileNotFoundError:
        raise StorageError(f"{path}: file not found") from None
    except OSError as e:
        raise StorageError(f"{path}: cannot read ({e.strerror})") from None
    return h.hexdigest()
