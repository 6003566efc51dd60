"""Run a command and measure its whole process tree: wall time, peak memory, bytes read.

Ray starts its GCS, raylet and worker processes as descendants of the driver, so the
tree is what a user pays for. Memory is sampled from /proc: the peak over samples of the
summed RSS, and of the summed PSS (proportional set size: shared pages such as Ray's
object store or torch's libraries counted once across the tree, which RSS would count in
every process that maps them). Bytes read are the summed `rchar` of /proc/PID/io: read()
and pread() calls, including page-cache hits, but not pages reached through mmap.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Measured:
    wall: float
    peak_rss: int  # bytes, max over samples of the tree's summed RSS
    peak_pss: int  # bytes, same with PSS
    peak_anon: int  # bytes, same with PSS of anonymous and shared-memory pages only: without the
    # file-backed pages of mmapped inputs, which are page cache the kernel can drop at will
    rchar: int  # bytes read through syscalls by the tree (last sample of each process)
    cpu: float  # user + system CPU seconds of the tree (robust to machine load): the larger of the
    # kernel's account of reaped descendants (exact for a single process; Ray's workers are not
    # reaped through the driver) and the sum of each process's last sampled CPU time (misses up
    # to one sample interval at the end of each process)
    returncode: int
    output: str


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _tree(root: int) -> set[int]:
    kids = _children_map()
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += kids.get(pid, [])
    return out


def _memory(pid: int) -> tuple[int, int, int]:
    """(PSS, RSS, PSS of anonymous + shmem pages) in bytes."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        return 0, 0, 0
    rss = pss = anon = 0
    for line in text.splitlines():
        if line.startswith(b"Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith(b"Pss:"):
            pss = int(line.split()[1]) * 1024
        elif line.startswith((b"Pss_Anon:", b"Pss_Shmem:")):
            anon += int(line.split()[1]) * 1024
    return pss, rss, anon


TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _rchar(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run(
    cmd: list[str],
    *,
    env: dict | None = None,
    cwd: str | None = None,
    interval: float = 1.0,
    rescan: float = 2.0,
    timeout: float | None = None,
) -> Measured:
    """Run cmd to completion, sampling its process tree every `interval` s from a thread (the
    tree itself is re-discovered every `rescan` s: a full /proc scan costs ~25 ms here, reading a Ray
    worker's smaps_rollup a few ms; at 0.2 s sampling the sampler took ~19% of a core). The
    wall time is taken when the process exits, not at a sample."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stop = threading.Event()
    peaks = {"rss": 0, "pss": 0, "anon": 0}
    reads: dict[int, int] = {}
    cpus: dict[int, float] = {}

    def sample() -> None:
        pids: set[int] = {proc.pid}
        last_scan = 0.0
        while not stop.is_set():
            now = time.perf_counter()
            if now - last_scan >= rescan:
                pids = _tree(proc.pid) | {proc.pid}
                last_scan = now
            pss = rss = anon = 0
            for pid in pids:
                p, r, a = _memory(pid)
                pss, rss, anon = pss + p, rss + r, anon + a
                got = _rchar(pid)
                if got is not None:
                    reads[pid] = got
                used = _cpu_seconds(pid)
                if used is not None:
                    cpus[pid] = used
            peaks["pss"], peaks["rss"] = max(peaks["pss"], pss), max(peaks["rss"], rss)
            peaks["anon"] = max(peaks["anon"], anon)
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stop.set()
    sampler.join()
    cpu = max((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), sum(cpus.values()))
    return Measured(
        wall,
        peaks["rss"],
        peaks["pss"],
        peaks["anon"],
        sum(reads.values()),
        cpu,
        proc.returncode,
        out.decode(errors="replace"),
    )
