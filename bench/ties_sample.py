"""How well the TIES threshold sample places each task's k-th |tau| (workers/kth_value.py).

For every task and density: the exact high-half histogram (one full pass, in this process) against
the 1/32 sample; prints the sample's worst CDF error at the k-th value's bin edges, in units of
sqrt(q(1-q)) (what SAMPLE_SLACK is), and what the planned first pass would be: a window of how many
high-half bins (Z: zeros only) and whether it holds the k-th value, or the histogram route.

    .venv/bin/python bench/ties_sample.py /tmp/pf05 [--blocks 65536,16384]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergeflow.workers import kth_value  # noqa: E402
from mergeflow.workers.methods.ties.thresholds import shard_counts, shard_sample  # noqa: E402
from mergeflow.workflows.config import config_from_dict  # noqa: E402
from mergeflow.workflows.plan import make_plan  # noqa: E402

DENSITIES = (0.5, 0.2, 0.18, 0.15, 0.1, 0.05, 0.02, 0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family")
    ap.add_argument("--blocks", default=str(kth_value.SAMPLE_BLOCK), help="comma-separated sample block sizes to try")
    args = ap.parse_args()
    torch.set_num_threads(2)

    root = Path(args.family)
    tasks = sorted(p for p in root.glob("task_*") if p.is_dir())
    cfg = config_from_dict(
        {
            "base": str(root / "base"),
            "tasks": [{"name": t.name, "checkpoint": str(t)} for t in tasks],
            "output": "/tmp/mf-ties-sample",
            "method": {"name": "ties"},
        }
    )
    plan = make_plan(cfg)
    t = len(tasks)
    t0 = time.perf_counter()
    full = (kth_value.Count("high"),) * t
    high = np.stack(kth_value.summed(full, (shard_counts(s, full) for s in plan.shards)))
    cum = np.cumsum(high, axis=1)
    total = int(cum[0, -1])
    print(
        f"{t} tasks, {total} values per task; exact histogram {time.perf_counter() - t0:.1f}s; "
        f"exact zeros per task {np.round(high[:, 0] / total, 3).tolist()} (bin 0)"
    )

    for block in (int(b) for b in args.blocks.split(",")):
        kth_value.SAMPLE_BLOCK = block
        t0 = time.perf_counter()
        sample = kth_value.Sample.empty(t)
        for s in plan.shards:
            sample = sample + shard_sample(s)[0]
        seconds = time.perf_counter() - t0
        scum = np.cumsum(sample.high, axis=1)
        n = scum[:, -1]
        print(f"\nsample blocks of {block}: {seconds:.1f}s, {int(n[0])} values per task")
        for d in DENSITIES:
            k = kth_value.kth_rank(total, d)
            q = k / total
            worst, plans = 0.0, []
            for i in range(t):
                b = int(np.searchsorted(cum[i], k))
                for edge in (b - 1, b):
                    if edge >= 0:
                        worst = max(worst, abs(scum[i, edge] / n[i] - cum[i, edge] / total) / np.sqrt(q * (1 - q)))
                c = kth_value.first_count(sample.high[i], int(sample.zeros[i]), total, k, sample.blocks)
                if c.kind == "high":
                    plans.append("hist")
                elif c.width == 1:
                    plans.append("Z ok" if k <= high[i, 0] else "Z MISS")  # bin 0 holds zeros (and denormals)
                else:
                    hit = c.lo >> 16 <= b < (c.lo + c.width) >> 16
                    plans.append(f"{c.width >> 16}b {'ok' if hit else 'MISS'}")
            print(f"  density {d:<5} error/sqrt(q(1-q)) {worst:.5f}   first pass per task: {', '.join(plans)}")


if __name__ == "__main__":
    main()
