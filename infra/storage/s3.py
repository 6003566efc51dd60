"""S3 and S3-compatible object stores (MinIO, Ceph, SeaweedFS) as a storage backend, through boto3
(imported on first use)."""

from __future__ import annotations

import hashlib
import os
import threading
from email.utils import parsedate_to_datetime

from mergeflow.errors import StorageError
from mergeflow.infra.storage import StorageOptions
from mergeflow.infra.storage.base import Backend, RangeReader, Versioned, Writer

PART_SIZE = 64 * 1024 * 1024  # multipart part size; S3 needs >= 5 MiB except the last part

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
    scheme, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: a {scheme} URI needs a bucket ({scheme}://BUCKET/KEY)")
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
    return (
        code in _NOT_FOUND
        or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404
        and code != "NoSuchBucket"
    )


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
        return StorageError(
            f"{uri}: no usable AWS credentials found ({err}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
        )
    if isinstance(err, ReadTimeoutError):
        return StorageError(
            f"{uri}: the S3 endpoint {endpoint} did not answer within {READ_TIMEOUT} s; "
            "is the server overloaded or down?"
        )
    if isinstance(err, (ConnectionError, HTTPClientError)):
        return StorageError(
            f"{uri}: cannot reach the S3 endpoint {endpoint} (server unreachable or the connection dropped); "
            "is the server up and storage.endpoint_url right?"
        )
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
            return StorageError(
                f"{uri}: access denied: the server does not know this access key (InvalidAccessKeyId); "
                f"{_CREDENTIAL_HINT}"
            )
        if code == "SignatureDoesNotMatch":
            return StorageError(
                f"{uri}: access denied: the secret key does not match the access key (SignatureDoesNotMatch); "
                f"{_CREDENTIAL_HINT}"
            )
        if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
            return StorageError(
                f"{uri}: access denied: the session token is expired or invalid ({code}); {_CREDENTIAL_HINT}"
            )
        if code in ("AccessDenied", "403") or status == 403:
            why = f"HTTP 403 {code}" if code and code != "403" else "HTTP 403"  # HEAD answers carry no code
            return StorageError(f"{uri}: access denied ({why}); {_CREDENTIAL_HINT} and the bucket policy")
        message = " ".join(str(error.get("Message", "")).split())
        detail = f"{code or status}{': ' + message if message else ''}"
        if isinstance(status, int) and status >= 500:
            return StorageError(
                f"{uri}: the S3 endpoint {endpoint} failed the request (HTTP {status} {detail}) "
                f"after {TOTAL_ATTEMPTS} attempts; is the server healthy?"
            )
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

    def read_into(self, start: int, view: memoryview) -> None:
        view[:] = self.read(start, start + len(view))

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


class S3Storage(Backend):
    """An S3 (or S3-compatible) object store: ranged GETs, multipart uploads that appear on
    completion, and conditional PUT/DELETE (If-None-Match, If-Match) for the lock."""

    scheme = "s3"

    def __init__(self, options: StorageOptions | None = None):
        super().__init__(options or StorageOptions())
        self._options = self._client_options(self.options)

    @classmethod
    def _client_options(cls, options: StorageOptions) -> StorageOptions:
        """What the client is built from (a subclass may fill in its store's endpoint)."""
        return options

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
            out += [
                f"{self.scheme}://{bucket}/{o['Key']}" for o in resp.get("Contents", []) if not o["Key"].endswith("/")
            ]
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
            _s3_call(
                prefix, client.abort_multipart_upload, Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )

    def remove_empty_dirs(self, root: str, names: tuple[str, ...]) -> None:
        pass  # S3 has no folders

    def missing_hint(self, uri: str) -> str:
        return " (no objects under this prefix)"

    # ------------------------------------------------------------------ conditional operations

    def _conditional(self, uri: str, fn, **kwargs):
        """A request whose 412 (precondition failed), 409 (a concurrent conditional write: as good as
        losing the race) and 404 are answers, not errors."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _split(uri)
        try:
            return fn(Bucket=bucket, Key=key, **kwargs)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = e.response.get("Error", {}).get("Code", "")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if code in ("NoSuchKey", "404", "NotFound") or status == 404 and code != "NoSuchBucket":
                return None
            raise _s3_error(uri, e, _endpoint_of(self._client)) from None
        except BotoCoreError as e:
            raise _s3_error(uri, e, _endpoint_of(self._client)) from None

    def create_if_absent(self, uri: str, data: bytes) -> str | None:
        self._head(uri, missing_ok=True)  # SeaweedFS (and others) create a missing bucket on PUT: check first
        resp = self._conditional(uri, self._client.put_object, Body=data, IfNoneMatch="*")
        return resp and resp["ETag"]

    def read_versioned(self, uri: str) -> Versioned | None:
        resp = self._conditional(uri, self._client.get_object)
        if resp is None:
            return None
        data = _read_body(uri, self._client, resp)
        age = 0.0  # by the server's clock: its Date against the object's LastModified
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date and resp.get("LastModified"):
            age = max(0.0, (parsedate_to_datetime(date) - resp["LastModified"]).total_seconds())
        return Versioned(data, resp["ETag"], age)

    def replace_if_match(self, uri: str, data: bytes, version: str) -> str | None:
        resp = self._conditional(uri, self._client.put_object, Body=data, IfMatch=version)
        return resp and resp["ETag"]

    def delete_if_match(self, uri: str, version: str) -> bool:
        return self._conditional(uri, self._client.delete_object, IfMatch=version) is not None
