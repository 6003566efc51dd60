"""MLflow in a child process, for the `mergeflow merge` command.

Importing MLflow takes ~3 CPU-seconds on a small machine. In the merging process it competes
with the merge for the GIL; after the commit it is on the critical path. A child started as the
command begins imports MLflow at a low CPU priority (it runs on what Ray's start and the shards
leave idle), then serves the tracking calls the merge makes after its commit, one at a time,
over a pipe. Its exceptions come back as themselves, so a tracking failure is still a
TrackingError (exit 3). docs/design.md, "Tracking", has the measurements.

The protocol: the parent writes pickled (function name, kwargs) to the child's stdin and reads
a pickled ("ok", value) or ("raise", exception) from the child's original stdout; the child's
own prints go to stderr. EOF on stdin ends the child (so does the parent's death).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import traceback

from mergeflow.errors import MergeflowError

__all__ = ["Child", "start"]

NICE = 10  # the import yields to the merge; logging, once the merge waits for it, has the CPUs to itself
SERVED = ("log_merge", "register_model")


class ChildGone(MergeflowError):
    """The tracking process ended before it answered."""


class Child:
    """A started tracking process and the lock that keeps its calls one at a time."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc
        self._lock = threading.Lock()

    def call(self, function: str, kwargs: dict):
        """Run tracking.FUNCTION(**kwargs) in the child; its return value, or its exception raised here."""
        with self._lock:
            try:
                pickle.dump((function, kwargs), self._proc.stdin)
                self._proc.stdin.flush()
                status, value = pickle.load(self._proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                code = self._proc.poll()
                raise ChildGone(f"the tracking process exited (code {code}) before answering: {exc}") from exc
        if status == "raise":
            raise value
        return value

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()  # it ends at EOF; kill() if still importing, nothing is lost
            except OSError:
                pass
            self._proc.kill()
        self._proc.wait()


def start() -> Child | None:
    """Start the tracking process (None where it cannot start: tracking then runs in this process)."""
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mergeflow.infra.tracking_child", json.dumps(_log_levels())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    except OSError:
        return None
    child = Child(proc)
    atexit.register(child.close)
    return child


def _log_levels() -> dict[str, int]:
    """This process's logger levels (root and those set by name), for the child's log to match."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _serve() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # MLflow's own prints must not break the protocol
    requests = sys.stdin.buffer
    levels = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    logging.basicConfig(level=levels.pop("", logging.WARNING), format="%(levelname)s %(name)s: %(message)s")
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        os.nice(NICE)
    except OSError:
        pass
    from mergeflow.infra import tracking

    tracking.import_mlflow()
    while True:
        try:
            name, kwargs = pickle.load(requests)
        except EOFError:
            return
        try:
            if name not in SERVED:
                raise RuntimeError(f"the tracking process serves {SERVED}, not {name!r}")
            reply = ("ok", getattr(tracking, name)(**kwargs))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent as itself
            reply = ("raise", _picklable(exc))
        pickle.dump(reply, replies)
        replies.flush()


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception that does not pickle comes back as its traceback
        return RuntimeError("".join(traceback.format_exception(exc)))


if __name__ == "__main__":
    _serve()
