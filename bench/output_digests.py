"""Run a fixed set of merges through the `mergeflow` command and record the sha256 of every output
file, so that a refactor can be checked to change no output byte.

    .venv/bin/python bench/output_digests.py --work /tmp/digests --json before.json
    ... change the code ...
    .venv/bin/python bench/output_digests.py --work /tmp/digests2 --json after.json --compare before.json

Every case is a real merge on a local Ray runtime (tracking off): each method and its main
variants, several shard and chunk layouts, bf16, fp16 and fp32 families, a Task Arithmetic
re-merge that extends the previous sum, and a task rebuilt from a TALL-mask bundle. Only
output bytes are compared (the manifest's `outputs`, TIES thresholds and the rebuilt files);
the manifest itself holds timings and dates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

MERGEFLOW = str(Path(sys.executable).with_name("mergeflow"))

FAMILIES = {  # name -> make-family arguments
    "bf16": ["--tasks", "6", "--layers", "3", "--hidden", "64", "--vocab", "256", "--shards", "2", "--seed", "1"],
    "fp32": [
        "--tasks",
        "4",
        "--layers",
        "2",
        "--hidden",
        "48",
        "--vocab",
        "128",
        "--shards",
        "1",
        "--seed",
        "2",
        "--dtype",
        "float32",
    ],
    "fp16": [
        "--tasks",
        "5",
        "--layers",
        "2",
        "--hidden",
        "32",
        "--vocab",
        "96",
        "--shards",
        "1",
        "--seed",
        "3",
        "--dtype",
        "float16",
    ],
}

SMALL = {"shard_size": 120_000, "chunk_elems": 2048}  # many shards and chunks per tensor
ONE = {"shard_size": "1GB"}  # one shard, default chunks

CASES = [  # (name, family, method, execution)
    ("ta", "bf16", {"name": "task_arithmetic", "alpha": 0.3}, SMALL),
    ("ta-one", "bf16", {"name": "task_arithmetic", "alpha": 0.3}, ONE),
    ("ta-fp32", "fp32", {"name": "task_arithmetic", "alpha": 0.45}, SMALL),
    ("ties-global", "bf16", {"name": "ties", "density": 0.2}, SMALL),
    ("ties-global-one", "bf16", {"name": "ties", "density": 0.2}, ONE),
    (
        "ties-tensor-sum",
        "fp32",
        {"name": "ties", "density": 0.3, "scope": "tensor", "merge": "sum", "alpha": 0.7},
        SMALL,
    ),
    ("ties-fp16", "fp16", {"name": "ties", "density": 0.5, "alpha": 0.9}, SMALL),
    ("tall", "bf16", {"name": "tall_masks", "alpha": 0.3, "lambda": 0.4}, SMALL),
    (
        "tall-ties",
        "fp32",
        {
            "name": "tall_masks",
            "alpha": 0.5,
            "base_merge": "ties",
            "density": 0.4,
            "lambda": {"task_00": 0.2, "task_01": 0.6, "task_02": 0.3, "task_03": 0.5},
        },
        SMALL,
    ),
    ("tall-f32store", "fp16", {"name": "tall_masks", "store_dtype": "float32"}, ONE),
    ("consensus", "bf16", {"name": "consensus", "alpha": 0.4, "k": 2}, SMALL),
    (
        "consensus-ties",
        "fp32",
        {"name": "consensus", "alpha": 1.0, "k": 3, "base_merge": "ties", "density": 0.2, "lambda": 0.5},
        ONE,
    ),
]


def run(cmd: list[str], cwd: Path | None = None) -> None:
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def family(work: Path, name: str) -> Path:
    root = work / "families" / name
    if not (root / "config.yaml").exists():
        run([MERGEFLOW, "make-family", str(root), *FAMILIES[name]])
    return root


def output_digests(run_dir: Path) -> dict:
    m = json.loads((run_dir / "manifest.json").read_text())
    doc = {"outputs": {rel: o["sha256"] for rel, o in m["outputs"].items()}}
    if "ties" in m:
        doc["ties"] = m["ties"]
    return doc


def family_config(root: Path) -> dict:
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["base"] = str(root / cfg["base"])
    cfg["tasks"] = [t | {"checkpoint": str(root / t["checkpoint"])} for t in cfg["tasks"]]
    return cfg


def merge_case(work: Path, name: str, fam: str, method: dict, execution: dict) -> dict:
    cfg = family_config(family(work, fam))
    cfg |= {"method": method, "execution": execution, "output": str(work / "runs" / name)}
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    run([MERGEFLOW, "merge", str(path), "--quiet", "--no-tracking"])
    return output_digests(work / "runs" / name)


SUITE_CASES = [  # on the 8-task digits suite: values chosen on validation data, and LOT
    ("suite-alpha-auto", {"name": "task_arithmetic", "alpha": "auto"}),
    ("suite-tall-auto", {"name": "tall_masks", "alpha": 0.3, "lambda": "auto"}),
    (
        "suite-lot",
        {"name": "lot", "lambda": 1.0, "model": "mergeflow.dev.suite.models:lot_task_model", "exemplars": 32},
    ),
    (
        "suite-lot-auto",
        {"name": "lot", "lambda": "auto", "model": "mergeflow.dev.suite.models:lot_task_model", "exemplars": 32},
    ),
]


def suite_case(work: Path, name: str, method: dict) -> dict:
    root = work / "suite"
    if not (root / "suite.json").exists():
        run([MERGEFLOW, "suite", "build", "--dir", str(root), "--tasks", "8"])
    cfg = family_config(root)
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    cfg |= {"method": method, "output": str(out), "execution": {"shard_size": "300KB"}}
    cfg["method"] = method | ({"stats_cache": str(out) + "-lot-stats"} if method["name"] == "lot" else {})
    shutil.rmtree(str(out) + "-lot-stats", ignore_errors=True)
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    run([MERGEFLOW, "merge", str(path), "--quiet", "--no-tracking"])
    doc = output_digests(out)
    m = json.loads((out / "manifest.json").read_text())
    doc["inputs"] = {
        t["name"]: {f: e["sha256"] for f, e in t["files"].items()}  # sha256 only: stamps hold mtimes
        for t in [m["inputs"]["base"] | {"name": "base"}, *m["inputs"]["tasks"]]
    }
    if "selection" in m:
        doc["chosen"] = {k: m["selection"][k]["chosen"] for k in ("alpha", "lambda") if k in m["selection"]}
    return doc


def remerge_case(work: Path) -> dict:
    """TA re-merge that appends two tasks to a 4-task parent: the carried sum path."""
    cfg = family_config(family(work, "bf16"))
    out = work / "runs" / "remerge"
    shutil.rmtree(out, ignore_errors=True)
    cfg |= {"method": {"name": "task_arithmetic", "alpha": 0.3}, "execution": SMALL, "output": str(out)}
    tasks = cfg["tasks"]
    path = work / "configs" / "remerge.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg | {"tasks": tasks[:4]}))
    run([MERGEFLOW, "remerge", str(path), "--quiet", "--no-tracking"])
    path.write_text(yaml.safe_dump(cfg | {"tasks": tasks}))
    run([MERGEFLOW, "remerge", str(path), "--quiet", "--no-tracking"])
    latest = json.loads((out / "latest.json").read_text())["run"]
    doc = output_digests(out / latest)
    doc["reused"] = json.loads((out / latest / "manifest.json").read_text())["remerge"]["reused"]["sum_of_tasks"]
    return doc


def reconstruct_case(work: Path) -> dict:
    out = work / "rebuilt"
    shutil.rmtree(out, ignore_errors=True)
    run([MERGEFLOW, "reconstruct", str(work / "runs" / "tall"), "--task", "task_02", "--output", str(out), "--quiet"])
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/mf-digests", help="scratch folder (families are kept and reused)")
    p.add_argument("--json", required=True, help="write the digests here")
    p.add_argument("--compare", help="an earlier --json: report every difference, exit 1 on any")
    p.add_argument("--only", help="comma-separated case names (default: all)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    doc: dict = {}
    wanted = set(args.only.split(",")) if args.only else None
    jobs = [(n, lambda n=n, f=f, m=m, e=e: merge_case(work, n, f, m, e)) for n, f, m, e in CASES]
    jobs += [("remerge", lambda: remerge_case(work)), ("reconstruct", lambda: reconstruct_case(work))]
    jobs += [(n, lambda n=n, m=m: suite_case(work, n, m)) for n, m in SUITE_CASES]
    for name, job in jobs:
        if wanted is None or name in wanted:
            doc[name] = job()
            print(
                f"{name:<18} {len(doc[name].get('outputs', doc[name])):>4} files  ({time.time() - t0:.0f}s)", flush=True
            )
    Path(args.json).write_text(json.dumps(doc, indent=1, sort_keys=True))
    files = sum(len(v.get("outputs", v)) for v in doc.values())
    print(f"{len(doc)} cases, {files} output files in {time.time() - t0:.0f}s -> {args.json}")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        diffs = [k for k in sorted(set(doc)) if before.get(k) != doc.get(k)]
        for k in diffs:
            print(f"DIFFERS: {k}")
        print("identical to", args.compare if not diffs else f"{len(diffs)} case(s) differ from {args.compare}")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
