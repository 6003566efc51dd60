"""One writer per output root: a lock object that works on local disks and on S3.

The lock is a small JSON object, ROOT/.mergeflow.lock, naming its holder (host, pid, start time,
a random token) and refreshed by a heartbeat thread. Every change to it is a compare-and-swap:

- create: locally a fully written temp file hard-linked into place (`link` fails when the name
  exists, and readers never see a half-written lock); on S3 a PUT with `If-None-Match: *`.
- take over a stale lock, refresh the heartbeat, release: replace or delete only if the object is
  still the version we read. On S3 that is `If-Match: <ETag>` on PUT and DELETE; locally the
  read-compare-write runs under an flock of the lock file itself (released by the kernel if we
  die), checking that its name still points at the file we locked.

A lock is stale when its heartbeat is older than the TTL, as measured by the store's own clock
(file mtime against this host's clock; S3 LastModified against the server's Date header). A pid
says nothing on its own: containers share host names and each PID namespace numbers its processes
from 1. Only a holder that provably ran in our own PID namespace on this very boot (same boot id,
same namespace inode) and whose process is gone (no such pid, or a pid reused by a process that
started later) is taken over before the TTL: a crashed merge does not block the next one for two
minutes, and a live holder elsewhere is never mistaken for a dead one. SeaweedFS 4.48 honours both conditional headers
(tests/test_lock.py checks it against a real server); a store that silently ignored them would
make two writers possible, which the read-back after each create or takeover narrows but cannot
rule out.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

from mergeflow.infra.storage import StorageOptions, is_s3, join
from mergeflow.errors import MergeflowError, StorageError

log = logging.getLogger(__name__)

LOCK_NAME = ".mergeflow.lock"
DEFAULT_TTL = 120.0  # seconds without a heartbeat after which a lock is stale
DEFAULT_HEARTBEAT = 15.0
EXIT_LOCKED = 75  # EX_TEMPFAIL: "try again later", what a scheduler should do


class LockHeld(MergeflowError):
    """Another live process holds the lock of this output."""


class LockLost(MergeflowError):
    """Our lock was taken over (our heartbeat stopped for longer than the TTL)."""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's PID namespace on this boot ("" where the kernel does not say): pids mean
    the same process only between holders that share it."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        st = os.stat("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{st.st_dev}:{st.st_ino}" if boot else ""


def process_start(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot ("" when there is no such process):
    tells a live holder from a later process that reused its pid."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""


_HELD_HERE: set[str] = set()  # tokens of the locks this process holds right now


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    command: str = ""
    pid_namespace: str = ""  # see pid_namespace(); "" for holders that cannot be judged by pid
    process_start: str = ""

    def body(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def parse(data: bytes) -> "Holder | None":
        try:
            d = json.loads(data)
            return Holder(str(d["host"]), int(d["pid"]), float(d["started"]), float(d["heartbeat"]),
                          str(d["token"]), str(d.get("command", "")), str(d.get("pid_namespace", "")),
                          str(d.get("process_start", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # unreadable: treated as stale once old enough

    def gone(self) -> bool:
        """True only when this holder ran in our PID namespace on this boot and no longer holds the
        lock: its process is gone, or it is this process and none of our live locks has its token
        (a release that failed, say while the store was unreachable)."""
        if not self.pid_namespace or self.pid_namespace != pid_namespace():
            return False
        if self.pid == os.getpid():
            return self.token not in _HELD_HERE
        return process_start(self.pid) != self.process_start

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        what = f" ({self.command})" if self.command else ""
        return f"host {self.host} pid {self.pid}{what} since {started}"


@dataclass(frozen=True)
class Seen:
    """A version of the lock object as read: its holder, an opaque version tag, its age by the store's clock."""

    holder: Holder | None
    version: str
    age: float


# --------------------------------------------------------------------------------- local files


class _LocalBackend:
    """Compare-and-swap on a local file. Replacing or deleting happens under an flock of the file
    itself, and only if the path still names the inode we locked and holds the version we read:
    a contender that waited on a file since replaced or deleted sees the change and loses."""

    def __init__(self, path: str):
        self.path = Path(path)

    def _tmp(self, body: bytes) -> Path:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, body: bytes) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(body)
        try:
            os.link(tmp, self.path)  # fails if the name exists; readers never see a half-written lock
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        return hashlib.sha256(body).hexdigest()

    def read(self) -> Seen | None:
        try:
            with open(self.path, "rb") as f:
                data, mtime = f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Seen(Holder.parse(data), hashlib.sha256(data).hexdigest(), max(0.0, time.time() - mtime))

    @contextmanager
    def _locked_if(self, version: str):
        """Yield True, holding the file's flock, when the file is still at `version`; else False."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            yield False
            return
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when f closes, also if we die
            try:
                same_inode = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same_inode = False
            yield same_inode and hashlib.sha256(f.read()).hexdigest() == version

    def replace(self, body: bytes, version: str) -> str | None:
        with self._locked_if(version) as ours:
            if not ours:
                return None
            os.replace(self._tmp(body), self.path)
        return hashlib.sha256(body).hexdigest()

    def delete(self, version: str) -> bool:
        with self._locked_if(version) as ours:
            if ours:
                self.path.unlink()
            return ours


# ------------------------------------------------------------------------------------------- S3


class _S3Backend:
    def __init__(self, uri: str, options: StorageOptions):
        from mergeflow.infra.storage import S3Storage, _split

        self.uri = uri
        self.options = options
        self.bucket, self.key = _split(uri)
        self._storage = S3Storage(options)

    @property
    def _client(self):
        from mergeflow.infra.storage import _s3_client

        return _s3_client(self.options)

    def _call(self, fn, **kwargs):
        """A request whose 412 (precondition failed) and 404 are answers, not errors."""
        from botocore.exceptions import BotoCoreError, ClientError

        from mergeflow.infra.storage import _endpoint_of, _s3_error

        try:
            return fn(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = e.response.get("Error", {}).get("Code", "")
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if status == 409:  # a concurrent conditional write in flight: as good as losing the race
                return None
            if code in ("NoSuchKey", "404", "NotFound") or status == 404 and code != "NoSuchBucket":
                return None
            raise _s3_error(self.uri, e, _endpoint_of(self._client)) from None
        except BotoCoreError as e:
            raise _s3_error(self.uri, e, _endpoint_of(self._client)) from None

    def create(self, body: bytes) -> str | None:
        # SeaweedFS (and others) create a missing bucket on PUT: make sure it exists first.
        self._storage._head(self.uri, missing_ok=True)
        resp = self._call(self._client.put_object, Body=body, IfNoneMatch="*")
        return resp and resp["ETag"]

    def read(self) -> Seen | None:
        resp = self._call(self._client.get_object)
        if resp is None:
            return None
        from mergeflow.infra.storage import _read_body

        data = _read_body(self.uri, self._client, resp)
        age = 0.0
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date and resp.get("LastModified"):
            age = max(0.0, (parsedate_to_datetime(date) - resp["LastModified"]).total_seconds())
        return Seen(Holder.parse(data), resp["ETag"], age)

    def replace(self, body: bytes, version: str) -> str | None:
        resp = self._call(self._client.put_object, Body=body, IfMatch=version)
        return resp and resp["ETag"]

    def delete(self, version: str) -> bool:
        return self._call(self._client.delete_object, IfMatch=version) is not None


# ----------------------------------------------------------------------------------------- lock


class RunLock:
    """`with RunLock(root): ...` holds ROOT/.mergeflow.lock for the block, or raises LockHeld."""

    def __init__(self, root: str, options: StorageOptions | None = None, *, ttl: float = DEFAULT_TTL,
                 heartbeat: float = DEFAULT_HEARTBEAT, command: str = ""):
        if heartbeat >= ttl:
            raise ValueError("the heartbeat interval must be shorter than the TTL")
        self.uri = join(root, LOCK_NAME)
        self.root = root
        self.ttl, self.interval, self.command = ttl, heartbeat, command
        self._backend = _S3Backend(self.uri, options or StorageOptions()) if is_s3(root) else _LocalBackend(self.uri)
        self._holder: Holder | None = None
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # heartbeat thread against release()
        self.lost = False

    # -- state of the lock object

    def holder(self) -> Seen | None:
        return self._backend.read()

    def is_stale(self, seen: Seen) -> bool:
        return seen.age > self.ttl or (seen.holder is not None and seen.holder.gone())

    # -- acquire / refresh / release

    def acquire(self) -> "RunLock":
        now = time.time()
        me = Holder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex, self.command, pid_namespace(),
                    process_start(os.getpid()))
        body = me.body()
        for _ in range(5):
            version = self._backend.create(body)
            if version is None:
                seen = self._backend.read()
                if seen is None:
                    continue  # released between our two requests: try again
                if not self.is_stale(seen):
                    raise LockHeld(self._held_message(seen))
                who = seen.holder.describe() if seen.holder else "an unreadable lock"
                log.warning("%s: taking over the stale lock of %s (heartbeat %.0fs ago)", self.root, who, seen.age)
                version = self._backend.replace(body, seen.version)
                if version is None:
                    continue  # someone else changed it first: look again
            if self._confirm(me):
                _HELD_HERE.add(me.token)
                self._holder, self._version = me, version
                self._start_heartbeat()
                return self
        seen = self._backend.read()
        raise LockHeld(self._held_message(seen) if seen else f"{self.root}: could not take the lock; retry later")

    def _confirm(self, me: Holder) -> bool:
        """Read back: a store that ignored the condition would show another writer's token here."""
        seen = self._backend.read()
        return seen is not None and seen.holder is not None and seen.holder.token == me.token

    def _held_message(self, seen: Seen) -> str:
        who = seen.holder.describe() if seen.holder else "an unreadable lock object"
        return (f"{self.root}: locked by {who}, heartbeat {seen.age:.0f}s ago; another merge into this output "
                f"is running, retry later (the lock is stale after {self.ttl:.0f}s without a heartbeat, "
                f"or once its process is gone from this PID namespace; {self.uri})")

    def refresh(self) -> bool:
        """Write a new heartbeat if the lock is still ours; False (and `lost`) if it is not."""
        with self._mutex:
            if self._holder is None or self.lost:
                return False
            h = Holder(**{**asdict(self._holder), "heartbeat": time.time()})
            version = self._backend.replace(h.body(), self._version)
            if version is None:
                self.lost = True
                log.error("%s: lost the lock (taken over after our heartbeat stalled)", self.root)
                return False
            self._holder, self._version = h, version
            return True

    def check(self) -> None:
        """Raise LockLost unless the lock is still ours: call before publishing a result."""
        seen = self._backend.read()
        if self.lost or seen is None or seen.holder is None or self._holder is None or seen.holder.token != self._holder.token:
            self.lost = True
            raise LockLost(f"{self.root}: the lock was taken over while this merge ran (heartbeat stalled for more "
                           f"than {self.ttl:.0f}s); its result is not published, run again")

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.interval):
                try:
                    if not self.refresh():
                        return
                except StorageError as e:  # a blip: try again at the next beat, the TTL leaves room
                    log.warning("%s: heartbeat failed (%s)", self.root, e)

        self._thread = threading.Thread(target=beat, name="mergeflow-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self._holder is not None:
                _HELD_HERE.discard(self._holder.token)
                try:
                    if not self.lost and not self._backend.delete(self._version):
                        log.warning("%s: the lock was no longer ours at release", self.root)
                except MergeflowError as e:  # the store is unreachable: the lock goes stale after the TTL
                    log.warning("%s: could not release the lock (%s); it is stale after %.0fs", self.root, e, self.ttl)
            self._holder = self._version = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
