"""Local paths and s3:// URIs behind one small interface.

Workers receive URIs and byte ranges; this module turns them into bytes. boto3 is
imported only when an s3:// URI is used, so `workers/` runs where boto3 is absent
(a GPU box with torch alone).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mergeflow.errors import StorageError

PART_SIZE = 64 * 1024 * 1024  # multipart part size; S3 needs >= 5 MiB except the last part
TMP_SUFFIX = ".tmp"  # local writers' temporary files: ".<name>.<8 hex digits>.tmp" next to the target
_TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


@dataclass(frozen=True)
class StorageOptions:
    """Where S3 lives. Credentials are deliberately absent: they come from the
    standard AWS chain (environment, profile, instance role) and never travel in
    configs, manifests, logs or Ray task arguments."""

    endpoint_url: str | None = None
    region: str | None = None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def parent(uri: str) -> str:
    if is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return str(Path(uri).parent)


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


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


def normalize(uri: str) -> str:
    """Absolute local paths (workers may run elsewhere in the cwd); s3 URIs as given."""
    return uri.rstrip("/") if is_s3(uri) else str(Path(uri).expanduser().resolve())


class RangeReader(Protocol):
    def read(self, start: int, end: int) -> bytearray: ...
    def close(self) -> None: ...


class Writer(Protocol):
    """Sequential writer: nothing is visible at the URI until commit()."""

    def write(self, data: bytes | memoryview) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    def exists(self, uri: str) -> bool: ...
    def size(self, uri: str) -> int: ...
    def fingerprint(self, uri: str) -> str: ...
    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, uri: str, data: bytes) -> None: ...
    def open_reader(self, uri: str) -> RangeReader: ...
    def open_writer(self, uri: str) -> Writer: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, uri: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def drop_partial_writes(self, prefix: str) -> None: ...
    def remove_empty_dirs(self, root: str, names: tuple[str, ...]) -> None: ...


# --------------------------------------------------------------------- local files


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
                    f"{self._path}: file ends at byte {start + got}, expected data up to {start + len(view)} (truncated?)"
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
        return StorageError(f"{path}: no space left on the device while {doing} ({free} on "
                            f"{_mount_point(path.parent)}); free some space or choose another output")
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


class LocalStorage:
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


# ------------------------------------------------------------------------------ S3

# Fail fast when the endpoint is down or wrong (a refused connection costs well under
# a second per attempt), but give a busy server a minute to answer a ranged GET.
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 60
TOTAL_ATTEMPTS = 3  # the first try plus two retries, for throttling and dropped connections

# Environment variables that change which credentials boto3's default chain finds.
_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()
_known_buckets: set[tuple[StorageOptions, str]] = set()  # buckets a HeadBucket has confirmed


def _split(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an s3 URI needs a bucket (s3://BUCKET/KEY)")
    return bucket, key


def _credentials_key() -> str:
    """A digest of the credential environment: a client is rebuilt when it changes
    (boto3 resolves credentials once, when the client is made). Only the digest is kept."""
    h = hashlib.sha256()
    for name in _CREDENTIAL_ENV:
        h.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return h.hexdigest()


def _s3_client(options: StorageOptions):
    key = (options, _credentials_key(), os.getpid())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            # boto3 >= 1.36 adds CRC checksums to every request and validates them on
            # responses; many S3-compatible servers reject or mangle those, so ask for
            # them only when an operation requires them.
            config = Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                retries={"total_max_attempts": TOTAL_ATTEMPTS, "mode": "standard"},
                max_pool_connections=32,
                s3={"addressing_style": "path"} if options.endpoint_url else {},
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config
            )
            _clients[key] = client
        return client


def _endpoint_of(client) -> str:
    meta = getattr(client, "meta", None)
    return getattr(meta, "endpoint_url", None) or "?"


_NOT_FOUND = ("NoSuchKey", "404", "NotFound")
_CREDENTIAL_HINT = "check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile)"


def _is_not_found(err) -> bool:
    code = err.response.get("Error", {}).get("Code", "")
    return code in _NOT_FOUND or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404 and code != "NoSuchBucket"


def _s3_error(uri: str, err: Exception, endpoint: str = "?") -> StorageError:
    """Turn botocore's exceptions into one line that says what to check. Never includes
    credentials: botocore's messages name endpoints, buckets and keys only."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"{uri}: no usable AWS credentials found ({err}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    if isinstance(err, ReadTimeoutError):
        return StorageError(f"{uri}: the S3 endpoint {endpoint} did not answer within {READ_TIMEOUT} s; is the server overloaded or down?")
    if isinstance(err, (ConnectionError, HTTPClientError)):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {endpoint} (server unreachable or the connection dropped); "
                            "is the server up and storage.endpoint_url right?")
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        code = error.get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            bucket = error.get("BucketName") or _split(uri)[0]
            return StorageError(f"{uri}: bucket {bucket!r} does not exist at {endpoint}; create it or fix the URI")
        if code in _NOT_FOUND:
            return StorageError(f"{uri}: object not found")
        if code == "InvalidAccessKeyId":
            return StorageError(f"{uri}: access denied: the server does not know this access key (InvalidAccessKeyId); {_CREDENTIAL_HINT}")
        if code == "SignatureDoesNotMatch":
            return StorageError(f"{uri}: access denied: the secret key does not match the access key (SignatureDoesNotMatch); {_CREDENTIAL_HINT}")
        if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
            return StorageError(f"{uri}: access denied: the session token is expired or invalid ({code}); {_CREDENTIAL_HINT}")
        if code in ("AccessDenied", "403") or status == 403:
            why = f"HTTP 403 {code}" if code and code != "403" else "HTTP 403"  # HEAD answers carry no code
            return StorageError(f"{uri}: access denied ({why}); {_CREDENTIAL_HINT} and the bucket policy")
        message = " ".join(str(error.get("Message", "")).split())
        detail = f"{code or status}{': ' + message if message else ''}"
        if isinstance(status, int) and status >= 500:
            return StorageError(f"{uri}: the S3 endpoint {endpoint} failed the request (HTTP {status} {detail}) "
                                f"after {TOTAL_ATTEMPTS} attempts; is the server healthy?")
        return StorageError(f"{uri}: S3 request failed ({detail})")
    return StorageError(f"{uri}: S3 request failed ({type(err).__name__}: {err})")


def _s3_call(uri: str, fn, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as e:
        raise _s3_error(uri, e, _endpoint_of(getattr(fn, "__self__", None))) from None


def _read_body(uri: str, client, resp) -> bytes:
    """A GET's body: the server can fail after the headers, mid-stream."""
    from botocore.exceptions import BotoCoreError

    try:
        return resp["Body"].read()
    except BotoCoreError as e:
        raise _s3_error(uri, e, _endpoint_of(client)) from None


class _S3Reader:
    def __init__(self, client, uri: str):
        self._client, self._uri = client, uri
        self._bucket, self._key = _split(uri)

    def read(self, start: int, end: int) -> bytearray:
        if end <= start:
            return bytearray()
        resp = _s3_call(
            self._uri, self._client.get_object, Bucket=self._bucket, Key=self._key, Range=f"bytes={start}-{end - 1}"
        )
        data = bytearray(_read_body(self._uri, self._client, resp))
        if len(data) != end - start:
            raise StorageError(f"{self._uri}: got {len(data)} bytes for range {start}-{end} (object truncated?)")
        return data

    def close(self) -> None:
        pass


class _S3Writer:
    """Multipart upload; the object appears only when complete_multipart_upload succeeds."""

    def __init__(self, client, uri: str):
        self._client, self._uri = client, uri
        self._bucket, self._key = _split(uri)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict] = []

    def write(self, data: bytes | memoryview) -> None:
        self._buf += data
        while len(self._buf) >= PART_SIZE:
            self._flush(bytes(self._buf[:PART_SIZE]))
            del self._buf[:PART_SIZE]

    def _flush(self, part: bytes) -> None:
        if self._upload_id is None:
            resp = _s3_call(self._uri, self._client.create_multipart_upload, Bucket=self._bucket, Key=self._key)
            self._upload_id = resp["UploadId"]
        n = len(self._parts) + 1
        resp = _s3_call(
            self._uri,
            self._client.upload_part,
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=n,
            Body=part,
        )
        self._parts.append({"ETag": resp["ETag"], "PartNumber": n})

    def commit(self) -> None:
        if self._upload_id is None:
            _s3_call(self._uri, self._client.put_object, Bucket=self._bucket, Key=self._key, Body=bytes(self._buf))
            self._buf.clear()
            return
        if self._buf:
            self._flush(bytes(self._buf))
            self._buf.clear()
        _s3_call(
            self._uri,
            self._client.complete_multipart_upload,
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )
        self._upload_id = None  # completed: nothing left for abort() to clean up

    def abort(self) -> None:
        self._buf.clear()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=upload_id)
            except Exception:  # best effort: the server may be the thing that failed
                pass


class S3Storage:
    def __init__(self, options: StorageOptions):
        self._options = options

    @property
    def _client(self):
        return _s3_client(self._options)

    def _require_bucket(self, uri: str, bucket: str, client) -> None:
        """HeadObject answers a bare 404 both for a missing key and for a missing bucket
        (it has no body to say which): ask the bucket itself, once per bucket."""
        from botocore.exceptions import BotoCoreError, ClientError

        if (self._options, bucket) in _known_buckets:
            return
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = e.response.get("Error", {}).get("Code", "")
            if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
                raise StorageError(
                    f"{uri}: bucket {bucket!r} does not exist at {_endpoint_of(client)}; create it or fix the URI"
                ) from None
            if status == 403:
                return  # allowed to read objects but not to query the bucket: nothing more to learn
            raise _s3_error(uri, e, _endpoint_of(client)) from None
        except BotoCoreError as e:
            raise _s3_error(uri, e, _endpoint_of(client)) from None
        _known_buckets.add((self._options, bucket))

    def _head(self, uri: str, missing_ok: bool = False) -> dict | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _split(uri)
        client = self._client
        try:
            return client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if not _is_not_found(e):
                raise _s3_error(uri, e, _endpoint_of(client)) from None
        except BotoCoreError as e:
            raise _s3_error(uri, e, _endpoint_of(client)) from None
        self._require_bucket(uri, bucket, client)
        if missing_ok:
            return None
        raise StorageError(f"{uri}: object not found")

    def _has_children(self, uri: str) -> bool:
        bucket, key = _split(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        resp = _s3_call(uri, self._client.list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return bool(resp.get("KeyCount") or resp.get("Contents"))

    def exists(self, uri: str) -> bool:
        """An object, or a "directory": a prefix with objects under it (as a local
        directory exists), so callers need not care which storage they hold."""
        if self._head(uri, missing_ok=True) is not None:
            return True
        return self._has_children(uri)

    def size(self, uri: str) -> int:
        return int(self._head(uri)["ContentLength"])

    def fingerprint(self, uri: str) -> str:
        head = self._head(uri)
        return f"{head['ContentLength']}:{head.get('ETag', '')}"

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = _split(uri)
        client = self._client
        resp = _s3_call(uri, client.get_object, Bucket=bucket, Key=key)
        return _read_body(uri, client, resp)

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = _split(uri)
        _s3_call(uri, self._client.put_object, Bucket=bucket, Key=key, Body=data)

    def open_reader(self, uri: str) -> RangeReader:
        return _S3Reader(self._client, uri)

    def open_writer(self, uri: str) -> Writer:
        return _S3Writer(self._client, uri)

    def list(self, prefix: str) -> list[str]:
        """Every object under prefix/, recursively (like LocalStorage.list). Directory
        markers (keys ending in '/', made by consoles and some servers) are not files."""
        bucket, key = _split(prefix)
        key = key.rstrip("/") + "/" if key else ""
        out: list[str] = []
        token = None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": key}
            if token:
                kwargs["ContinuationToken"] = token
            resp = _s3_call(prefix, self._client.list_objects_v2, **kwargs)
            out += [f"s3://{bucket}/{o['Key']}" for o in resp.get("Contents", []) if not o["Key"].endswith("/")]
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return sorted(out)

    def delete(self, uri: str) -> None:
        bucket, key = _split(uri)
        _s3_call(uri, self._client.delete_object, Bucket=bucket, Key=key)

    def delete_prefix(self, prefix: str) -> None:
        for uri in self.list(prefix):
            self.delete(uri)

    def drop_partial_writes(self, prefix: str) -> None:
        """Abort multipart uploads under prefix/ that were never completed (a killed writer's parts
        stay stored, and billed, until then)."""
        bucket, key = _split(prefix)
        key = key.rstrip("/") + "/" if key else ""
        client = self._client
        resp = _s3_call(prefix, client.list_multipart_uploads, Bucket=bucket, Prefix=key)
        for upload in resp.get("Uploads", []):
            _s3_call(prefix, client.abort_multipart_upload, Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def remove_empty_dirs(self, root: str, names: tuple[str, ...]) -> None:
        pass  # S3 has no folders


def storage_for(uri: str, options: StorageOptions | None = None) -> Storage:
    if is_s3(uri):
        return S3Storage(options or StorageOptions())
    return LocalStorage()


def sha256_of(uri: str, options: StorageOptions | None = None, block: int = 16 * 1024 * 1024) -> str:
    """Streamed sha256 of a whole file or object.

    Local files are hashed through a read-only memory map: the hash reads the page cache
    directly instead of copying every block into a buffer first (~20% less CPU, measured)."""
    if not is_s3(uri):
        return _sha256_local(uri, block)
    store = storage_for(uri, options)
    size = store.size(uri)
    reader = store.open_reader(uri)
    h = hashlib.sha256()
    try:
        for start in range(0, size, block):
            h.update(reader.read(start, min(size, start + block)))
    finally:
        reader.close()
    return h.hexdigest()


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
