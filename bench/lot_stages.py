"""LOT's time per stage (feature statistics, closed-form solve) against Task Arithmetic's merge of
the same suite, measured in the same run.

Builds (or reuses) the digits suite, then alternates --repeats times: a TA merge, a LOT merge with
an empty statistics cache (features computed) and a LOT merge whose statistics come from the cache.
Ray start is excluded (a persistent cluster pays it once). Prints medians and ratios to TA's merge.

    .venv/bin/python bench/lot_stages.py --dir suite-out --tasks 8
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from mergeflow.dev.suite.models import build_suite
from mergeflow.workflows import runtime
from mergeflow.workflows.config import config_from_dict
from mergeflow.workflows.merge import run_merge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="suite-out", help="suite folder (built when missing; default: suite-out)")
    p.add_argument("--tasks", type=int, choices=[8, 14, 20], default=8)
    p.add_argument(
        "--exemplars",
        type=int,
        default=256,
        help="per task (default 256, as the suite report: the MLP sees one row per exemplar)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args()

    suite = Path(args.dir).resolve()
    meta = build_suite(suite, tasks=args.tasks)
    names = [t["name"] for t in meta["tasks"]]
    work = Path(tempfile.mkdtemp(prefix="mf-lot-bench-"))
    t0 = time.perf_counter()
    runtime.connect()
    print(f"suite: {len(names)} tasks under {suite}; ray start {time.perf_counter() - t0:.1f}s (excluded)")

    def merge(method: dict, out: str) -> dict[str, float]:
        cfg = config_from_dict(
            {
                "base": str(suite / "base"),
                "tasks": [{"name": n, "checkpoint": str(suite / n)} for n in names],
                "output": str(work / out),
                "method": method,
                "execution": {"device": args.device, "hash_cache": False},
            }
        )
        return run_merge(cfg, overwrite=True, quiet=True).timings

    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        ta = merge({"name": "task_arithmetic"}, "ta")
        times.setdefault("TA merge", []).append(ta["merge"])
        times.setdefault("TA total", []).append(ta["total"])
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        lot = {"name": "lot", "model": "suite", "exemplars": args.exemplars, "stats_cache": str(cache)}
        cold = merge(lot, "lot")
        times.setdefault("LOT features (computed)", []).append(cold["lot_features"])
        times.setdefault("LOT solve (merge)", []).append(cold["merge"])
        times.setdefault("LOT total (cold cache)", []).append(cold["total"])
        warm = merge(lot, "lot")
        times.setdefault("LOT features (cached)", []).append(warm["lot_features"])
        times.setdefault("LOT total (warm cache)", []).append(warm["total"])
    base = statistics.median(times["TA merge"])
    print(f"{'stage':<26} {'median s':>9} {'x TA merge':>11}   ({args.repeats} repeats)")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<26} {m:9.3f} {m / base:11.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
