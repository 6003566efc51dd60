"""The `mergeflow` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from mergeflow.errors import MergeflowError

log = logging.getLogger("mergeflow")

WIRE_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")  # log requests, headers included, at DEBUG

MERGE_HELP = """\
Merge a base checkpoint and T fine-tuned checkpoints as described by CONFIG (YAML or JSON):

  base: path/or/s3://bucket/base        # HF directory or one .safetensors file
  tasks:
    - {{name: math, checkpoint: ckpts/math}}
    - {{name: code, checkpoint: ckpts/code}}    # a PEFT LoRA adapter folder works too
  output: runs/merged                   # or pass --output; or {{path: runs/merged, format: lora,
                                        #   rank: 16 | energy: 0.99 | concat: true}}: also lora/,
                                        #   the merge as a PEFT adapter on the base
  method: {{name: tall_masks, lambda: 0.4}}   # a method and its own parameters (below)
  selection:                            # needed by auto: how candidates are scored
    evaluator: pkg.module:function      # fn(model, *, task, split, checkpoint, **options) -> score
    split: val                          # alphas: [0.1 .. 1.0], lambdas: [0.2 .. 0.6], options: {{}}
  execution: {{shard_size: auto, device: auto}}   # chunk_elems: by default sized per device;
                                        # max_file_size: 5GB (model/ in one file up to it)

Methods and their parameters (defaults in brackets):
{methods}
Outputs: OUT/model (merged HF checkpoint, model card), OUT/lora (with format lora), OUT/compressed
(the bundle of a method that compresses: every task rebuilds from it), OUT/stats, and OUT/manifest.json
written last.
Re-running the same command resumes an interrupted run; a second merge into OUT exits 75.
"""


def methods_help() -> str:
    """Every registered method with its parameters, their defaults and docs (from the Params dataclass)."""
    import dataclasses
    import textwrap

    from mergeflow.workers.methods import methods

    lines = []
    for name, method in sorted(methods().items()):
        lines.append(f"  {name}: {method.summary}")
        for f in dataclasses.fields(method.Params):
            default = f.default if f.default not in (dataclasses.MISSING, "") else "required"
            head = f"    {f.name.rstrip('_')} [{'none' if default is None else default}]"
            doc = f.metadata.get("doc", "")
            if len(head) >= 29:
                lines.append(head)
                head = ""
            lines.append(textwrap.fill(doc, 100, initial_indent=f"{head:<30}", subsequent_indent=" " * 30))
    return "\n".join(lines) + "\n"


def _parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergeflow",
        description="Merge many fine-tuned checkpoints into one model, "
        "or into a compressed bundle that rebuilds each of them, on a Ray cluster.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument(
        "--debug-wire",
        action="store_true",
        help="with --debug, also log S3 and HTTP requests with their headers (these include "
        "credentials and session tokens: never paste them anywhere)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    wants_help = argv is not None and "merge" in argv and ("-h" in argv or "--help" in argv)
    m = sub.add_parser(
        "merge",
        help="run a merge described by a YAML/JSON config",  # listing methods imports torch
        description=MERGE_HELP.format(methods=methods_help() if wants_help else "  (mergeflow merge -h)\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("config", help="YAML or JSON config file")
    m.add_argument("--output", help="output directory or s3:// prefix (overrides the config's output)")
    m.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local runtime)")
    m.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where workers compute (default: auto = CUDA when the cluster has GPUs)",
    )
    m.add_argument("--overwrite", action="store_true", help="replace a finished run at the output location")
    m.add_argument("--dry-run", action="store_true", help="validate and print the plan; read no tensor data")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"
    )
    m.add_argument("--experiment", default="mergeflow", help="MLflow experiment name (default: mergeflow)")
    m.add_argument("--no-tracking", action="store_true", help="do not log the run to MLflow")
    add_registry_flags(m)
    m.add_argument(
        "--lock-ttl",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="another merge into the same output waits for the lock (exit 75); a lock without "
        "heartbeat for this long is stale and taken over (default: 120)",
    )

    r = sub.add_parser(
        "reconstruct",
        help="rebuild one task's model from a tall_masks/consensus run",
        description="Rebuild theta_0 + m_t * tau_MTL for task t as an HF checkpoint, "
        "verifying the sha256 of every file it reads.",
    )
    r.add_argument("run", help="finished run directory or s3:// prefix")
    r.add_argument("--task", required=True, help="task name as in the merge config")
    r.add_argument("--output", required=True, help="directory or s3:// prefix for the rebuilt checkpoint")
    r.add_argument("--ray-address", help="Ray cluster to join")
    r.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 or AWS)")
    r.add_argument("--overwrite", action="store_true", help="write into a non-empty output")
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("inspect", help="summarise a finished run: method, tasks, sizes, mask statistics")
    i.add_argument("run", help="finished run directory or s3:// prefix")
    i.add_argument("--layers", action="store_true", help="also print per-layer mask density")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.add_argument("--endpoint-url", help="S3-compatible endpoint")

    f = sub.add_parser("make-family", help="generate a synthetic base + fine-tuned family (for demos and tests)")
    f.add_argument("dir", help="where to write base/ and task_XX/")
    f.add_argument("--tasks", type=int, default=6)
    f.add_argument("--layers", type=int, default=8)
    f.add_argument("--hidden", type=int, default=256)
    f.add_argument("--vocab", type=int, default=2048)
    f.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    f.add_argument("--shards", type=int, default=2, help="safetensors files per checkpoint")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--method", default="tall_masks", help="method written into the generated config.yaml")

    _add_remerge_parsers(sub)

    from mergeflow.dev.suite.cli import add_parser as _add_suite_parser

    _add_suite_parser(sub)
    return p


REMERGE_HELP = """\
Re-merge CONFIG into a new run under its output ROOT, reusing the parent run's work:

  ROOT/runs/<UTC stamp>/   one complete run per re-merge (manifest.json names its parent)
  ROOT/latest.json         the newest run; the default parent (else ROOT itself, if `merge` wrote it)
  ROOT/.mergeflow.lock     held while it runs: a second scheduler exits with code 75

Inputs are compared by content hash. Task Arithmetic with tasks appended at the end adds them to
the previous sum (bit-identical to a from-scratch merge, reading only that sum, the base and the new
tasks); TIES thresholds are reused per task; anything else that changed is recomputed. Tasks come
from the config's list or from `tasks_from: DIR_OR_S3_PREFIX` (one sub-folder per task).

With --gate (or `gate:` in the config), the new run is scored against its parent on validation data
and published (latest.json, registry alias) only when no task drops by more than max_task_drop and
the mean does not drop; new tasks must beat the base. With --register NAME (or tracking.register),
each published run becomes a version of that MLflow registered model, its alias moved to it.

Exit codes: 0 merged or up to date, 2 bad input, 3 merged but tracking failed, 4 merged but the gate
failed (kept, not published), 75 locked.
"""


def add_registry_flags(p) -> None:
    p.add_argument(
        "--register",
        metavar="NAME",
        help="make the run a version of this MLflow registered model "
        "(its source the run's model/; default: the config's tracking.register)",
    )
    p.add_argument("--alias", help="the registered model alias moved to the new version (default: candidate)")


def _add_remerge_parsers(sub) -> None:
    def common(p) -> None:
        p.add_argument("config", help="YAML or JSON config file (re-read at every run)")
        p.add_argument("--output", help="output root (overrides the config's output)")
        p.add_argument("--keep", type=int, default=0, metavar="N", help="keep only the newest N runs (default: all)")
        p.add_argument(
            "--lock-ttl",
            type=float,
            default=120.0,
            metavar="SECONDS",
            help="a lock without heartbeat for this long is stale and taken over (default: 120)",
        )
        p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local runtime)")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where workers compute")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument(
            "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"
        )
        p.add_argument("--experiment", default="mergeflow", help="MLflow experiment name (default: mergeflow)")
        p.add_argument("--no-tracking", action="store_true", help="do not log runs to MLflow")
        add_registry_flags(p)
        p.add_argument(
            "--gate",
            action="store_true",
            help="publish a new run only when it scores as well as its parent on validation data "
            "(the config's gate: settings, else: no task drops by more than 0.005, the mean "
            "does not drop, new tasks beat the base); exit 4 otherwise",
        )

    r = sub.add_parser(
        "remerge",
        help="refresh a merge after tasks were added, removed or replaced",
        description=REMERGE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(r)
    r.add_argument("--from", dest="parent", metavar="RUN", help="parent run (default: the run ROOT/latest.json names)")
    r.add_argument(
        "--if-changed",
        action="store_true",
        help="do nothing (exit 0, one line) when the inputs and settings equal the parent's",
    )

    w = sub.add_parser(
        "watch",
        help="poll the task registry and re-merge when it changes",
        description="Run `remerge --if-changed` now and then every --every, under the output's "
        "lock; Ctrl-C or SIGTERM stops it. Exit codes as for remerge.",
    )
    common(w)
    w.add_argument("--every", default="10m", help="poll interval: 30s, 10m, 1h (default: 10m)")
    w.add_argument("--once", action="store_true", help="one tick, then exit with its code")


def _job(args):
    from mergeflow.infra.tracking import TrackingOptions
    from mergeflow.workflows.watch import Job

    return Job(
        config=args.config,
        output=args.output,
        parent=getattr(args, "parent", None),
        if_changed=getattr(args, "if_changed", False),
        keep=args.keep,
        quiet=args.quiet,
        lock_ttl=args.lock_ttl,
        ray_address=args.ray_address,
        device=args.device,
        tracking=TrackingOptions(enabled=not args.no_tracking, uri=args.tracking_uri, experiment=args.experiment),
        gate=args.gate,
        register=args.register,
        alias=args.alias,
    )


def _remerge(args) -> int:
    from mergeflow.workflows.watch import remerge_once

    return remerge_once(_job(args))


def _watch(args) -> int:
    from mergeflow.workflows.watch import parse_duration, watch

    return watch(_job(args), parse_duration(args.every), once=args.once)


def _merge(args) -> int:
    if _AS_COMMAND and not args.dry_run:  # not for main() called in a process that has its own Ray
        from mergeflow.workflows import prestart

        prestart.begin(args.ray_address, args.config)  # Ray's start-up overlaps the imports below
        if not args.no_tracking and os.environ.get("MERGEFLOW_TRACKING_CHILD", "1") != "0":
            from mergeflow.infra import tracking

            tracking.use_child()  # MLflow imports in a child process while the merge runs

    from mergeflow.workflows import timings

    started = time.perf_counter()
    startup = timings.process_age() or 0.0
    from mergeflow import api
    from mergeflow.infra.tracking import TrackingError, redact
    from mergeflow.workflows import merge as _engine  # noqa: F401  (torch and the engine: timed apart)

    imports = time.perf_counter() - started

    where = dict(output=args.output, ray_address=args.ray_address, device=args.device)
    if args.dry_run:
        plan = api.plan(args.config, **where)
        print(plan.describe())
        for s in plan.shards:
            print(f"  shard {s.part}: {len(s.tensors)} tensors, {s.nbytes / 1e6:.1f} MB of input")
        return 0
    code = 0
    try:
        result = api.merge(
            args.config,
            **where,
            overwrite=args.overwrite,
            quiet=args.quiet,
            lock_ttl=args.lock_ttl,
            tracking=not args.no_tracking,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            register=args.register,
            alias=args.alias,
        )
    except TrackingError as e:
        # The merge is committed; exit non-zero so a pipeline notices the missing run record.
        result, code = e.result, 3
        error = f"mergeflow: error: {e}"
    if result.already_complete:
        late = "; not logged to MLflow yet, logging it" if result.mlflow_run_id else ""
        print(f"{result.output}: already complete (same inputs and settings){late or '; nothing to do'}")
    else:
        report = result.report
        t = report.timings
        print(
            f"merged {len(report.plan.tasks)} tasks with {report.plan.method.name} into {result.output} "
            f"in {t['total']:.1f}s ({report.shards_run} shards computed, {report.shards_reused} reused; "
            f"{report.bytes_read / 1e9:.3f} GB read)"
        )
        from mergeflow.workflows.inspect_run import describe

        t0 = time.perf_counter()
        print(describe(result.output, report.plan.config.storage.options()))
        report.timings["summary"] = time.perf_counter() - t0
        report.timings["imports"] = imports
    if result.mlflow_run_id:
        from mergeflow.infra.tracking import TrackingOptions

        uri = TrackingOptions(uri=args.tracking_uri).tracking_uri()
        print(f"mlflow      run {result.mlflow_run_id} at {redact(uri)}")
    if result.model_version:
        print(f"registry    {result.model_version}")
    if not result.already_complete:
        wall = startup + time.perf_counter() - started
        print(timings.wall_line(result.report.timings, startup, wall))
        _EXIT_NOTE.append(time.perf_counter())
    if code:
        print(error, file=sys.stderr)
    return code


def _options(args):
    from mergeflow.infra.storage import StorageOptions

    return StorageOptions(endpoint_url=getattr(args, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3"))


def _normalize(uri: str) -> str:
    from mergeflow.infra.storage import normalize

    return normalize(uri)


def _reconstruct(args) -> int:
    from mergeflow.workflows.reconstruct import reconstruct

    out = reconstruct(
        _normalize(args.run),
        args.task,
        _normalize(args.output),
        _options(args),
        ray_address=args.ray_address,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    size = sum(f["size"] for f in out["files"].values())
    print(f"rebuilt task {args.task!r} into {args.output} ({len(out['files'])} file(s), {size / 1e6:.1f} MB)")
    return 0


def _inspect(args) -> int:
    from mergeflow.workflows.inspect_run import describe, layers_table
    from mergeflow.workflows.reconstruct import load_run

    run = _normalize(args.run)
    if args.json:
        print(json.dumps(load_run(run, _options(args)), indent=1))
        return 0
    print(describe(run, _options(args)))
    if args.layers:
        for layer, entry in layers_table(run, _options(args)).items():
            dens = entry.get("mask_density")
            cells = " ".join(f"{v:6.1%}" for v in dens.values()) if dens else ""
            print(f"  {layer:<40} {entry['numel']:>12,} {cells}")
    return 0


def _make_family(args) -> int:
    import torch
    import yaml

    from mergeflow.dev.synthetic import make_family

    root = Path(args.dir)
    base, tasks = make_family(
        root,
        tasks=args.tasks,
        layers=args.layers,
        hidden=args.hidden,
        vocab=args.vocab,
        dtype=getattr(torch, args.dtype),
        shards=args.shards,
        seed=args.seed,
    )
    config = {
        "base": "base",
        "tasks": [{"name": n, "checkpoint": p.name} for n, p in tasks],
        "output": "run",
        "method": {"name": args.method},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote base and {len(tasks)} tasks under {root}; config: {root / 'config.yaml'}")
    return 0


def _suite(args) -> int:
    from mergeflow.dev.suite.cli import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # keep MLflow's INFO chatter out of our output
    args = _parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.debug and not args.debug_wire:
        # botocore's debug log dumps every request with its headers: credentials and session tokens
        for name in WIRE_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    commands = {
        "merge": _merge,
        "reconstruct": _reconstruct,
        "inspect": _inspect,
        "make-family": _make_family,
        "suite": _suite,
        "remerge": _remerge,
        "watch": _watch,
    }
    from mergeflow.infra.lock import EXIT_LOCKED, LockHeld

    try:
        return commands[args.command](args)
    except LockHeld as e:  # not a failure: another scheduler is on it; retry later
        print(f"mergeflow: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except MergeflowError as e:
        if args.debug:
            raise
        print(f"mergeflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergeflow: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


_EXIT_NOTE: list[float] = []  # when a merge printed its wall line
_AS_COMMAND = False  # main() runs as the `mergeflow` command (run()), which owns its process


def run() -> None:
    """The `mergeflow` command: main(), then a quick exit.

    Once main() has returned, the atexit handlers finish what a run needs (the flushes of logging
    and MLflow; a private Ray runtime is left to its watchdog, which ends it as soon as this
    process is gone, instead of Ray's own shutdown); what the interpreter does after them, tearing down torch, Ray
    and every other module object by object, takes about a second per command and nothing
    depends on it, so the process ends there. A command that ends while its runtime is still
    starting in the background (workflows/prestart.py: it failed early, or the driver computed
    every shard itself) does not wait for that start; the watchdog reaps the runtime. Errors raised
    out of main() exit the usual way."""
    import atexit
    import threading

    global _AS_COMMAND
    _AS_COMMAND = True
    rc = main()
    if "ray" in sys.modules:  # a command that started no runtime need not import Ray to find out
        from mergeflow.workflows import runtime

        runtime.leave_to_watchdog()
    for t in threading.enumerate():  # what a normal exit waits for before the atexit handlers
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    if _EXIT_NOTE:  # after the wall line: the shutdown of Ray and MLflow it could not include
        print(f"exit        {time.perf_counter() - _EXIT_NOTE[0]:.1f}s (MLflow and logging flushed)")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    run()
