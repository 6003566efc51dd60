"""Where a short merge's fixed costs go on a small machine: how idle the machine is while a local
Ray runtime starts, and what the `mergeflow` command's quick exit saves.

    .venv/bin/python bench/startup_exit.py ray                      # idle core-seconds during a Ray start
    .venv/bin/python bench/startup_exit.py exit merge.yaml --repeats 2   # normal vs quick process exit
    .venv/bin/python bench/startup_exit.py overhead merge.yaml --repeats 3   # Ray started early vs not

`ray`: in a fresh process, ray.init (as workflows/runtime.py calls it), two tasks that import
torch, ray.shutdown; busy and idle core-seconds of the whole machine from /proc/stat around it.
`exit`: runs `mergeflow merge CONFIG --overwrite --quiet --no-tracking` in a child that either
exits normally after main() or as workflows/cli.py `run` does, and prints the seconds from main()
returning to the process end.
`overhead`: `mergeflow merge CONFIG --overwrite --quiet` (tracking on, sqlite in a temp dir),
alternating the defaults ("early") with a baseline environment (`--baseline VAR=VALUE`; default
MERGEFLOW_PRESTART=0, Ray started where the merge needs it instead of as the command begins); per phase of the `wall`
line the median, and the fixed overhead (process wall time less the merge stage) of both.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RAY_CHILD = """
import time
t0 = time.perf_counter()
import ray
ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False,
         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
t1 = time.perf_counter()
@ray.remote
def warm():
    import torch
    return torch.__version__
ray.get([warm.remote(), warm.remote()])
t2 = time.perf_counter()
ray.shutdown()
print(f"ray.init {t1 - t0:.2f}s, two tasks importing torch {t2 - t1:.2f}s, shutdown {time.perf_counter() - t2:.2f}s")
"""

EXIT_CHILD = """
import atexit, os, sys, time
from mergeflow.workflows import cli
rc = cli.main(["merge", sys.argv[1], "--overwrite", "--quiet", "--no-tracking"])
print(f"MAIN_DONE {time.time():.6f}", flush=True)
if sys.argv[2] == "quick":
    atexit._run_exitfuncs()
    sys.stdout.flush()
    os._exit(rc)
"""


def _cpu() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], v[3] + v[4]  # busy, idle (+iowait), in clock ticks


def ray_idle() -> None:
    tick = os.sysconf("SC_CLK_TCK")
    busy0, idle0 = _cpu()
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", RAY_CHILD],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, RAY_AUTH_MODE="disabled"),
        check=True,
    ).stdout.strip()
    wall = time.perf_counter() - t0
    busy1, idle1 = _cpu()
    print(
        f"{out}; process {wall:.2f}s: busy {(busy1 - busy0) / tick:.1f} core-s, "
        f"idle {(idle1 - idle0) / tick:.1f} core-s of {os.cpu_count()} cores"
    )


def exit_cost(config: str, repeats: int) -> None:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    for i in range(repeats):
        for how in ("normal", "quick"):
            proc = subprocess.Popen(
                [sys.executable, "-c", EXIT_CHILD, config, how],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=ROOT,
                env=env,
            )
            done_at = None
            for line in proc.stdout:
                if line.startswith("MAIN_DONE"):
                    done_at = float(line.split()[1])
            proc.wait()
            end = time.time()
            print(f"[{i}] {how:6s} exit: {end - done_at:.2f}s from main() returning to the process end")


def _phases(stdout: str) -> dict[str, float]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("wall "))
    total, _, parts = line.removeprefix("wall").partition("s = ")
    out = {p.rsplit(" ", 1)[0]: float(p.rsplit(" ", 1)[1]) for p in parts.split(", ")}
    return out | {"wall": float(total)}


def overhead(config: str, repeats: int, tracking: bool = True, baseline: str = "MERGEFLOW_PRESTART=0") -> None:
    import statistics
    import tempfile

    runs: dict[str, list[dict[str, float]]] = {"early": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for i in range(repeats):
            for how in ("baseline", "early"):
                env = dict(os.environ, RAY_AUTH_MODE="disabled")
                if how == "baseline":
                    env.update([baseline.split("=", 1)])
                t0 = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "mergeflow.workflows.cli", "merge", config, "--overwrite", "--quiet"]
                    + (["--tracking-uri", uri] if tracking else ["--no-tracking"]),
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    env=env,
                    check=True,
                )
                phases = _phases(done.stdout) | {"process": time.perf_counter() - t0}
                phases["fixed"] = phases["process"] - phases.get("merge", 0.0)
                runs[how].append(phases)
                print(
                    f"[{i}] {how:8s} process {phases['process']:.2f}s, fixed {phases['fixed']:.2f}s: "
                    + next(ln for ln in done.stdout.splitlines() if ln.startswith("wall "))
                )
    keys = [k for k in runs["baseline"][0] if all(k in r for r in runs["early"] + runs["baseline"])]
    print(f"{'phase':14s} {'baseline':>9s} {'early':>9s}   (medians of {repeats}, seconds)")
    med = {h: {k: statistics.median(r[k] for r in runs[h]) for k in keys} for h in runs}
    for k in keys:
        print(f"{k:14s} {med['baseline'][k]:9.2f} {med['early'][k]:9.2f}")
    print(
        f"fixed overhead early/baseline: {med['early']['fixed'] / med['baseline']['fixed']:.2f}x; "
        f"process wall early/baseline: {med['early']['process'] / med['baseline']['process']:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("ray")
    e = sub.add_parser("exit")
    e.add_argument("config")
    e.add_argument("--repeats", type=int, default=2)
    o = sub.add_parser("overhead")
    o.add_argument("config")
    o.add_argument("--repeats", type=int, default=3)
    o.add_argument("--no-tracking", action="store_true", help="merge without MLflow tracking")
    o.add_argument(
        "--baseline",
        default="MERGEFLOW_PRESTART=0",
        metavar="VAR=VALUE",
        help="the environment of the baseline runs (default: Ray started where the merge needs it); "
        "MERGEFLOW_TRACKING_CHILD=0: MLflow imported in a thread of the merging process",
    )
    args = ap.parse_args()
    if args.what == "ray":
        ray_idle()
    elif args.what == "exit":
        exit_cost(args.config, args.repeats)
    else:
        overhead(args.config, args.repeats, tracking=not args.no_tracking, baseline=args.baseline)


if __name__ == "__main__":
    main()
