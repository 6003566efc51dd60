"""mergeflow against mergekit and against the floor, in one invocation, on one family.

Each repeat runs every (tool, method) once, in alternating order, as separate processes
measured as whole process trees (bench/proctree.py): wall time, peak RSS and PSS, bytes
read. Prints medians with the spread, and the ratios mergeflow/mergekit and
mergeflow/floor. The floor (bench/floor.py) reads every input byte once and writes the
output once.

Same semantics on both sides: float32 arithmetic, bf16 output.
- task_arithmetic: base + 0.3 * sum_t tau_t (mergekit: weight 0.3 per model, no normalisation).
- ties: density 0.2, mean of the agreeing entries (mergekit: weight 1, normalize true).
  mergekit trims per tensor (top int(density * n) by |tau|); mergeflow's `scope: tensor` is that
  rule (it keeps the k-th value's ties too), `scope: global` is the paper's whole-model trim.
  Where the elected sign is exactly 0 mergekit keeps nothing, mergeflow uses the majority sign.
- dare_ties, breadcrumbs, della: density 0.5, weight 1, lambda 1 on both sides; dare_ties a disjoint
  sum, della a disjoint mean (mergekit's normalize default for each), both rescaled by the L1 norm as
  current mergekit does; breadcrumbs over the whole tensor (mergekit's scope), gamma 0.01. The random
  masks differ between the tools (ours are counter-based, see docs/methods.md): times, not bytes.
- tall_masks / consensus: mergeflow only (mergekit has neither); TALL masks over TA, lambda 0.4,
  with the compressed bundle written; consensus k = 2 on top.

mergekit is installed on first use into bench/.mergekit-venv (git-ignored): python3 -m venv,
then `pip install torch==<this venv's torch> mergekit==0.1.5` (the pinned CPU torch avoids a
multi-GB CUDA download). It runs as `mergekit-yaml CFG OUT --no-copy-tokenizer --lazy-unpickle`.

    .venv/bin/python bench/vs_mergekit.py --family /tmp/fam05 --preset 0.5b --tasks 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import families  # noqa: E402
import proctree  # noqa: E402

MERGEKIT_VERSION = "0.1.5"
MERGEKIT_VENV = HERE / ".mergekit-venv"
TA_ALPHA = 0.3
DENSITY = 0.2

# method label -> (mergeflow method block, mergekit merge_method or None)
METHODS = {
    "ta": ({"name": "task_arithmetic", "alpha": TA_ALPHA}, "task_arithmetic"),
    "ties-global": ({"name": "ties", "density": DENSITY, "alpha": 1.0, "scope": "global"}, None),
    "ties-tensor": ({"name": "ties", "density": DENSITY, "alpha": 1.0, "scope": "tensor"}, "ties"),
    "dare-ties": ({"name": "dare_ties", "density": 0.5, "alpha": 1.0, "rescale": "l1"}, "dare_ties"),
    "breadcrumbs": (
        {"name": "breadcrumbs", "density": 0.5, "gamma": 0.01, "alpha": 1.0, "scope": "tensor"},
        "breadcrumbs",
    ),
    "della": ({"name": "della", "density": 0.5, "epsilon": 0.15, "alpha": 1.0, "rescale": "l1"}, "della"),
    "tall": ({"name": "tall_masks", "alpha": TA_ALPHA, "lambda": 0.4}, None),
    "consensus": ({"name": "consensus", "alpha": TA_ALPHA, "lambda": 0.4, "k": 2}, None),
}
# mergekit's TIES is compared with both of ours: its rule is per tensor, the paper's is global.
MERGEKIT_TWIN = {"ta": "ta", "ties-global": "ties-tensor", "ties-tensor": "ties-tensor"} | {
    m: m for m in ("dare-ties", "breadcrumbs", "della")
}
# mergekit's own parameters of the sparsifying methods (the rest are its defaults).
MERGEKIT_SPARSIFY = {
    "dare_ties": ({"density": 0.5}, {"normalize": False, "rescale": True}),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.01}, {"normalize": False}),
    "della": ({"density": 0.5, "epsilon": 0.15}, {"normalize": True, "rescale": True}),
}


def ensure_mergekit(python: str) -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    torch_version = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__.split('+')[0])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"installing mergekit {MERGEKIT_VERSION} (torch {torch_version}) into {MERGEKIT_VENV} ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(MERGEKIT_VENV)], check=True)
    subprocess.run(
        [
            str(MERGEKIT_VENV / "bin" / "pip"),
            "install",
            "--quiet",
            f"torch=={torch_version}",
            f"mergekit=={MERGEKIT_VERSION}",
        ],
        check=True,
    )
    return exe


def mergeflow_config(base: Path, tasks: list[tuple[str, Path]], out: Path, method: dict, chunk: int | None) -> dict:
    cfg = {
        "base": str(base),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
        "output": str(out),
        "method": method,
    }
    if chunk:
        cfg["execution"] = {"chunk_elems": chunk}
    return cfg


def mergekit_config(base: Path, tasks: list[tuple[str, Path]], method: str) -> dict:
    if method == "task_arithmetic":
        models = [{"model": str(p), "parameters": {"weight": TA_ALPHA}} for _, p in tasks]
        params = {"normalize": False}
    elif method in MERGEKIT_SPARSIFY:
        per_model, params = MERGEKIT_SPARSIFY[method]
        models = [{"model": str(p), "parameters": {"weight": 1.0, **per_model}} for _, p in tasks]
        params = params | {"lambda": 1.0}
    else:
        models = [{"model": str(p), "parameters": {"weight": 1.0, "density": DENSITY}} for _, p in tasks]
        params = {"normalize": True}
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": params,
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gb": round(mem / 2**30, 1),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "python": platform.python_version(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, help="family directory (generated there when absent)")
    ap.add_argument("--preset", default="0.5b", choices=sorted(families.PRESETS))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense", action="store_true", help="a family whose tasks move every weight (bench/families.py)")
    ap.add_argument(
        "--methods", default="ta,ties-global,ties-tensor,consensus", help=f"comma-separated, from {sorted(METHODS)}"
    )
    ap.add_argument("--tools", default="mergeflow,mergekit,floor")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--mergekit-ties-repeats",
        type=int,
        default=1,
        help="mergekit's TIES, DARE, Breadcrumbs and DELLA take minutes a run",
    )
    ap.add_argument(
        "--ray-address",
        default=None,
        help="also run mergeflow on this running cluster (tool mf@cluster; its workers are not in the tree)",
    )
    ap.add_argument("--chunk-elems", type=int, default=None)
    ap.add_argument(
        "--hash-cache",
        choices=["cold", "warm"],
        default="cold",
        help="mergeflow's input hash cache (infra/hash_cache.py): cold = emptied before every run, so "
        "each run hashes every input as a first merge does; warm = kept, after one unmeasured "
        "priming run per method (a sweep or repeated job over the same checkpoints)",
    )
    ap.add_argument("--work", default=None, help="where outputs go (default: a temp dir next to the family)")
    ap.add_argument("--json", default=None, help="also write every measurement here")
    args = ap.parse_args()

    family = Path(args.family)
    t0 = time.perf_counter()
    base, tasks = families.generate(family, args.preset, args.tasks, args.seed, dense=args.dense)
    print(f"family {family}: ready in {time.perf_counter() - t0:.1f}s")
    input_bytes = sum(f.stat().st_size for d in [base, *(p for _, p in tasks)] for f in d.glob("*.safetensors"))
    params = families.parameters(families.PRESETS[args.preset])
    info = machine() | {
        "preset": args.preset,
        "dense": args.dense,
        "parameters": params,
        "tasks": args.tasks,
        "input_gb": round(input_bytes / 1e9, 3),
    }
    print(json.dumps(info))

    work = Path(args.work or tempfile.mkdtemp(prefix="mfbench-", dir=family.parent))
    work.mkdir(parents=True, exist_ok=True)
    python = str(ROOT / ".venv" / "bin" / "python")
    tools = args.tools.split(",")
    methods = args.methods.split(",")
    mergekit = ensure_mergekit(python) if "mergekit" in tools else None

    runs: list[tuple[str, str, list[str], dict]] = []  # (tool, method, command, env)
    hashes = work / "hash-cache"
    env = os.environ | {
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "MERGEFLOW_CACHE_DIR": str(hashes),
    }
    shutil.rmtree(hashes, ignore_errors=True)
    for m in methods:
        cfg_path = work / f"mergeflow-{m}.yaml"
        cfg_path.write_text(
            yaml.safe_dump(mergeflow_config(base, tasks, work / f"out-mergeflow-{m}", METHODS[m][0], args.chunk_elems))
        )
        cmd = [
            str(ROOT / ".venv" / "bin" / "mergeflow"),
            "merge",
            str(cfg_path),
            "--overwrite",
            "--quiet",
            "--no-tracking",
        ]
        if "mergeflow" in tools:
            runs.append(("mergeflow", m, cmd, env))
        if args.ray_address:  # the same merge on a running cluster, alternating with the local runtime
            runs.append(("mf@cluster", m, cmd + ["--ray-address", args.ray_address], env))
    for m in methods:
        kit = METHODS[m][1]
        if "mergekit" in tools and kit and MERGEKIT_TWIN.get(m) == m:
            cfg_path = work / f"mergekit-{m}.yaml"
            cfg_path.write_text(yaml.safe_dump(mergekit_config(base, tasks, kit)))
            out = work / f"out-mergekit-{m}"
            runs.append(
                (
                    "mergekit",
                    m,
                    [str(mergekit), str(cfg_path), str(out), "--no-copy-tokenizer", "--lazy-unpickle", "--quiet"],
                    os.environ | {"HF_HUB_OFFLINE": "1"},
                )
            )
    if "floor" in tools:
        runs.append(
            (
                "floor",
                "ta",
                [
                    python,
                    str(HERE / "floor.py"),
                    str(base),
                    str(work / "out-floor"),
                    *(str(p) for _, p in tasks),
                    "--alpha",
                    str(TA_ALPHA),
                ],
                env,
            )
        )

    if args.hash_cache == "warm":
        for tool, m, cmd, run_env in runs:
            if tool == "mergeflow":
                subprocess.run(cmd, env=run_env, cwd=str(work), check=True, capture_output=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        order = runs if rep % 2 == 0 else runs[::-1]  # alternate, so drift hits every tool alike
        for tool, m, cmd, run_env in order:
            if tool == "mergekit" and m != "ta" and rep >= args.mergekit_ties_repeats:
                continue
            if tool == "mergekit":
                shutil.rmtree(cmd[2], ignore_errors=True)
            if args.hash_cache == "cold":
                shutil.rmtree(hashes, ignore_errors=True)
            load = os.getloadavg()[0]
            r = proctree.run(cmd, env=run_env, cwd=str(work))
            if r.returncode != 0:
                print(r.output[-3000:])
                raise SystemExit(f"{tool} {m} failed with exit code {r.returncode}")
            row = {
                "tool": tool,
                "method": m,
                "repeat": rep,
                "wall": r.wall,
                "peak_rss": r.peak_rss,
                "peak_pss": r.peak_pss,
                "peak_anon": r.peak_anon,
                "rchar": r.rchar,
                "cpu": r.cpu,
                "load_before": load,
            }
            if tool in ("mergeflow", "mf@cluster"):
                manifest = json.loads((work / f"out-mergeflow-{m}" / "manifest.json").read_text())
                row["timings"] = manifest["timings"]
                row["bytes_read_reported"] = manifest["summary"]["bytes_read"]
            if tool == "floor":
                row["bytes_read_reported"] = json.loads(r.output.strip().splitlines()[-1])["bytes_read"]
            results.setdefault((tool, m), []).append(row)
            stage = f" merge stage {row['timings']['merge']:.2f}s" if "timings" in row else ""
            print(
                f"[{rep}] {tool:9} {m:12} {r.wall:7.2f}s  rss {r.peak_rss / 2**30:5.2f} GiB  "
                f"pss {r.peak_pss / 2**30:5.2f} GiB  anon {r.peak_anon / 2**30:5.2f} GiB  "
                f"read {r.rchar / 1e9:6.2f} GB  cpu {r.cpu:6.1f}s  load {load:.2f}{stage}",
                flush=True,
            )

    report(results, input_bytes)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": info, "runs": [r for rs in results.values() for r in rs]}, indent=1)
        )


def _med(rows: list[dict], key) -> float:
    return statistics.median(key(r) for r in rows)


def report(results: dict[tuple[str, str], list[dict]], input_bytes: int) -> None:
    print(
        f"\n{'tool':9} {'method':12} {'n':>2} {'wall s':>8} {'(min-max)':>15} {'GB/s':>6} {'RSS GiB':>8} "
        f"{'PSS GiB':>8} {'anon GiB':>8} {'read GB':>8} {'stage s':>8} {'CPU s':>7}"
    )
    for (tool, m), rows in results.items():
        walls = [r["wall"] for r in rows]
        stage = _med(rows, lambda r: r["timings"]["merge"]) if "timings" in rows[0] else float("nan")
        print(
            f"{tool:9} {m:12} {len(rows):2d} {statistics.median(walls):8.2f} "
            f"({min(walls):6.2f}-{max(walls):6.2f}) {input_bytes / statistics.median(walls) / 1e9:6.2f} "
            f"{_med(rows, lambda r: r['peak_rss']) / 2**30:8.2f} {_med(rows, lambda r: r['peak_pss']) / 2**30:8.2f} "
            f"{_med(rows, lambda r: r.get('peak_anon', 0)) / 2**30:8.2f} "
            f"{_med(rows, lambda r: r['rchar']) / 1e9:8.2f} {stage:8.2f} {_med(rows, lambda r: r.get('cpu', 0)):7.1f}"
        )

    floor = results.get(("floor", "ta"))
    print("\nratios (medians)")
    for (tool, m), rows in results.items():
        if tool not in ("mergeflow", "mf@cluster"):
            continue
        wall = _med(rows, lambda r: r["wall"])
        pss = _med(rows, lambda r: r["peak_pss"])
        rss = _med(rows, lambda r: r["peak_rss"])
        anon = _med(rows, lambda r: r.get("peak_anon", 0))
        cpu = _med(rows, lambda r: r.get("cpu", 0))
        parts = []
        twin = results.get(("mergekit", MERGEKIT_TWIN.get(m, "")))
        if twin:
            parts.append(f"wall/mergekit {wall / _med(twin, lambda r: r['wall']):.3f}")
            parts.append(f"CPU/mergekit {cpu / max(_med(twin, lambda r: r.get('cpu', 0)), 1e-9):.2f}")
            parts.append(f"RSS/mergekit {rss / _med(twin, lambda r: r['peak_rss']):.2f}")
            parts.append(f"PSS/mergekit {pss / _med(twin, lambda r: r['peak_pss']):.2f}")
            parts.append(f"anon/mergekit {anon / max(_med(twin, lambda r: r.get('peak_anon', 0)), 1):.2f}")
        if floor:
            fw = _med(floor, lambda r: r["wall"])
            parts.append(f"wall/floor {wall / fw:.2f}")
            parts.append(f"CPU/floor {cpu / max(_med(floor, lambda r: r.get('cpu', 0)), 1e-9):.2f}")
            parts.append(f"merge stage/floor {_med(rows, lambda r: r['timings']['merge']) / fw:.2f}")
            parts.append(f"PSS/floor {pss / _med(floor, lambda r: r['peak_pss']):.2f}")
        ta = results.get((tool, "ta"))
        if ta and m != "ta":
            parts.append(f"wall/our TA {wall / _med(ta, lambda r: r['wall']):.2f}")
        local = results.get(("mergeflow", m))
        if tool == "mf@cluster" and local:
            parts.append(f"wall/local runtime {wall / _med(local, lambda r: r['wall']):.2f}")
        print(f"  {tool:10} {m:12} " + ", ".join(parts))


if __name__ == "__main__":
    main()
