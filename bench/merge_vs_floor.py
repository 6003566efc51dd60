"""Wall time of mergeflow merges against the I/O floor, measured in the same run.

The floor reads every input byte once and writes the output once (a plain
read-once/write-once Task Arithmetic loop over the safetensors files, no Ray).
Prints medians over --repeats alternating runs and the ratio to the floor.

    .venv/bin/python bench/merge_vs_floor.py --dir /tmp/mf-bench --tasks 4 --layers 8 --hidden 1024
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergeflow.dev.synthetic import make_family
from mergeflow.workflows import runtime
from mergeflow.workflows.config import config_from_dict
from mergeflow.workflows.merge import run_merge


def floor_task_arithmetic(base: Path, tasks: list[Path], out: Path, alpha: float = 0.3) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(base.glob("*.safetensors")):
        merged = {}
        with safe_open(f, "pt") as b:
            handles = [safe_open(t / f.name, "pt") for t in tasks]
            for name in b.keys():
                x = b.get_tensor(name)
                if not x.is_floating_point():
                    merged[name] = x
                    continue
                acc = torch.zeros_like(x, dtype=torch.float32)
                for h in handles:
                    acc += h.get_tensor(name).float() - x.float()
                merged[name] = (x.float() + alpha * acc).to(x.dtype)
        save_file(merged, out / f.name)


def family_and_ray(family: Path, args) -> tuple[Path, list[Path], int]:
    """The synthetic family under `family` (generated when absent, from args.tasks / layers /
    hidden / vocab), its input bytes, and a started local Ray runtime, whose start-up is timed apart."""
    if not (family / "base").exists():
        make_family(family, tasks=args.tasks, layers=args.layers, hidden=args.hidden, vocab=args.vocab, shards=2)
    base = family / "base"
    tasks = sorted(p for p in family.glob("task_*") if p.is_dir())[: args.tasks]
    nbytes = sum(f.stat().st_size for d in [base, *tasks] for f in d.glob("*.safetensors"))
    print(f"family: base + {len(tasks)} tasks, {nbytes / 1e9:.2f} GB of inputs under {family}")
    t0 = time.perf_counter()
    runtime.connect()
    print(f"ray start: {time.perf_counter() - t0:.1f}s (excluded below; persistent clusters pay it once)")
    return base, tasks, nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where the family is generated (default: a temp dir)")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="task_arithmetic,ties,tall_masks,consensus")
    args = p.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="mf-bench-"))
    base, tasks, nbytes = family_and_ray(root, args)

    times: dict[str, list[float]] = {"floor": []}
    for i in range(args.repeats):
        t0 = time.perf_counter()
        floor_task_arithmetic(base, tasks, root / "floor-out")
        times["floor"].append(time.perf_counter() - t0)
        for method in args.methods.split(","):
            cfg = config_from_dict(
                {
                    "base": str(base),
                    "tasks": [{"name": t.name, "checkpoint": str(t)} for t in tasks],
                    "output": str(root / f"run-{method}"),
                    "method": {"name": method},
                    "execution": {"hash_cache": False},
                }
            )  # every repeat hashes, as a first merge
            report = run_merge(cfg, overwrite=True, quiet=True)
            times.setdefault(method, []).append(report.timings["total"])
    floor = statistics.median(times["floor"])
    print(f"{'':16} {'median s':>9} {'GB/s':>7} {'x floor':>8}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:16} {m:9.2f} {nbytes / m / 1e9:7.3f} {m / floor:8.2f}")


if __name__ == "__main__":
    main()
