"""Merge throughput against the number of Ray worker processes, all measured in one run.

For each N in --workers a fresh Ray cluster on 127.0.0.1 offers N CPUs, so up to N shard
tasks (one worker process and one torch thread each) run at once:

  --mode cpus    one node with N CPUs: what a workstation run (`ray.init(num_cpus=N)`) gets
  --mode nodes   N nodes with one CPU each (ray.cluster_utils.Cluster): adds cross-node scheduling

Each N gets one untimed warm-up merge (worker processes start and import torch on first
use; a long-lived cluster pays that once), then --repeats timed merges. Prints the median
wall time, GB/s of checkpoint bytes (every input file byte) and the speed-up against N=1
measured in the same run, with the machine's CPU count and load average: on a machine with
C cores, more than C workers cannot help.

    .venv/bin/python bench/scaling.py --workers 1,2,4 --mode cpus
"""

from __future__ import annotations

import os

from infra.local_cluster import LOOPBACK_ENV, LocalRayCluster

# Read by Ray when it is imported: the driver must agree with the cluster on loopback.
os.environ.update(LOOPBACK_ENV)

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from workers.synthetic import make_family  # noqa: E402
from workflows import runtime  # noqa: E402
from workflows.config import config_from_dict  # noqa: E402
from workflows.merge import run_merge  # noqa: E402
from workflows.plan import make_plan  # noqa: E402


def measure(n: int, mode: str, config, repeats: int) -> tuple[list[float], int, int]:
    """Wall seconds of `repeats` merges on a fresh n-CPU cluster; also bytes and nodes used."""
    cluster = LocalRayCluster(nodes=n, cpus=1) if mode == "nodes" else LocalRayCluster(nodes=1, cpus=n)
    cluster.start()
    try:
        runtime.connect(cluster.address)
        run_merge(config, overwrite=True, quiet=True)  # warm-up
        walls, used = [], set()
        for _ in range(repeats):
            t0 = time.perf_counter()
            report = run_merge(config, overwrite=True, quiet=True)
            walls.append(time.perf_counter() - t0)
            used |= set(report.manifest["nodes"])
        return walls, report.plan.input_bytes, len(used)
    finally:
        runtime.disconnect()
        cluster.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where the family is generated and merged (default: a temp dir)")
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts; the first is the baseline")
    p.add_argument("--mode", choices=["cpus", "nodes"], default="cpus")
    p.add_argument("--method", default="tall_masks")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--shard-size", default="32MiB", help="input bytes per shard task (enough shards for every worker)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.getLogger("workflows.commit").setLevel(logging.ERROR)  # "--overwrite: removing ..." on every repeat

    root = Path(args.dir or tempfile.mkdtemp(prefix="mf-scaling-"))
    try:
        run(args, root)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path) -> None:
    if not (root / "base").exists():
        make_family(root, tasks=args.tasks, layers=args.layers, hidden=args.hidden, vocab=args.vocab, shards=2)
    tasks = sorted(d for d in root.glob("task_*") if d.is_dir())[: args.tasks]
    config = config_from_dict({
        "base": str(root / "base"), "tasks": [{"name": t.name, "checkpoint": str(t)} for t in tasks],
        "output": str(root / "run"), "method": {"name": args.method}, "execution": {"shard_size": args.shard_size},
    })
    shards = len(make_plan(config).shards)
    print(f"{args.method} merge of {len(tasks)} tasks in {shards} shards under {root}; mode {args.mode}; "
          f"{os.cpu_count()} CPUs; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    rows = []
    for n in (int(x) for x in args.workers.split(",")):
        walls, nbytes, used = measure(n, args.mode, config, args.repeats)
        rows.append((n, statistics.median(walls), min(walls), max(walls), nbytes, used))
        print(f"  {n} worker(s): " + " ".join(f"{w:.2f}s" for w in walls), flush=True)

    base = rows[0][1]
    print(f"{'workers':>7} {'nodes':>5} {'median s':>9} {'min s':>7} {'max s':>7} {'GB/s':>7} {'speed-up':>8}")
    for n, med, lo, hi, nbytes, used in rows:
        print(f"{n:>7} {used:>5} {med:9.2f} {lo:7.2f} {hi:7.2f} {nbytes / med / 1e9:7.3f} {base / med:8.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
