"""Storage backends by URI scheme: local paths (no scheme, or file://), s3:// and gs://, and any
backend registered with `register_backend(scheme, factory)`.

Workers receive URIs and byte ranges; a backend turns them into bytes. A backend is one class
(base.Backend): its path helpers, whole-object and ranged I/O, streamed writes that appear only
on commit, listing and deletion, and the conditional operations the output lock is built on
(create-if-absent, replace-if-match, delete-if-match). boto3 is imported only when an S3-style URI
is used, so mergeflow.workers runs where boto3 is absent (a GPU box with torch alone).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from mergeflow.errors import StorageError
from mergeflow.infra.storage.base import Backend, RangeReader, Writer

__all__ = [
    "Backend",
    "RangeReader",
    "StorageOptions",
    "Writer",
    "backend_class",
    "basename",
    "is_local",
    "join",
    "normalize",
    "parent",
    "plain_name",
    "register_backend",
    "safe_relpath",
    "scheme_of",
    "sha256_of",
    "storage_for",
]


@dataclass(frozen=True)
class StorageOptions:
    """The config's `storage:` section: what backends need besides the URI. Credentials are
    deliberately absent: they come from each store's own chain (for S3, the environment, a profile
    or an instance role) and never travel in configs, manifests, logs or Ray task arguments.

    `plugins` carries the backends registered in this process (scheme, factory), so that workers in
    other processes resolve their URIs too (Ray ships the factories by value: workflows/runtime.py)."""

    endpoint_url: str | None = None  # an S3-compatible endpoint (MinIO, Ceph, SeaweedFS; gs:// defaults to GCS's)
    region: str | None = None
    plugins: tuple[tuple[str, object], ...] = ()


_BUILTIN = {
    "": "mergeflow.infra.storage.local:LocalStorage",
    "file": "mergeflow.infra.storage.local:LocalStorage",
    "s3": "mergeflow.infra.storage.s3:S3Storage",
    "gs": "mergeflow.infra.storage.gcs:GcsStorage",
}
_REGISTERED: dict[str, object] = {}  # scheme -> factory(options) -> Backend, registered at run time
_loaded: dict[str, type] = {}


def register_backend(scheme: str, factory) -> None:
    """Make `scheme://...` URIs resolve to `factory(options)`, a Backend (usually its class)."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError(f"not a URI scheme: {scheme!r}")
    _REGISTERED[scheme] = factory


def registered() -> tuple[tuple[str, object], ...]:
    """The backends registered at run time, for StorageOptions.plugins."""
    return tuple(sorted(_REGISTERED.items()))


def scheme_of(uri: str) -> str:
    """ "s3" for s3://bucket/key, "" for a plain path."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", head) else ""


def backend_class(uri: str, options: StorageOptions | None = None):
    scheme = scheme_of(uri)
    plugins = dict(options.plugins) if options else {}
    factory = plugins.get(scheme) or _REGISTERED.get(scheme)
    if factory is not None:
        return factory
    if scheme not in _BUILTIN:
        raise StorageError(
            f"{uri}: no storage backend for {scheme}:// (built in: local paths, s3://, gs://; "
            "others: mergeflow.register_backend)"
        )
    if scheme not in _loaded:
        module, _, name = _BUILTIN[scheme].partition(":")
        _loaded[scheme] = getattr(importlib.import_module(module), name)
    return _loaded[scheme]


def storage_for(uri: str, options: StorageOptions | None = None) -> Backend:
    return backend_class(uri, options)(options or StorageOptions())


# Path helpers: a backend's own (its separators, its idea of absolute), by the URI's scheme.


def join(uri: str, *parts: str) -> str:
    return backend_class(uri).join(uri, *parts)


def parent(uri: str) -> str:
    return backend_class(uri).parent(uri)


def basename(uri: str) -> str:
    return backend_class(uri).basename(uri)


def normalize(uri: str) -> str:
    """Absolute local paths (workers may run elsewhere in the cwd); object-store URIs as given."""
    return backend_class(uri).normalize(uri)


def is_local(uri: str) -> bool:
    """A path on this machine's file system (every other URI names an object store)."""
    return scheme_of(uri) in ("", "file")


def sha256_of(uri: str, options: StorageOptions | None = None) -> str:
    """Streamed sha256 of a whole file or object."""
    return storage_for(uri, options).sha256(uri)


def safe_relpath(rel: object, where: str) -> str:
    """`rel` if it is a relative path that stays inside its folder ("model/x.safetensors"), else a
    StorageError naming `where`: names read from manifests, indexes and journals decide which
    files are read, written and deleted, and a crafted one must not reach outside the run."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        raise StorageError(f"{where}: {rel!r} is not a relative path inside the folder")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise StorageError(f"{where}: {rel!r} is not a relative path inside the folder")
    return rel


def plain_name(name: object, where: str) -> str:
    """`name` if it is a plain file name (no folder part), else a StorageError naming `where`."""
    if safe_relpath(name, where) != name or "/" in name:
        raise StorageError(f"{where}: {name!r} is not a plain file name")
    return name
