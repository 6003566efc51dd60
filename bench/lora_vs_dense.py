"""A merge of LoRA adapters against the same merge over dense checkpoints, in one invocation.

T rank-r PEFT adapters on q/k/v/o/up/down of every layer of a bench/families.py base, and for each
the dense checkpoint PEFT's merge_and_unload would give (base + scaling * B @ A, rounded to bf16).
Task Arithmetic (alpha 0.3) runs over the adapters and over the dense checkpoints, alternating, as
separate processes measured as whole process trees (bench/proctree.py); prints medians of wall time
and memory, the ratios adapter / dense, the inputs' bytes on disk and how far the two merged models
are apart (the dense side rounded each task vector through bf16 first, the adapter side did not).

    .venv/bin/python bench/lora_vs_dense.py /tmp/lora05 --preset 0.5b --tasks 8 --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import families  # noqa: E402
import proctree  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."
ALPHA = 0.3


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def make_inputs(root: Path, preset: str, tasks: int, rank: int) -> tuple[Path, list, list]:
    """root/fam/base, root/adapters/task_XX, root/dense/task_XX (skipped when already there)."""
    base_dir, _ = families.generate(root / "fam", preset, tasks=1)
    stamp = {"preset": preset, "tasks": tasks, "rank": rank, "version": 1}
    done = root / "inputs.json"
    names = [f"task_{t:02d}" for t in range(tasks)]
    adapters = [(n, root / "adapters" / n) for n in names]
    dense = [(n, root / "dense" / n) for n in names]
    if done.exists() and json.loads(done.read_text()) == stamp:
        return base_dir, adapters, dense
    base = load_dir(base_dir)
    modules = sorted(n.removesuffix(".weight") for n in base if n.removesuffix(".weight").rsplit(".", 1)[-1] in TARGETS)
    scaling = 2.0  # lora_alpha = 2r, as PEFT users commonly set it
    for t, ((_, a_dir), (_, d_dir)) in enumerate(zip(adapters, dense)):
        gen = torch.Generator().manual_seed(1000 + t)
        tensors, merged = {}, dict(base)
        for module in modules:
            w = base[f"{module}.weight"]
            a = torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5
            b = torch.randn(w.shape[0], rank, generator=gen) * 0.01
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
            merged[f"{module}.weight"] = (w.float() + scaling * (b.double() @ a.double()).float()).to(w.dtype)
        for folder in (a_dir, d_dir):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        save_file(tensors, a_dir / "adapter_model.safetensors")
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(TARGETS),
            "bias": "none",
            "use_dora": False,
        }
        (a_dir / "adapter_config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in merged.items()}, d_dir / "model.safetensors")
        shutil.copy(base_dir / "config.json", d_dir / "config.json")
        print(f"inputs: {t + 1}/{tasks}", flush=True)
    done.write_text(json.dumps(stamp))
    return base_dir, adapters, dense


def folder_bytes(folders) -> int:
    return sum(f.stat().st_size for _, d in folders for f in d.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="where the base, adapters, dense checkpoints and outputs go")
    ap.add_argument("--preset", default="0.5b", choices=sorted(families.PRESETS))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write every measurement here")
    args = ap.parse_args()

    root = Path(args.root)
    base_dir, adapters, dense = make_inputs(root, args.preset, args.tasks, args.rank)
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "MERGEFLOW_CACHE_DIR": str(root / "hash-cache")}
    runs = []
    for kind, tasks in (("adapters", adapters), ("dense", dense)):
        cfg = {
            "base": str(base_dir),
            "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
            "output": str(root / f"out-{kind}"),
            "method": {"name": "task_arithmetic", "alpha": ALPHA},
        }
        path = root / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = [str(ROOT / ".venv" / "bin" / "mergeflow"), "merge", str(path), "--overwrite", "--quiet", "--no-tracking"]
        runs.append((kind, cmd))
    results: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for kind, cmd in runs if rep % 2 == 0 else runs[::-1]:
            shutil.rmtree(root / "hash-cache", ignore_errors=True)  # every run hashes its inputs
            r = proctree.run(cmd, env=env, cwd=str(root))
            if r.returncode != 0:
                print(r.output[-3000:])
                raise SystemExit(f"{kind} merge failed with exit code {r.returncode}")
            timings = json.loads((root / f"out-{kind}" / "manifest.json").read_text())["timings"]
            row = {"wall": r.wall, "peak_rss": r.peak_rss, "peak_pss": r.peak_pss, "cpu": r.cpu, "timings": timings}
            results.setdefault(kind, []).append(row)
            print(
                f"[{rep}] {kind:8} {r.wall:7.2f}s  rss {r.peak_rss / 2**30:5.2f} GiB  pss {r.peak_pss / 2**30:5.2f} "
                f"GiB  cpu {r.cpu:6.1f}s  merge stage {timings['merge']:.2f}s",
                flush=True,
            )

    def med(kind, key):
        return statistics.median(key(r) for r in results[kind])

    got = {k: load_dir(root / f"out-{k}" / "model") for k in ("adapters", "dense")}
    diff = max((got["adapters"][n].float() - got["dense"][n].float()).abs().max().item() for n in got["dense"])
    summary = {
        "preset": args.preset,
        "tasks": args.tasks,
        "rank": args.rank,
        "input_bytes": {"adapters": folder_bytes(adapters), "dense": folder_bytes(dense)},
        "wall_ratio": med("adapters", lambda r: r["wall"]) / med("dense", lambda r: r["wall"]),
        "merge_stage_ratio": med("adapters", lambda r: r["timings"]["merge"])
        / med("dense", lambda r: r["timings"]["merge"]),
        "pss_ratio": med("adapters", lambda r: r["peak_pss"]) / med("dense", lambda r: r["peak_pss"]),
        "rss_ratio": med("adapters", lambda r: r["peak_rss"]) / med("dense", lambda r: r["peak_rss"]),
        "max_abs_difference_of_models": diff,
    }
    print(
        f"\nadapters / dense (medians of {args.repeats}): wall {summary['wall_ratio']:.2f}x, merge stage "
        f"{summary['merge_stage_ratio']:.2f}x, peak PSS {summary['pss_ratio']:.2f}x, peak RSS "
        f"{summary['rss_ratio']:.2f}x; inputs {summary['input_bytes']['adapters'] / 1e9:.2f} GB vs "
        f"{summary['input_bytes']['dense'] / 1e9:.2f} GB; models differ by at most {diff:.3g}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
