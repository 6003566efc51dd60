"""infra/lock.py on a local disk and on a real SeaweedFS server: a second holder is refused with a
line naming the first, a dead holder's lock and an expired heartbeat are taken over, concurrent
takeovers of one stale lock have exactly one winner, and a holder whose lock was taken over
notices instead of deleting the new holder's lock."""

from __future__ import annotations

import os

# The same environment convention as test_s3_end_to_end.py: the server is started with these.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "mergeflow")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "mf-e2e-Secret-7Qx2vLp9")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import json  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mergeflow.dev.local_services import s3_client  # noqa: E402
from mergeflow.errors import StorageError  # noqa: E402
from mergeflow.infra.lock import LOCK_NAME, Holder, LockHeld, LockLost, RunLock, pid_namespace  # noqa: E402
from mergeflow.infra.storage import StorageOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(root URI, storage options, a function that writes raw bytes as the lock object, one that ages it)."""
    if request.param == "local":
        root = tmp_path / "out"
        path = root / LOCK_NAME

        def put(data: bytes) -> None:
            root.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        def age(seconds: float) -> None:
            t = time.time() - seconds
            os.utime(path, (t, t))

        return str(root), StorageOptions(), put, age
    server = request.getfixturevalue("s3_server")
    options = StorageOptions(server.endpoint.url, server.endpoint.region)
    client = s3_client(server.endpoint)
    prefix = f"lock-{uuid.uuid4().hex[:10]}"

    def put_s3(data: bytes) -> None:
        client.put_object(Bucket=server.endpoint.bucket, Key=f"{prefix}/{LOCK_NAME}", Body=data)

    return f"s3://{server.endpoint.bucket}/{prefix}", options, put_s3, None


def foreign(host: str = "elsewhere", pid: int = 4242, namespace: str = "") -> bytes:
    now = time.time()
    return Holder(host, pid, now - 3600, now, "t" * 32, "mergeflow watch cfg.yaml", namespace, "1").body()


def test_second_holder_is_refused_with_the_holder_named(where):
    root, options, _, _ = where
    with RunLock(root, options, command="first"):
        with pytest.raises(LockHeld) as err:
            RunLock(root, options).acquire()
        msg = str(err.value)
        assert "\n" not in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "(first)" in msg
    with RunLock(root, options):  # released: free again
        pass


def test_expired_heartbeat_is_taken_over(where):
    root, options, put, age = where
    put(foreign())
    with pytest.raises(LockHeld) as err:
        RunLock(root, options, ttl=600, heartbeat=1).acquire()
    assert "host elsewhere pid 4242" in str(err.value)
    if age is not None:
        age(700)
        ttl = 600
    else:  # S3: the age comes from the server's clock (LastModified, 1 s resolution): wait it out
        time.sleep(2.2)
        ttl = 1.5
    lock = RunLock(root, options, ttl=ttl, heartbeat=0.5).acquire()
    try:
        assert lock.holder().holder.pid == os.getpid()
    finally:
        lock.release()
    assert lock.holder() is None


def test_concurrent_takeovers_of_one_stale_lock_have_one_winner(where):
    root, options, put, _ = where
    put(foreign(host=socket.gethostname(), pid=dead_pid(), namespace=pid_namespace()))  # stale: its process is gone
    barrier = threading.Barrier(6)
    outcome: list[object] = []

    def contender() -> None:
        lock = RunLock(root, options, heartbeat=5)
        barrier.wait()
        try:
            outcome.append(lock.acquire())
        except LockHeld as e:
            outcome.append(e)

    threads = [threading.Thread(target=contender) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [o for o in outcome if isinstance(o, RunLock)]
    assert len(outcome) == 6 and len(winners) == 1, outcome
    assert winners[0].holder().holder.token == winners[0]._holder.token
    winners[0].release()


def test_a_lock_taken_over_is_noticed_and_not_deleted(where):
    root, options, _, _ = where
    ttl = 0.5 if not root.startswith("s3://") else 1.5  # S3 ages have 1 s resolution
    first = RunLock(root, options, ttl=ttl, heartbeat=0.1).acquire()
    first._stop.set()  # the holder stalls (a frozen process): no more heartbeats
    first._thread.join()
    time.sleep(ttl + (1.0 if root.startswith("s3://") else 0.3))
    second = RunLock(root, options, ttl=ttl, heartbeat=0.1).acquire()  # stale by age: taken over
    with pytest.raises(LockLost):
        first.check()
    assert first.refresh() is False and first.lost
    first.release()  # must not delete the new holder's lock
    assert second.holder().holder.token == second._holder.token
    second.release()
    assert second.holder() is None


def test_heartbeat_keeps_a_long_merge_locked(where):
    root, options, _, _ = where
    ttl = 0.5 if not root.startswith("s3://") else 2.0
    with RunLock(root, options, ttl=ttl, heartbeat=0.1) as lock:
        first = lock.holder().holder.heartbeat
        time.sleep(ttl + 0.5)
        assert lock.holder().holder.heartbeat > first
        with pytest.raises(LockHeld):
            RunLock(root, options, ttl=ttl, heartbeat=0.2).acquire()
        lock.check()


def dead_pid() -> int:
    """A pid that existed on this host and is gone (reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_held_by_another_process_then_recovered_after_it_dies(tmp_path):
    """Two real processes: the second is refused while the first lives, and takes over after
    the first is SIGKILLed (no chance to release), by pid, long before the TTL."""
    root = tmp_path / "out"
    script = textwrap.dedent(f"""
        import time
        from mergeflow.infra.lock import RunLock
        lock = RunLock({str(root)!r}, ttl=3600, heartbeat=60, command="holder").acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as err:
            RunLock(str(root), ttl=3600, heartbeat=60).acquire()
        assert f"pid {proc.pid} (holder)" in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    doc = json.loads((root / LOCK_NAME).read_text())
    assert doc["pid"] == proc.pid  # the dead process's lock is still there
    with RunLock(str(root), ttl=3600, heartbeat=60) as lock:
        assert lock.holder().holder.pid == os.getpid()
    assert not (root / LOCK_NAME).exists()


def test_lock_on_a_missing_bucket_fails_without_creating_it(s3_server):
    """SeaweedFS creates buckets on PUT: the lock must check the bucket first."""
    options = StorageOptions(s3_server.endpoint.url, s3_server.endpoint.region)
    bucket = f"no-such-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageError) as err:
        RunLock(f"s3://{bucket}/root", options).acquire()
    assert f"bucket {bucket!r} does not exist" in str(err.value)
    names = [b["Name"] for b in s3_client(s3_server.endpoint).list_buckets()["Buckets"]]
    assert bucket not in names


def _free_pid() -> int:
    """A pid number no process of this namespace uses right now."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(p for p in range(pid_max - 2, 1000, -1) if not Path(f"/proc/{p}").exists())


@pytest.mark.skipif(
    not Path("/usr/bin/unshare").exists() or os.geteuid() != 0, reason="needs unshare and root for a PID namespace"
)
def test_live_holder_in_another_pid_namespace_is_not_taken_over(tmp_path):
    """Containers share host names and number their own processes: a live holder in another PID
    namespace whose pid does not exist here (or is another process here) keeps its lock until the TTL."""
    root = tmp_path / "out"
    pid = _free_pid()
    holder = textwrap.dedent(f"""
        import os, time
        from mergeflow.infra.lock import RunLock
        lock = RunLock({str(root)!r}, ttl=3600, heartbeat=60, command="namespaced").acquire()
        print(os.getpid(), flush=True)
        time.sleep(600)
    """)
    # ns_last_pid makes the holder's pid one that no process of this namespace has
    inner = f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid; {sys.executable} -c {shlex.quote(holder)}"
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", inner], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        inside = int(proc.stdout.readline())
        assert inside == pid and not Path(f"/proc/{pid}").exists()  # its pid means nothing here
        with pytest.raises(LockHeld) as err:
            RunLock(str(root), ttl=3600, heartbeat=60).acquire()
        assert "(namespaced)" in str(err.value) and "\n" not in str(err.value)
    finally:
        proc.kill()
        subprocess.run(["pkill", "-KILL", "-f", "command=.namespaced."], check=False)
        proc.wait(timeout=30)


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(tmp_path):
    """Same namespace, the pid now belongs to a process that started later: the holder is gone."""
    root = tmp_path / "out"
    root.mkdir()
    now = time.time()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = Holder(socket.gethostname(), live.pid, now, now, "t" * 32, "old", pid_namespace(), "1")
        (root / LOCK_NAME).write_bytes(stale.body())
        with RunLock(str(root), ttl=3600, heartbeat=60) as lock:
            assert lock.holder().holder.pid == os.getpid()
    finally:
        live.kill()
        live.wait()


def test_a_holder_without_a_namespace_is_only_stale_after_the_ttl(tmp_path):
    """A lock written without its PID namespace (or by a host that has none) is judged by age alone."""
    root = tmp_path / "out"
    root.mkdir()
    (root / LOCK_NAME).write_bytes(foreign(host=socket.gethostname(), pid=dead_pid()))
    with pytest.raises(LockHeld):
        RunLock(str(root), ttl=3600, heartbeat=60).acquire()
    t = time.time() - 7200
    os.utime(root / LOCK_NAME, (t, t))
    with RunLock(str(root), ttl=3600, heartbeat=60) as lock:
        assert lock.holder().holder.pid == os.getpid()
