"""Merge throughput against the number of Ray worker processes, all measured in one run.

For each N in --workers, a Ray cluster on 127.0.0.1 offers N CPUs, so up to N shard tasks
(one worker process and one torch thread each) run at once:

  --mode cpus    one node with N CPUs: what a workstation run (`ray.init(num_cpus=N)`) gets
  --mode nodes   N nodes with one CPU each (ray.cluster_utils.Cluster): adds cross-node scheduling

All clusters are up at once, each with its own driver process that stays connected, so worker
processes start and import torch once (one untimed warm-up merge each), and the timed merges
are interleaved (N=1, 2, 4, 1, 2, 4, ...): on a shared machine, load that comes and goes then
hits every N alike instead of whichever ran during it. Prints the median wall time, GB/s of
checkpoint bytes (every input file byte) and the speed-up against the first N, with the
machine's CPU count and load average: on a machine with C cores, more than C workers cannot help.

    .venv/bin/python bench/scaling.py --workers 1,2,4 --mode cpus
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mergeflow.dev.local_cluster import LocalRayCluster


def driver(config_path: str) -> None:
    """Child mode: join RAY_ADDRESS, then run one merge per 'run' line on stdin, answering in JSON."""
    from mergeflow.workflows import runtime
    from mergeflow.workflows.config import load_config
    from mergeflow.workflows.merge import run_merge

    logging.getLogger("mergeflow.workflows.commit").setLevel(logging.ERROR)  # "--overwrite: removing ..." every time
    config = load_config(config_path)
    runtime.connect()
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0 = time.perf_counter()
        report = run_merge(config, overwrite=True, quiet=True)
        wall = time.perf_counter() - t0
        print(
            json.dumps({"wall": wall, "bytes": report.plan.input_bytes, "nodes": len(report.manifest["nodes"])}),
            flush=True,
        )
    runtime.disconnect()


class Driver:
    """One cluster of n CPUs and a driver process connected to it."""

    def __init__(self, n: int, mode: str, config: dict, root: Path):
        self.n = n
        self.cluster = LocalRayCluster(nodes=n, cpus=1) if mode == "nodes" else LocalRayCluster(nodes=1, cpus=n)
        self.config_path = root / f"config-{n}.json"
        self.config_path.write_text(json.dumps(config | {"output": str(root / f"run-{n}")}))
        self.proc: subprocess.Popen[str] | None = None
        self.walls: list[float] = []
        self.bytes = self.nodes = 0

    def connect(self) -> None:
        env = os.environ | self.cluster.driver_env()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--driver", str(self.config_path)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def merge(self) -> float:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver for {self.n} worker(s) exited with code {self.proc.wait()}")
        doc = json.loads(line)
        self.bytes, self.nodes = doc["bytes"], doc["nodes"]
        return doc["wall"]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.communicate(timeout=120)  # closes stdin: the driver disconnects
        self.cluster.stop()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--driver", metavar="CONFIG", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.driver:
        driver(args.driver)
        return

    root = Path(args.dir or tempfile.mkdtemp(prefix="mf-scaling-"))
    try:
        run(args, root)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path) -> None:
    from mergeflow.dev.synthetic import make_family
    from mergeflow.workflows.config import config_from_dict
    from mergeflow.workflows.plan import make_plan

    if not (root / "base").exists():
        make_family(root, tasks=args.tasks, layers=args.layers, hidden=args.hidden, vocab=args.vocab, shards=2)
    tasks = sorted(d for d in root.glob("task_*") if d.is_dir())[: args.tasks]
    config = {
        "base": str(root / "base"),
        "tasks": [{"name": t.name, "checkpoint": str(t)} for t in tasks],
        "output": str(root / "run"),
        "method": {"name": args.method},
        "execution": {"shard_size": args.shard_size, "hash_cache": False},
    }  # every run hashes its inputs
    shards = len(make_plan(config_from_dict(config)).shards)
    print(
        f"{args.method} merge of {len(tasks)} tasks in {shards} shards under {root}; mode {args.mode}; "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )

    drivers = [Driver(int(x), args.mode, config, root) for x in args.workers.split(",")]
    try:
        t0 = time.perf_counter()
        for d in drivers:
            d.cluster.launch()
        for d in drivers:
            d.cluster.wait()
            d.connect()
        for d in drivers:
            d.merge()  # warm-up: worker processes start and import torch
        print(f"clusters up and warm in {time.perf_counter() - t0:.0f}s; load average before: {load()}", flush=True)
        for _ in range(args.repeats):
            for d in drivers:
                d.walls.append(d.merge())
            print("  " + "  ".join(f"{d.n}: {d.walls[-1]:.2f}s" for d in drivers) + f"   (load {load()})", flush=True)
    finally:
        for d in drivers:
            d.close()

    base = statistics.median(drivers[0].walls)
    print(f"{'workers':>7} {'nodes':>5} {'median s':>9} {'min s':>7} {'max s':>7} {'GB/s':>7} {'speed-up':>8}")
    for d in drivers:
        med = statistics.median(d.walls)
        print(
            f"{d.n:>7} {d.nodes:>5} {med:9.2f} {min(d.walls):7.2f} {max(d.walls):7.2f} "
            f"{d.bytes / med / 1e9:7.3f} {base / med:8.2f}"
        )
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
