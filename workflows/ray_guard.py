"""A watchdog that makes a private Ray runtime die with its driver, even when the driver is
killed with SIGKILL (see "The private runtime" in docs/cluster.md).

Why it is needed: Ray gives the processes a driver starts itself (GCS, raylet, monitor, log
monitor, dashboard) PR_SET_PDEATHSIG, and workers exit soon after their raylet, but the raylet's
DashboardAgent and RuntimeEnvAgent notice a dead raylet, then block for about a minute trying to
report it to the GCS that died too (ray/_private/process_watcher.py: report_raylet_error_logs ->
publish_error_to_driver with a 60 s timeout). A driver killed every minute by cron piles them up.

How: `start(temp_dir)` launches this file as a tiny stdlib-only process in its own session (a
signal to the driver's process group does not reach it), holding the read end of a pipe whose
write end only the driver holds. When the pipe closes - the driver exited, however it ended -
the watchdog SIGKILLs every process of that runtime, then removes temp_dir. A process is of the
runtime when its command line names temp_dir (GCS, raylet, monitors: Ray passes them paths in
it), or its environment holds MARKER=temp_dir (the driver sets it while ray.init() starts the
runtime; every Ray process inherits it), or it carries a Ray title (`ray::IDLE`,
`ray::DashboardAgent`) and holds a file open under temp_dir (its logs): Ray overwrites the
command line of workers and agents with that title, and setproctitle may zero their environment
block too. The driver itself is never killed. After a normal ray.shutdown() there is nothing
left to kill and the watchdog only removes the dir.

Should a watchdog itself be killed, what it watched is reaped at a later start: every watchdog,
some seconds after it starts (when Ray's start-up is over), also reaps the runtime dirs of this
user that have been there for a minute and that no live process names on its command line (a
live runtime's watchdog, GCS and raylet all do).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time

MARKER = "MERGEFLOW_RAY_RUNTIME"
BASE, PREFIX = "/tmp", "mergeflow-ray-"  # where runtime dirs go: short, Ray's socket paths break past ~107 characters
SWEEP_AFTER = 10.0  # seconds after a watchdog starts, it reaps runtime dirs left by killed watchdogs...
STALE_AGE = 60.0  # ... that are this old
_released: list[subprocess.Popen] = []  # watchdogs set off and maybe still cleaning up: reaped later


class Guard:
    """The driver's end of one watchdog: release() (or the driver's exit) sets it off."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def release(self) -> None:
        """Close the pipe: the watchdog kills what is left of the runtime, removes its dir, exits."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
            _released.append(self._proc)


def start(temp_dir: str) -> Guard:
    """Watch `temp_dir`'s runtime from now on. Costs the driver one fork+exec (~ms); the
    watchdog's own start-up runs in parallel with Ray's."""
    _released[:] = [p for p in _released if p.poll() is None]
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), temp_dir, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        env=env,
        close_fds=True,
        start_new_session=True,
    )
    return Guard(proc)


def _names(blob: bytes, path: bytes) -> bool:
    """Whether `path` occurs in `blob` as a whole path (followed by /, a separator or the end)."""
    at = blob.find(path)
    while at >= 0:
        end = at + len(path)
        if end == len(blob) or blob[end : end + 1] in (b"/", b"\0", b" "):
            return True
        at = blob.find(path, at + 1)
    return False


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, a zombie, or not ours
        return b""


def _holds_file_under(pid: str, prefix: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            pass
    return False


def runtime_pids(temp_dir: str, spare: tuple[int, ...] = ()) -> list[int]:
    """Processes of the runtime in `temp_dir` (see the module's docstring), but this one and `spare`."""
    path = temp_dir.encode()
    entry = f"{MARKER}={temp_dir}".encode()
    skip = {str(os.getpid()), *map(str, spare)}
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:  # no procfs: nothing to find
        return found
    for name in names:
        if not name.isdigit() or name in skip:
            continue
        cmdline = _read(f"/proc/{name}/cmdline")
        if not cmdline:  # a kernel thread, a zombie, or gone
            continue
        if (
            _names(cmdline, path)
            or entry in _read(f"/proc/{name}/environ").split(b"\0")
            or (cmdline.startswith(b"ray::") and _holds_file_under(name, temp_dir + os.sep))
        ):
            found.append(int(name))
    return found


def reap(temp_dir: str, spare: tuple[int, ...] = (), timeout: float = 10.0) -> None:
    """SIGKILL the runtime's processes until none is left (or `timeout`), then remove temp_dir."""
    deadline = time.monotonic() + timeout
    while (pids := runtime_pids(temp_dir, spare)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)
    shutil.rmtree(temp_dir, ignore_errors=True)


def stale_dirs(base: str = BASE, keep: str = "") -> list[str]:
    """This user's runtime dirs under `base`, but `keep`, older than STALE_AGE that no process
    names on its command line: their watchdog is gone, and so are their GCS and raylet."""
    now, uid = time.time(), os.getuid()
    candidates = []
    try:
        with os.scandir(base) as entries:
            for e in entries:
                if e.name.startswith(PREFIX) and e.path != keep and e.is_dir(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    if st.st_uid == uid and now - st.st_mtime > STALE_AGE:
                        candidates.append(e.path)
    except OSError:
        return []
    if not candidates:
        return []
    try:
        pids = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []
    for pid in pids:
        cmdline = _read(f"/proc/{pid}/cmdline")
        if cmdline:
            candidates = [c for c in candidates if not _names(cmdline, c.encode())]
    return candidates


def sweep(base: str = BASE, keep: str = "", spare: tuple[int, ...] = ()) -> None:
    for d in stale_dirs(base, keep):
        reap(d, spare)


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or not os.path.isabs(argv[1]) or not argv[2].isdigit():
        print("usage: ray_guard.py ABSOLUTE_TEMP_DIR DRIVER_PID (stdin: a pipe from the driver)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    temp_dir, spare = argv[1], (int(argv[2]),)
    sweep_at: float | None = time.monotonic() + SWEEP_AFTER
    while True:
        wait = None if sweep_at is None else max(0.0, sweep_at - time.monotonic())
        try:
            if not select.select([0], [], [], wait)[0]:
                sweep(os.path.dirname(temp_dir), keep=temp_dir, spare=spare)
                sweep_at = None
                continue
            if not os.read(0, 4096):  # EOF: the driver closed its end or is gone
                break
        except InterruptedError:
            continue
        except OSError:
            break
    reap(temp_dir, spare)
    if sweep_at is not None:
        sweep(os.path.dirname(temp_dir), keep=temp_dir, spare=spare)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
