"""The TALL-mask bundle on disk, and rebuilding one task's model from it.

    compressed/tau_mtl-<part>.safetensors          tau_MTL, unscaled (the base dtype, or float32)
    compressed/masks/<task>/masks-<part>.safetensors   one uint8 tensor per weight tensor, np.packbits order
    compressed/index.json                          tasks, lambdas, files, tensor dtypes and shapes

`rebuild_part` streams theta_t = theta_0 + m_t * tau_MTL per output part: base tensors by range,
tau_MTL and the task's packed masks from the bundle, every bundle file checked against its
recorded sha256 before its bytes are trusted.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from mergeflow.errors import CheckpointError
from mergeflow.infra.storage import StorageOptions, join, sha256_of
from mergeflow.workers.bits import unpack
from mergeflow.workers.dtypes import TORCH_DTYPES
from mergeflow.workers.reading import ShardReader, chunk_ranges
from mergeflow.workers.safetensors_io import StreamingWriter, TensorInfo, read_header

INDEX = "compressed/index.json"
FORMAT = "mergeflow.tall/1"


def tau_file(part: str) -> str:
    return f"compressed/tau_mtl-{part}.safetensors"


def mask_file(part: str, task: str) -> str:
    return f"compressed/masks/{task}/masks-{part}.safetensors"


def grid_mask_file(part: str, i: int, task: str) -> str:
    return f"compressed/mask_grid/{i}/{task}/masks-{part}.safetensors"


def shard_files(spec) -> dict[str, tuple[str, list]]:
    """The bundle files of one shard: tau_MTL, and per task its masks (or, while lambda is being
    chosen, one mask set per candidate lambda)."""
    floats = [j for j in spec.tensors if j.is_float]
    store = lambda j: "F32" if spec.params.store_dtype == "float32" else j.dtype  # noqa: E731
    files = {"tau": (tau_file(spec.part), [(j.name, store(j), j.shape) for j in floats])}
    packed = [(j.name, "U8", (math.ceil(j.numel / 8),)) for j in floats]
    grid = spec.globals.get("mask_grid")
    for task in spec.task_names:
        if grid:
            files.update({f"grid/{i}/{task}": (grid_mask_file(spec.part, i, task), packed) for i in range(len(grid))})
        else:
            files[f"mask/{task}"] = (mask_file(spec.part, task), packed)
    return files


def index_doc(run) -> bytes:
    """compressed/index.json: what `reconstruct` and other readers need to find their way."""
    tensors = {}
    for spec in run.shards:
        for job in spec.tensors:
            if job.is_float:
                tensors[job.name] = {"part": spec.part, "dtype": job.dtype, "shape": list(job.shape)}
    doc = {
        "format": FORMAT,
        "tasks": list(run.task_names),
        "lambdas": dict(zip(run.task_names, lambdas_of(run.params, run.task_names))),
        "tau_mtl": {"files": [tau_file(s.part) for s in run.shards], "dtype": run.params.store_dtype},
        "masks": {t: [mask_file(s.part, t) for s in run.shards] for t in run.task_names},
        "mask_order": "np.packbits (first element in the most significant bit), count = numel",
        "tensors": tensors,
    }
    return json.dumps(doc, indent=1).encode()


def lambdas_of(params, task_names: tuple[str, ...]) -> tuple[float, ...]:
    lam = params.lambda_
    return tuple(float(lam[n]) for n in task_names) if isinstance(lam, dict) else (float(lam),) * len(task_names)


# ------------------------------------------------------------------------------- rebuild


@dataclass(frozen=True)
class RebuildSpec:
    task: str
    base: tuple[TensorInfo, ...]  # every tensor of this part, in output order
    tau_file: str | None  # None when the part has no float tensors
    mask_file: str | None
    expected: dict[str, str]  # bundle file URI -> sha256 from the manifest
    output: str  # output file URI
    chunk_elems: int
    storage: StorageOptions = StorageOptions()


def rebuild_specs(
    run: str,
    manifest: dict,
    task: str,
    parts: dict[str, list[str]],
    base,
    output: str,
    options: StorageOptions,
    chunk_elems: int,
    model_order,
) -> list[RebuildSpec]:
    """One spec per model part (`parts`: part -> its tensors, from the model index)."""
    expect = manifest["outputs"]
    index = json.loads(verified_bytes(run, INDEX, expect, options))
    specs = []
    for part, tensors in sorted(parts.items()):
        tau_rel, mask_rel = tau_file(part), mask_file(part, task)
        has_float = any(n in index["tensors"] for n in tensors)
        expected = {join(run, r): expect[r]["sha256"] for r in (tau_rel, mask_rel) if has_float}
        specs.append(
            RebuildSpec(
                task=task,
                base=tuple(base.tensors[n] for n in model_order(part, tensors)),
                tau_file=join(run, tau_rel) if has_float else None,
                mask_file=join(run, mask_rel) if has_float else None,
                expected=expected,
                output=join(output, f"model-{part}.safetensors"),
                chunk_elems=chunk_elems,
                storage=options,
            )
        )
    return specs


def verified_bytes(run: str, rel: str, expect: dict, options: StorageOptions) -> bytes:
    import hashlib

    from mergeflow.infra.storage import storage_for

    if rel not in expect:
        raise CheckpointError(f"{run}: {rel} is not listed in manifest.json")
    data = storage_for(run, options).read_bytes(join(run, rel))
    if hashlib.sha256(data).hexdigest() != expect[rel]["sha256"]:
        raise CheckpointError(f"{join(run, rel)}: sha256 does not match manifest.json; the run is corrupt")
    return data


def verify(uri: str, expected: str, options: StorageOptions) -> None:
    got = sha256_of(uri, options)
    if got != expected:
        raise CheckpointError(
            f"{uri}: sha256 {got[:12]}... does not match the manifest ({expected[:12]}...); the bundle is corrupt"
        )


def rebuild_part(spec: RebuildSpec) -> tuple[str, int]:
    from mergeflow.workers.shard import to_bytes

    for uri, sha in spec.expected.items():
        verify(uri, sha, spec.storage)
    tau = read_header(spec.tau_file, spec.storage).tensors if spec.tau_file else {}
    masks = read_header(spec.mask_file, spec.storage).tensors if spec.mask_file else {}
    entries = [(b.name, b.dtype, b.shape) for b in spec.base]
    with ExitStack() as files:
        reader = ShardReader(spec.storage, files)
        writer = StreamingWriter(spec.output, entries, spec.storage)
        try:
            for b in spec.base:
                if b.name not in tau:
                    for lo, hi in chunk_ranges(b.numel, spec.chunk_elems):
                        writer.write(b.name, reader.elements(b, lo, hi).numpy().tobytes())
                    continue
                t, m = tau[b.name], masks.get(b.name)
                if m is None or t.numel != b.numel:
                    raise CheckpointError(f"{spec.tau_file}: tensor {b.name!r} does not match the base checkpoint")
                for lo, hi in chunk_ranges(b.numel, spec.chunk_elems):
                    base = reader.elements(b, lo, hi).float()
                    delta = reader.elements(t, lo, hi).float()
                    bits = unpack(reader.elements(m, lo // 8, (hi + 7) // 8), hi - lo)
                    rebuilt = base + torch.where(bits, delta, torch.zeros((), dtype=delta.dtype))
                    writer.write(b.name, to_bytes(rebuilt.to(TORCH_DTYPES[b.dtype])))
            sha = writer.commit()
        except BaseException:
            writer.abort()
            raise
    return sha, writer.bytes_written
