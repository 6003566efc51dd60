"""sha256 of a merge's input files for its manifest, computed while the merge runs.

Where the hashing runs matters on a small machine: it costs about a CPU-second per GB, and a
local Ray runtime takes seconds to start with most of the machine idle (on 2 cores, ~10 of the
~23 core-seconds of start-up and first task go unused, measured). So a merge on this machine
hashes in driver threads started *before* Ray (hashlib releases the GIL on large buffers), and
the hashing is mostly done by the time the first shard runs. A merge that joins a cluster by
address hashes with Ray tasks instead: on the cluster's nodes, next to the data, not through the
driver's network link.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from typing import Any

from mergeflow.infra.storage import StorageOptions, sha256_of
from mergeflow.workflows import runtime

MAX_THREADS = 4  # hashing is CPU-bound; more threads than cores only contend


def _lowest_priority() -> None:
    """Nice this thread to 19, so it takes the CPU time Ray's start-up and workers leave idle
    rather than competing with them (Linux: a thread id is a valid PRIO_PROCESS target)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass  # elsewhere hashing just runs at normal priority


def hash_in_driver(ray_address: str | None) -> bool:
    """In driver threads unless the merge joins a cluster (an address, or RAY_ADDRESS)."""
    return not (ray_address or os.environ.get("RAY_ADDRESS"))


class InputHashes:
    """Hashes of `files`: driver threads start on construction, Ray tasks at `connected()` (a task
    submitted before the driver joins its cluster would start a local Ray runtime instead);
    `result()` waits for them."""

    def __init__(self, files: list[str], options: StorageOptions, *, in_driver: bool):
        self.files = list(files)
        self.in_driver = in_driver
        self._cancelled = threading.Event()
        if in_driver:
            self._futures: dict[str, Any] = {f: Future() for f in self.files}
            self._queue = list(reversed(self.files))
            self._lock = threading.Lock()
            threads = min(len(self.files), os.cpu_count() or 1, MAX_THREADS)
            for _ in range(threads):
                # daemon: a failed merge exits without waiting for a file half hashed
                threading.Thread(target=self._work, args=(options,), daemon=True, name="mergeflow-hash").start()
        self._options = options
        self._refs: dict[str, Any] | None = None

    @classmethod
    def start(cls, files: list[str], options: StorageOptions, ray_address: str | None) -> InputHashes:
        return cls(files, options, in_driver=hash_in_driver(ray_address))

    def connected(self) -> None:
        """Ray is initialised: start the hashing tasks of a merge that hashes on the cluster."""
        if not self.in_driver and self._refs is None:
            self._refs = dict(zip(self.files, runtime.submit(sha256_of, [(f, self._options) for f in self.files])))

    def _work(self, options: StorageOptions) -> None:
        _lowest_priority()
        while not self._cancelled.is_set():
            with self._lock:
                if not self._queue:
                    return
                f = self._queue.pop()
            future = self._futures[f]
            try:
                future.set_result(sha256_of(f, options))
            except BaseException as e:  # noqa: BLE001 - re-raised by result() in the driver
                future.set_exception(e)

    def for_tasks(self) -> dict[str, Any]:
        """uri -> sha256, or a Ray object ref that resolves to it when passed to a task."""
        if self.in_driver:
            return self.result()
        self.connected()
        return dict(self._refs)

    def result(self) -> dict[str, str]:
        """uri -> sha256 of every file; the first failure is raised."""
        if self.in_driver:
            return {f: self._futures[f].result() for f in self.files}
        self.connected()
        return dict(zip(self.files, runtime.gather(list(self._refs.values()))))

    def cancel(self) -> None:
        """Stop hashing for a run that failed: driver threads finish the file in hand only."""
        self._cancelled.set()
        if self._refs:
            runtime.cancel(list(self._refs.values()))
