"""Scheduled re-merges: one locked `remerge` (what cron, a Kubernetes CronJob or Airflow runs),
and `mergeflow watch`, which runs it with --if-changed every interval.

Exit codes (also of each `watch --once` tick): 0 merged or up to date, 2 bad input or storage
error, 3 merged but MLflow tracking failed, 4 merged but the gate kept it from being published,
75 another process holds the output's lock.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.infra.lock import DEFAULT_TTL, EXIT_LOCKED, LockHeld, RunLock
from mergeflow.infra.tracking import TrackingError, TrackingOptions, redact

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `30s`, `10m`, `1.5h`, `1d` -> seconds."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise MergeflowError(f"--every {text!r}: not a duration (use e.g. 30s, 10m, 1h)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


@dataclass(frozen=True)
class Job:
    """One `mergeflow remerge` invocation, as the CLI describes it."""

    config: str
    output: str | None = None
    parent: str | None = None
    if_changed: bool = False
    keep: int = 0
    quiet: bool = False
    lock_ttl: float = DEFAULT_TTL
    ray_address: str | None = None
    device: str | None = None
    tracking: TrackingOptions = field(default_factory=TrackingOptions)
    gate: bool = False  # --gate: gate the publication (the config's gate: settings, or the defaults)
    register: str | None = None  # --register NAME: a registered model version per published run
    alias: str | None = None  # --alias: the alias moved to it (default: the config's, else "candidate")


def remerge_once(job: Job) -> int:
    """Load the config, take the output's lock, re-merge, publish, track. Prints one line per
    outcome; raises MergeflowError (LockHeld when locked) for the caller to report."""
    from mergeflow.workflows.config import load_config
    from mergeflow.workflows.gate import EXIT_GATE_FAILED
    from mergeflow.workflows.merge import register, track
    from mergeflow.workflows.remerge import remerge

    cfg = load_config(job.config, output=job.output)
    ex = cfg.execution.model_copy(
        update={k: v for k, v in {"ray_address": job.ray_address, "device": job.device}.items() if v}
    )
    cfg = cfg.model_copy(update={"execution": ex})
    cfg = with_job_options(cfg, job)
    register_config = cfg.tracking.register_
    if register_config is not None and not job.tracking.enabled:
        raise MergeflowError("tracking.register needs MLflow tracking: drop --no-tracking (or the register section)")
    command = f"mergeflow remerge {job.config}"
    with RunLock(
        cfg.output, cfg.storage.options(), ttl=job.lock_ttl, heartbeat=min(15.0, job.lock_ttl / 4), command=command
    ) as lock:
        result = remerge(cfg, parent=job.parent, if_changed=job.if_changed, quiet=job.quiet, keep=job.keep, lock=lock)
        if result.up_to_date:
            print(f"up to date (run {result.run})", flush=True)
            return 0
        r = result.report
        reused = result.reused
        notes = []
        if reused.get("sum_of_tasks"):
            notes.append(f"reused the sum of {len(reused['sum_of_tasks'])} task(s)")
        if reused.get("thresholds_of"):
            notes.append(f"reused {len(reused['thresholds_of'])} TIES threshold(s)")
        what = result.changes.describe() if result.changes else "first run"
        if r.state.value == "complete":
            print(f"published {result.run}: it already holds this merge ({what})", flush=True)
            from mergeflow.infra.storage import join, storage_for
            from mergeflow.workflows.commit import TRACKING

            if storage_for(result.run, cfg.storage.options()).exists(join(result.run, TRACKING)):
                return 0  # tracked when it was made
        else:
            print(
                f"merged {len(r.plan.tasks)} tasks with {r.plan.method.name} into {result.run} ({what}"
                f"{'; ' + ', '.join(notes) if notes else ''}; {r.bytes_read / 1e9:.3f} GB read, "
                f"{r.timings['total']:.1f}s)",
                flush=True,
            )
        try:
            run_id = track(
                r,
                Path(job.config).read_text(),
                job.tracking,
                parent_run_id=result.parent.mlflow_run_id if result.parent else None,
                gate=result.gate,
            )
            if run_id:
                print(f"mlflow      run {run_id} at {redact(job.tracking.tracking_uri())}", flush=True)
            if result.gate is not None and not result.gate.passed:
                print(
                    f"mergeflow: gate failed: {result.gate.reason}; {result.run} is kept for inspection, not published",
                    file=sys.stderr,
                    flush=True,
                )
                return EXIT_GATE_FAILED
            if result.gate is not None:
                print(f"gate        passed: {result.gate.reason}", flush=True)
            if register_config is not None and run_id:
                version = register(r, run_id, job.tracking, register_config)
                alias = f", alias {register_config.alias!r}" if register_config.alias else ""
                print(f"registry    {register_config.name!r} version {version}{alias}", flush=True)
        except TrackingError as e:
            print(f"mergeflow: error: {e}", file=sys.stderr)
            return 3
        return 0


def with_job_options(cfg, job: Job):
    """The config with the command line's --gate / --register / --alias applied."""
    from mergeflow.workflows.config import GateConfig, RegisterConfig

    changes = {}
    if job.gate and cfg.gate is None:
        if cfg.selection is None:
            raise MergeflowError("--gate: the config needs an evaluator to score runs with (selection: or gate:)")
        changes["gate"] = GateConfig()
    if job.register or job.alias:
        current = cfg.tracking.register_
        name = job.register or (current.name if current else None)
        if name is None:
            raise MergeflowError("--alias: give --register NAME too (or tracking.register in the config)")
        base = current.model_dump() if current else {}
        reg = RegisterConfig(**(base | {"name": name} | ({"alias": job.alias} if job.alias else {})))
        changes["tracking"] = cfg.tracking.model_copy(update={"register_": reg})
    return cfg.model_copy(update=changes) if changes else cfg


def watch(job: Job, every: float, once: bool = False, stop: threading.Event | None = None) -> int:
    """Run `remerge --if-changed` now and then every `every` seconds, until Ctrl-C or SIGTERM.
    A tick that fails prints one line and the next tick tries again."""
    job = replace(job, if_changed=True)
    stop = stop or threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # Kubernetes and systemd stop with SIGTERM: leave as cleanly as on Ctrl-C (lock released).
        previous = signal.signal(signal.SIGTERM, _interrupt)
    code = 0
    try:
        while True:
            started = time.monotonic()
            try:
                code = remerge_once(job)
            except LockHeld as e:
                print(f"skipped: {e}", file=sys.stderr, flush=True)
                code = EXIT_LOCKED
            except MergeflowError as e:
                print(f"mergeflow: error: {e}", file=sys.stderr, flush=True)
                code = 2
            if once:
                return code
            if stop.wait(max(0.0, every - (time.monotonic() - started))):
                return code
    except KeyboardInterrupt:
        print("watch stopped (an interrupted re-merge resumes on the next run)", file=sys.stderr, flush=True)
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
