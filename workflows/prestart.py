"""Start the private Ray runtime in a background thread as a command begins, so that Ray's
seconds of start-up overlap the driver's imports (torch alone is ~1.5 s) and planning instead of
following them. `runtime.connect()` waits for that start instead of beginning another.

This module imports nothing heavy: the thread imports Ray itself. Only a private runtime starts
early; a merge that joins a cluster (an address on the command line, in RAY_ADDRESS or in the
config file) connects where it always did. MERGEFLOW_PRESTART=0 turns the early start off (the
benchmark's baseline). docs/design.md, "Fixed overhead", has the numbers.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

_lock = threading.Lock()
_thread: threading.Thread | None = None
_started = threading.Event()
_error: BaseException | None = None


def _start() -> None:
    global _error
    try:
        from mergeflow.workflows import runtime

        # Ray warns that it cannot set its SIGTERM handler outside the main thread; the command
        # sets the same one there (begin()).
        logging.getLogger("ray._private.worker").addFilter(_not_sigterm_note)
        runtime._connect_now(None)
    except BaseException as e:  # re-raised in the main thread by wait()
        _error = e
    _started.set()
    # Ray starts its GCS and raylet with PR_SET_PDEATHSIG, which Linux sends when the *thread*
    # that forked them ends: this one must live as long as the process.
    threading.Event().wait()


def _not_sigterm_note(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def config_address(path: str) -> str | None:
    """execution.ray_address of a local YAML/JSON config file, read without loading the config
    (that imports torch); "" when it names none, None when the file cannot be read here."""
    try:
        import yaml

        doc = yaml.safe_load(Path(path).read_text())
    except Exception:
        return None
    if not isinstance(doc, dict):
        return None
    execution = doc.get("execution") or {}
    return str(execution.get("ray_address") or "") if isinstance(execution, dict) else None


def begin(ray_address: str | None, config_path: str | None = None) -> bool:
    """Start a private runtime in the background for a command that will run on one, when
    nothing (the address given, RAY_ADDRESS, the config file) says it joins a cluster instead.
    True when a start began."""
    global _thread
    if ray_address or os.environ.get("RAY_ADDRESS") or os.environ.get("MERGEFLOW_PRESTART") == "0":
        return False
    if config_path is not None and config_address(config_path) != "":
        return False
    if threading.current_thread() is threading.main_thread():
        import signal
        import sys

        # What ray.init() sets in the main thread: SIGTERM exits through SystemExit, so a merge
        # stopped by a scheduler removes its partial writes as on Ctrl-C.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    with _lock:
        if _thread is None:  # once per process
            _thread = threading.Thread(target=_start, name="mergeflow-ray-start", daemon=True)
            _thread.start()
    return True


def in_flight() -> bool:
    """A background start that has not finished yet."""
    return _thread is not None and not _started.is_set()


def wait() -> None:
    """Wait for the background start, if one began; its error, if it failed, raised here once."""
    global _error
    if _thread is None:
        return
    _started.wait()
    error, _error = _error, None
    if error is not None:
        raise error
