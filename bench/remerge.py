"""Add-one-task re-merge against a from-scratch merge of the same tasks, measured in the same run.

For each method: a parent run over the first T tasks is made once (not timed); then, alternating
--repeats times, (a) a from-scratch `remerge` of all T+1 tasks into an empty root (every input
hashed and read) and (b) a `remerge` of the T+1 tasks from the parent (the new run is removed and
latest.json reset after each repeat). Prints median wall time, bytes read by the shard workers
(tensor data), bytes hashed (whole input files read for sha256), and the ratios re-merge/scratch.

Inputs sit in the page cache after the first pass, so on one machine walls mostly measure compute
and copying; the byte counts are what a cold disk or S3 would have to serve.

    .venv/bin/python bench/remerge.py --dir /tmp/mf-remerge-bench --tasks 8 --layers 8 --hidden 512
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from merge_vs_floor import family_and_ray

from mergeflow.workflows.config import config_from_dict
from mergeflow.workflows.remerge import LATEST, remerge


def config(base: Path, tasks: list[Path], root: Path, method: str):
    m = {"name": method}
    if method in ("tall_masks", "consensus"):
        m["lambda"] = 0.4
    return config_from_dict(
        {
            "base": str(base),
            "tasks": [{"name": t.name, "checkpoint": str(t)} for t in tasks],
            "output": str(root),
            "method": m,
            # only what a re-merge reuses from its parent, not the machine's hash cache
            "execution": {"hash_cache": False},
        }
    )


def measure(base: Path, tasks: list[Path], root: Path, method: str):
    t0 = time.perf_counter()
    result = remerge(config(base, tasks, root, method), quiet=True)
    wall = time.perf_counter() - t0
    r = result.report
    return wall, r.bytes_read, r.bytes_hashed + result.reused.get("bytes_hashed_to_compare", 0), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where the family and runs go (default: a temp dir)")
    p.add_argument("--tasks", type=int, default=8, help="tasks after the addition (the parent has one fewer)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="task_arithmetic,tall_masks")
    args = p.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="mf-remerge-bench-"))
    base, tasks, _ = family_and_ray(root / "family", args)

    rows = []
    for method in args.methods.split(","):
        parent_root = root / f"remerge-{method}"
        shutil.rmtree(parent_root, ignore_errors=True)
        remerge(config(base, tasks[:-1], parent_root, method), quiet=True)
        latest = (parent_root / LATEST).read_bytes()
        scratch, again = [], []
        for _ in range(args.repeats):
            fresh = root / f"scratch-{method}"
            shutil.rmtree(fresh, ignore_errors=True)
            scratch.append(measure(base, tasks, fresh, method)[:3])
            *numbers, result = measure(base, tasks, parent_root, method)
            again.append(tuple(numbers))
            shutil.rmtree(result.run)
            (parent_root / LATEST).write_bytes(latest)
        rows.append((method, scratch, again, result.reused))

    print(f"\n{'':16} {'from scratch':>31} {'add-one re-merge':>31} {'re-merge / scratch':>26}")
    print(
        f"{'method':16} {'wall s':>9} {'GB read':>10} {'GB hashed':>10} {'wall s':>9} {'GB read':>10} "
        f"{'GB hashed':>10} {'wall':>8} {'read':>8} {'hashed':>8}"
    )
    for method, scratch, again, reused in rows:
        s = [statistics.median(x[i] for x in scratch) for i in range(3)]
        a = [statistics.median(x[i] for x in again) for i in range(3)]
        print(
            f"{method:16} {s[0]:9.2f} {s[1] / 1e9:10.3f} {s[2] / 1e9:10.3f} {a[0]:9.2f} {a[1] / 1e9:10.3f} "
            f"{a[2] / 1e9:10.3f} {a[0] / s[0]:8.2f} {a[1] / s[1]:8.2f} {a[2] / max(s[2], 1):8.2f}"
        )
        print(f"{'':16} reused: sum of {len(reused['sum_of_tasks'])} task(s), {reused['input_hashes']} input hash(es)")


if __name__ == "__main__":
    main()
