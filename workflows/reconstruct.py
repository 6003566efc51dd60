"""`mergeflow reconstruct RUN --task NAME --output DIR`: one task's model from the bundle."""

from __future__ import annotations

import json
import logging
import re

from mergeflow.errors import CheckpointError, MergeflowError, OutputError
from mergeflow.infra.storage import StorageOptions, basename, join, sha256_of, storage_for
from mergeflow.workers.checkpoint import SINGLE_NAME, open_checkpoint
from mergeflow.workers.chunking import GPU_CHUNK
from mergeflow.workers.methods import get_method, methods
from mergeflow.workflows import runtime
from mergeflow.workflows.commit import MANIFEST, SKIP_NAMES, read_manifest

log = logging.getLogger(__name__)

MODEL_PART = re.compile(r"model-(\d{5}-of-\d{5})\.safetensors")


def load_run(run: str, options: StorageOptions) -> dict:
    manifest = read_manifest(run, options)
    if manifest is None:
        raise MergeflowError(f"{run}: no manifest.json; not a finished mergeflow run (was the merge interrupted?)")
    return manifest


def reconstruct(
    run: str,
    task: str,
    output: str,
    options: StorageOptions,
    *,
    ray_address: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    manifest = load_run(run, options)
    names = [t["name"] for t in manifest["inputs"]["tasks"]]
    method = get_method(manifest["method"]["name"])
    if not method.compresses:
        raise MergeflowError(
            f"{run}: method {method.name} wrote no compressed bundle; reconstruct needs a run of a "
            f"method that compresses ({', '.join(sorted(n for n, m in methods().items() if m.compresses))})"
        )
    if task not in names:
        raise MergeflowError(f"{run}: no task {task!r} in this run; it has {', '.join(names)}")
    out_store = storage_for(output, options)
    if out_store.list(output) and not overwrite:
        raise OutputError(f"{output}: exists and is not empty; choose a new location or pass --overwrite")

    store = storage_for(run, options)
    expect = manifest["outputs"]
    weight_map = json.loads(_verified(store, run, "model/model.safetensors.index.json", expect))["weight_map"]
    base_uri = manifest["inputs"]["base"]["uri"]
    base = open_checkpoint(base_uri, options)
    base_expected = {
        join(base_uri, n) if not base_uri.endswith(".safetensors") else base_uri: f["sha256"]
        for n, f in manifest["inputs"]["base"]["files"].items()
    }

    if set(weight_map.values()) == {SINGLE_NAME}:  # model/ is one file: the parts are in the manifest
        parts = _recorded_parts(run, manifest, weight_map)
        order_file = f"model/{SINGLE_NAME}"
    else:
        parts = _index_parts(run, weight_map)
        order_file = None
    specs = method.rebuild_specs(
        run,
        manifest,
        task,
        parts,
        base,
        output,
        options,
        GPU_CHUNK,
        lambda part, tensors: _model_order(run, order_file or f"model/model-{part}.safetensors", tensors, options),
    )

    runtime.connect(ray_address)
    base_files = list(base_expected.items())
    got = runtime.run_tasks(
        sha256_of,
        [(f, options) for f, _ in base_files],
        desc="verify base",
        quiet=quiet,
        sizes=[base.file_sizes[f] for f, _ in base_files],
    )
    for (f, want), have in zip(base_files, got):
        if want != have:
            raise CheckpointError(
                f"{f}: the base checkpoint changed since the merge (sha256 differs from the manifest)"
            )
    results = runtime.run_tasks(
        method.rebuild_part,
        [(s,) for s in specs],
        desc=f"rebuild {task}",
        sizes=[sum(b.nbytes for b in s.base) for s in specs],
        quiet=quiet,
    )
    files = {basename(s.output): {"sha256": sha, "size": size} for s, (sha, size) in zip(specs, results)}
    total = sum(b.nbytes for s in specs for b in s.base)
    out_index = {
        "metadata": {"total_size": total, "format": "pt"},
        "weight_map": {b.name: basename(s.output) for s in specs for b in s.base},
    }
    out_store.write_bytes(join(output, "model.safetensors.index.json"), json.dumps(out_index, indent=2).encode())
    for rel in expect:  # the merged model's tokenizer, configs, module folders, model card
        if rel.startswith("model/") and not rel.endswith(".safetensors") and basename(rel) not in SKIP_NAMES:
            out_store.write_bytes(join(output, rel[len("model/") :]), _verified(store, run, rel, expect))
    return {"task": task, "files": files, "run": run}


def _index_parts(run: str, weight_map: dict) -> dict[str, list[str]]:
    parts: dict[str, list[str]] = {}
    for name, fname in sorted(weight_map.items(), key=lambda kv: str(kv[1]) == SINGLE_NAME):
        m = MODEL_PART.fullmatch(str(fname))
        if m is None:  # the part names every file this command reads and writes: never a path
            raise CheckpointError(
                f"{run}: model/model.safetensors.index.json maps {name!r} to {fname!r}, not a "
                "model part file of a mergeflow run (the run is corrupt or was tampered with)"
            )
        parts.setdefault(m.group(1), []).append(name)
    return parts


def _recorded_parts(run: str, manifest: dict, weight_map: dict) -> dict[str, list[str]]:
    """The shards' layout from the manifest (bundles are written per shard), checked like the index."""
    parts = manifest.get("model_parts")
    if not isinstance(parts, dict) or sorted(n for names in parts.values() for n in names) != sorted(weight_map):
        raise CheckpointError(f"{run}: manifest.json has no model_parts covering model/ (the run is corrupt)")
    for part in parts:
        if not MODEL_PART.fullmatch(f"model-{part}.safetensors"):
            raise CheckpointError(
                f"{run}: manifest.json names a model part {part!r}, not one of a mergeflow run (corrupt or tampered)"
            )
    return parts


def _model_order(run: str, rel: str, names: list[str], options) -> list[str]:
    """Tensors in the order the merged model file holds them (its header), so output
    files mirror the merged model's layout."""
    from mergeflow.workers.safetensors_io import read_header

    header = read_header(join(run, rel), options)
    return sorted(names, key=lambda n: header.tensors[n].start)


def _verified(store, run: str, rel: str, expect: dict) -> bytes:
    import hashlib

    if rel not in expect:
        raise CheckpointError(f"{run}: {rel} is not listed in {MANIFEST}")
    data = store.read_bytes(join(run, rel))
    if hashlib.sha256(data).hexdigest() != expect[rel]["sha256"]:
        raise CheckpointError(f"{join(run, rel)}: sha256 does not match {MANIFEST}; the run is corrupt")
    return data
