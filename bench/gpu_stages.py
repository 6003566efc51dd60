"""The workers' compute path stage by stage, without Ray: GB/s of checkpoint bytes per stage
against this machine's own limits, measured in the same run. Made for a GPU machine that has
torch, safetensors and numpy but not ray, mlflow, boto3 or pydantic; runs on a CPU as well.

    python bench/gpu_stages.py /tmp/fam --preset 0.1b --tasks 8 --json gpu.json
    python bench/gpu_stages.py /tmp/fam --preset tiny --tasks 4 --device cpu

The family is generated (bench/families.py) when the folder does not hold it yet.

Limits, GB/s: `copy` (one device tensor copied into another: the memory bandwidth that
element-wise kernels can reach, counted once per byte copied), `h2d pinned` and `h2d pageable`
(host to device; CUDA only), `read warm` (every input file read once more into one reused
buffer, after a first read: the page-cache speed one reading thread gets).

Stages, each over the whole model one shard after another, as one Ray worker runs a shard:
  kernels/METHOD   the chunk math alone on one shard already in device memory in its stored
                   dtype: widening, task vectors, tau^2 sums, the method, theta_0 + alpha delta,
                   and for compressing methods the tau_MTL cast, mask packing and mask counts
  merge/METHOD     mergeflow.workers.shard.merge_shard end to end: read, stage, copy to the device,
                   compute, copy back, hash, write
  ties-global      TIES with whole-model thresholds as the tool runs it: the 1/32 sample, the
                   counting passes or the zero guess, and the apply pass (reported per step)
Methods: task_arithmetic, consensus (TALL masks + consensus + compressed bundle) and ties.
GB/s = checkpoint bytes the stage covers (base + T tasks) / seconds, the median of --repeats.
On a CUDA device every merge stage also merges one shard on the CPU and compares every output
file's sha256 with the device's: the CUDA path must give the CPU path's bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import families  # noqa: E402

from mergeflow.workers import chunking, kth_value, reading  # noqa: E402
from mergeflow.workers.checkpoint import open_checkpoint  # noqa: E402
from mergeflow.workers.dtypes import TORCH_DTYPES  # noqa: E402
from mergeflow.workers.layers import group_layers  # noqa: E402
from mergeflow.workers.methods import get_method  # noqa: E402
from mergeflow.workers.methods.ties.thresholds import shard_counts, shard_sample  # noqa: E402
from mergeflow.workers.reading import ChunkBuffers, TensorAccess  # noqa: E402
from mergeflow.workers.shard import ShardSpec, TensorJob, apply_scale, merge_shard, merged_chunks  # noqa: E402

METHODS = ("task_arithmetic", "consensus", "ties")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` runs (after one untimed warm-up run), and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ------------------------------------------------------------------------------ limits


def limits(device: str, files: list[Path], nbytes: int, repeats: int) -> dict[str, float]:
    """GB/s this machine gives for the moves a merge makes, measured with `nbytes` blocks."""
    out = {}
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    sec, _ = timed(lambda: dst.copy_(src), device, repeats)
    out["copy"] = nbytes / sec / 1e9
    if device.startswith("cuda"):
        for kind, host in (
            ("pinned", torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)),
            ("pageable", torch.empty(nbytes, dtype=torch.uint8)),
        ):
            host.fill_(1)
            sec, _ = timed(lambda: dst.copy_(host), device, repeats)
            out[f"h2d {kind}"] = nbytes / sec / 1e9
    buf = bytearray(64 * 2**20)

    def read_all() -> int:
        total = 0
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                while n := os.readv(fd, [buf]):
                    total += n
            finally:
                os.close(fd)
        return total

    sec, total = timed(read_all, "cpu", 1)
    out["read warm"] = total / sec / 1e9
    return out


# ----------------------------------------------------------------------------- the plan


def make_specs(
    base_dir: Path, task_dirs: list[Path], output: str, method: str, device: str, chunk_elems: int, shard_bytes: int
) -> list[ShardSpec]:
    """Shards of whole layers as workflows/plan.py makes them (without its pydantic config)."""
    base = open_checkpoint(str(base_dir))
    tasks = [open_checkpoint(str(d)) for d in task_dirs]
    names = tuple(d.name for d in task_dirs)
    groups = group_layers(base, tasks, shard_bytes)
    m, params, globals_ = method_for(method)
    return [
        ShardSpec(
            i,
            len(groups),
            tuple(TensorJob(n, base.tensors[n], tuple(t.tensors[n] for t in tasks)) for n in group),
            names,
            m,
            params,
            output,
            chunk_elems=chunk_elems,
            device=device,
            globals=globals_,
        )
        for i, group in enumerate(groups)
    ]


def stage_bytes(specs: list[ShardSpec]) -> int:
    return sum(s.nbytes for s in specs)


# ---------------------------------------------------------------------------- kernels


class DeviceReader:
    """Serves task_chunks from tensors already in device memory (stored dtype): the chunk math
    then runs with no file read or host-to-device copy in the way."""

    def __init__(self, spec: ShardSpec, device: str):
        self._held = {}
        with ExitStack() as stack:
            reader = reading.ShardReader(spec.storage, stack)
            for job in spec.tensors:
                if job.is_float:
                    for info in (job.base, *job.tasks):
                        self._held[(info.file, info.start)] = reader.elements(info, 0, info.numel).to(device)

    def scratch_elements(self, info, lo: int, hi: int) -> torch.Tensor:
        return self._held[(info.file, info.start)][lo:hi]


def kernel_pass(spec: ShardSpec, reader: DeviceReader) -> None:
    """merge_shard's per-chunk compute for one shard (the engine's own loop, workers.shard.merged_chunks:
    the method's kernel, its bundle tensors, tau^2 sums), on device-resident inputs, without writing."""
    buffers = ChunkBuffers(spec)
    for job in spec.tensors:
        if not job.is_float:
            continue
        dtype = TORCH_DTYPES[job.dtype]
        for _, _, base, _, out, _ in merged_chunks(TensorAccess(spec, job, reader, buffers)):
            apply_scale(base, out.delta, spec.scale, dtype)


# ----------------------------------------------------------------------- merge stages


def ties_global(specs: list[ShardSpec], times: dict[str, float]) -> list:
    """Whole-model TIES as workflows/merge.py drives it, with the shards run here in turn."""
    t = len(specs[0].task_names)
    t0 = time.perf_counter()
    sample, total = kth_value.Sample.empty(t), 0
    for s in specs:
        part, numel = shard_sample(s)
        sample, total = sample + part, total + numel
    k = np.full(t, kth_value.kth_rank(total, specs[0].params.density), dtype=np.int64)
    times["sample"] = time.perf_counter() - t0
    guess = kth_value.zeros_expected(sample, total, k)
    passes = 0

    def run_pass(plan, i):
        nonlocal passes
        passes += 1
        return kth_value.summed(plan, (shard_counts(s, plan) for s in specs))

    t0 = time.perf_counter()
    thresholds = (0.0,) * t if guess else tuple(float(x) for x in kth_value.select(run_pass, sample, total, k))
    times["thresholds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = [merge_shard(s.with_globals(thresholds=thresholds, count_zeros=guess)) for s in specs]
    times["apply"] = time.perf_counter() - t0
    if guess and any(z < k[i] for i, z in enumerate(np.sum([r.sums["zeros"] for r in results], axis=0))):
        raise SystemExit("ties-global: the zero guess was refuted; this family needs the exact thresholds path")
    times["passes"] = passes
    times["zero_guess"] = guess
    return results


def same_bytes_as_cpu(spec: ShardSpec, work: Path, globals_: dict) -> bool:
    """Merge one shard on the device and on the CPU; every output file's sha256 must agree."""
    spec = dataclasses.replace(spec, globals=globals_)
    dev = merge_shard(dataclasses.replace(spec, output=str(work / "check-dev")))
    cpu = merge_shard(dataclasses.replace(spec, output=str(work / "check-cpu"), device="cpu"))
    for d in ("check-dev", "check-cpu"):
        shutil.rmtree(work / d, ignore_errors=True)
    return {k: v[0] for k, v in dev.outputs.items()} == {k: v[0] for k, v in cpu.outputs.items()}


def method_for(name: str):
    """(method, its parameters, the globals a run would give its shards) for a stage."""
    method = get_method(name)
    params = {
        "consensus": lambda: method.Params(alpha=1.0, k=2),
        "ties": lambda: method.Params(alpha=1.0, density=0.2),
        "task_arithmetic": lambda: method.Params(alpha=0.3),
    }[name]()
    return method, params, ({"majority": 1} if name == "ties" else {})


def run(args) -> dict:
    device = args.device
    root = Path(args.family)
    base_dir, named = families.generate(
        root, args.preset, args.tasks, max_shard_bytes=args.file_mb * 2**20, dense=args.dense
    )
    task_dirs = [p for _, p in named]
    files = sorted(f for d in (base_dir, *task_dirs) for f in d.glob("*.safetensors"))
    work = Path(tempfile.mkdtemp(prefix="mfgpu-", dir=args.work))
    report: dict = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "preset": args.preset,
        "dense": args.dense,
        "tasks": args.tasks,
        "chunk_elems": args.chunk_elems,
        "staging": args.staging if args.device.startswith("cuda") else "n/a",
        "input_bytes": sum(f.stat().st_size for f in files),
        "stages": {},
    }
    try:
        report["limits"] = limits(device, files, args.limit_mb * 2**20, args.repeats)
        reading.PIN_CUDA_READS = args.staging == "pinned"
        for method in args.methods:
            specs = make_specs(
                base_dir, task_dirs, str(work / method), method, device, args.chunk_elems, args.shard_mb * 2**20
            )
            if method == "ties":  # any thresholds do the same work
                specs = [s.with_globals(thresholds=(1e-3,) * args.tasks) for s in specs]
            biggest = max(specs, key=lambda s: s.nbytes)
            held = DeviceReader(biggest, device)
            sec, _ = timed(lambda held=held: kernel_pass(biggest, held), device, args.repeats)
            del held
            report["stages"][f"kernels/{method}"] = {"seconds": sec, "bytes": biggest.nbytes}
            steps: dict[str, float] = {}
            if method == "ties":
                sec, results = timed(lambda: ties_global(specs, steps), device, args.repeats)
                name = "ties-global"
            else:
                sec, results = timed(lambda: [merge_shard(s) for s in specs], device, args.repeats)
                name = f"merge/{method}"
            entry = {
                "seconds": sec,
                "bytes": stage_bytes(specs),
                "shards": len(specs),
                "bytes_read": sum(r.bytes_read for r in results),
            } | steps
            if device != "cpu":
                entry["same_bytes_as_cpu"] = same_bytes_as_cpu(specs[0], work, results[0].globals_used)
            report["stages"][name] = entry
            shutil.rmtree(work / method, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def print_report(r: dict) -> None:
    print(
        f"{r['device_name']} ({r['device']}, {r['cpu_threads']} CPU threads), torch {r['torch']}, "
        f"{r['preset']}{' dense' if r['dense'] else ''} x {r['tasks']} tasks, "
        f"{r['input_bytes'] / 1e9:.2f} GB of inputs, chunk {r['chunk_elems']}, staging {r['staging']}"
    )
    print("limits, GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["limits"].items()))
    ref = [k for k in ("h2d pinned", "read warm") if k in r["limits"]]
    print(f"{'stage':<26}{'seconds':>9}{'GB':>8}{'GB/s':>9}  " + "  ".join(f"/{k}" for k in ("copy", *ref)))
    for name, s in r["stages"].items():
        gbs = s["bytes"] / s["seconds"] / 1e9
        ratios = "  ".join(f"{gbs / r['limits'][k]:>{len(k) + 1}.3f}" for k in ("copy", *ref))
        extra = ""
        if "apply" in s:
            extra += (
                f"  sample {s['sample']:.2f}s, thresholds {s['thresholds']:.2f}s ({s['passes']} passes"
                f"{', zero guess' if s['zero_guess'] else ''}), apply {s['apply']:.2f}s"
            )
        if "same_bytes_as_cpu" in s:
            extra += "  same bytes as CPU" if s["same_bytes_as_cpu"] else "  DIFFERS FROM CPU"
        print(f"{name:<26}{s['seconds']:>9.3f}{s['bytes'] / 1e9:>8.2f}{gbs:>9.2f}  {ratios}{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", help="folder of the checkpoint family (generated there when missing)")
    ap.add_argument("--preset", choices=sorted(families.PRESETS), default="0.1b")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--dense", action="store_true", help="a family whose tasks move every weight (bench/families.py)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument(
        "--chunk-elems",
        type=int,
        default=None,
        help="elements per task per compute step (default: the tool's, 4M on CUDA, 2M / tasks on a CPU)",
    )
    ap.add_argument(
        "--staging",
        choices=["pinned", "pageable"],
        default="pinned",
        help="host memory CUDA shards read into before the copy to the device",
    )
    ap.add_argument("--shard-mb", type=int, default=512, help="input MB per shard of whole layers")
    ap.add_argument("--file-mb", type=int, default=512, help="safetensors file size of a generated family")
    ap.add_argument("--limit-mb", type=int, default=1024, help="block size of the limit measurements")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the merge outputs (a temp dir is made in it)")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: this torch sees no CUDA device; use --device cpu")
    if args.chunk_elems is None:
        args.chunk_elems = chunking.chunk_for(args.device, args.tasks)  # what a merge would use
    args.chunk_elems -= args.chunk_elems % 8  # masks pack 8 to a byte
    report = run(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
