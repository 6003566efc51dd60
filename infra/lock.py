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

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from mergeflow.errors import MergeflowError, StorageError
from mergeflow.infra.storage import StorageOptions, join, storage_for

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
    def parse(data: bytes) -> Holder | None:
        try:
            d = json.loads(data)
            return Holder(
                str(d["host"]),
                int(d["pid"]),
                float(d["started"]),
                float(d["heartbeat"]),
                str(d["token"]),
                str(d.get("command", "")),
                str(d.get("pid_namespace", "")),
                str(d.get("process_start", "")),
            )
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


# ----------------------------------------------------------------------------------------- lock


class RunLock:
    """`with RunLock(root): ...` holds ROOT/.mergeflow.lock for the block, or raises LockHeld."""

    def __init__(
        self,
        root: str,
        options: StorageOptions | None = None,
        *,
        ttl: float = DEFAULT_TTL,
        heartbeat: float = DEFAULT_HEARTBEAT,
        command: str = "",
    ):
        if heartbeat >= ttl:
            raise ValueError("the heartbeat interval must be shorter than the TTL")
        self.uri = join(root, LOCK_NAME)
        self.root = root
        self.ttl, self.interval, self.command = ttl, heartbeat, command
        self._store = storage_for(self.uri, options or StorageOptions())
        self._holder: Holder | None = None
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # heartbeat thread against release()
        self.lost = False

    # -- state of the lock object

    def holder(self) -> Seen | None:
        return self._read()

    def _read(self) -> Seen | None:
        v = self._store.read_versioned(self.uri)
        return None if v is None else Seen(Holder.parse(v.data), v.version, v.age)

    def is_stale(self, seen: Seen) -> bool:
        return seen.age > self.ttl or (seen.holder is not None and seen.holder.gone())

    # -- acquire / refresh / release

    def acquire(self) -> RunLock:
        now = time.time()
        me = Holder(
            socket.gethostname(),
            os.getpid(),
            now,
            now,
            uuid.uuid4().hex,
            self.command,
            pid_namespace(),
            process_start(os.getpid()),
        )
        body = me.body()
        _HELD_HERE.add(me.token)  # from the first write on: other threads here must not take it for a dead lock
        try:
            for _ in range(5):
                version = self._store.create_if_absent(self.uri, body)
                if version is None:
                    seen = self._read()
                    if seen is None:
                        continue  # released between our two requests: try again
                    if not self.is_stale(seen):
                        raise LockHeld(self._held_message(seen))
                    who = seen.holder.describe() if seen.holder else "an unreadable lock"
                    log.warning("%s: taking over the stale lock of %s (heartbeat %.0fs ago)", self.root, who, seen.age)
                    version = self._store.replace_if_match(self.uri, body, seen.version)
                    if version is None:
                        continue  # someone else changed it first: look again
                if self._confirm(me):
                    self._holder, self._version = me, version
                    self._start_heartbeat()
                    return self
            seen = self._read()
            raise LockHeld(self._held_message(seen) if seen else f"{self.root}: could not take the lock; retry later")
        except BaseException:
            _HELD_HERE.discard(me.token)
            raise

    def _confirm(self, me: Holder) -> bool:
        """Read back: a store that ignored the condition would show another writer's token here."""
        seen = self._read()
        return seen is not None and seen.holder is not None and seen.holder.token == me.token

    def _held_message(self, seen: Seen) -> str:
        who = seen.holder.describe() if seen.holder else "an unreadable lock object"
        return (
            f"{self.root}: locked by {who}, heartbeat {seen.age:.0f}s ago; another merge into this output "
            f"is running, retry later (the lock is stale after {self.ttl:.0f}s without a heartbeat, "
            f"or once its process is gone from this PID namespace; {self.uri})"
        )

    def refresh(self) -> bool:
        """Write a new heartbeat if the lock is still ours; False (and `lost`) if it is not."""
        with self._mutex:
            if self._holder is None or self.lost:
                return False
            h = Holder(**{**asdict(self._holder), "heartbeat": time.time()})
            version = self._store.replace_if_match(self.uri, h.body(), self._version)
            if version is None:
                self.lost = True
                log.error("%s: lost the lock (taken over after our heartbeat stalled)", self.root)
                return False
            self._holder, self._version = h, version
            return True

    def check(self) -> None:
        """Raise LockLost unless the lock is still ours: call before publishing a result."""
        seen = self._read()
        if (
            self.lost
            or seen is None
            or seen.holder is None
            or self._holder is None
            or seen.holder.token != self._holder.token
        ):
            self.lost = True
            raise LockLost(
                f"{self.root}: the lock was taken over while this merge ran (heartbeat stalled for more "
                f"than {self.ttl:.0f}s); its result is not published, run again"
            )

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
                    if not self.lost and not self._store.delete_if_match(self.uri, self._version):
                        log.warning("%s: the lock was no longer ours at release", self.root)
                except MergeflowError as e:  # the store is unreachable: the lock goes stale after the TTL
                    log.warning("%s: could not release the lock (%s); it is stale after %.0fs", self.root, e, self.ttl)
            self._holder = self._version = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
