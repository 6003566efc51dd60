"""Time (and optionally profile) one shard's work in this process, without Ray: what one
Ray worker does, with the same single torch thread.

    .venv/bin/python bench/profile_shard.py /tmp/fam --method task_arithmetic --shard 3 [--profile]

The output goes to a temp dir. Run it from another checkout (PYTHONPATH=that checkout) to
compare two versions of workers/ on the same shard.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from mergeflow.workers import kth_value
    from mergeflow.workers.methods.ties.thresholds import shard_counts, shard_sample
    from mergeflow.workers.shard import merge_shard
    from mergeflow.workflows.config import config_from_dict
    from mergeflow.workflows.plan import make_plan

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family")
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--scope", default="global")
    ap.add_argument("--shard", type=int, default=1)
    ap.add_argument(
        "--pass",
        dest="which",
        choices=["apply", "sample", "zeros", "window", "high"],
        default="apply",
        help="apply: merge_shard; sample: the TIES threshold sample; zeros / window / high: a TIES "
        "threshold counting pass of that kind (window: --window-bins high-half bins wide)",
    )
    ap.add_argument("--window-bins", type=int, default=4, help="width of the --pass window window")
    ap.add_argument("--chunk-elems", type=int, default=1 << 22)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(1)
    root = Path(args.family)
    tasks = sorted(p for p in root.glob("task_*") if p.is_dir())
    out = tempfile.mkdtemp(prefix="mfprof-", dir="/tmp")
    method = {"name": args.method}
    if args.method == "ties":
        method |= {"scope": args.scope}
    cfg = config_from_dict(
        {
            "base": str(root / "base"),
            "tasks": [{"name": t.name, "checkpoint": str(t)} for t in tasks],
            "output": out,
            "method": method,
            "execution": {"chunk_elems": args.chunk_elems},
        }
    )
    spec = make_plan(cfg).shards[args.shard]
    if args.method == "ties" and args.scope == "global":
        spec = spec.with_globals(thresholds=(1e-3,) * len(tasks), majority=1)  # any value: same work
    count = {
        "zeros": kth_value.Count("window", 0, 1),
        "window": kth_value.Count("window", 0x3A000000, args.window_bins << 16),
        "high": kth_value.Count("high"),
    }.get(args.which)
    fn = {"apply": lambda: merge_shard(spec), "sample": lambda: shard_sample(spec)}.get(
        args.which, lambda: shard_counts(spec, (count,) * len(tasks))
    )
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(
        f"shard {args.shard}: {spec.nbytes / 1e9:.3f} GB, {len(spec.tensors)} tensors; "
        f"seconds {[f'{t:.2f}' for t in times]}, "
        f"{spec.nbytes / min(times) / 1e9:.2f} GB/s"
    )
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(fn)
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
