"""Decide what an output location may be used for, and make a run a result.

A run is a result exactly when OUT/manifest.json exists, and it is written last:
after the model index, the compressed index and the stats. A finished output is
only ever replaced with --overwrite, which first removes its manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from enum import Enum

from infra.storage import StorageOptions, basename, is_s3, join, storage_for
from workers.errors import OutputError
from workers.shard import ShardResult
from workflows.journal import JOURNAL_DIR, Journal
from workflows.plan import Plan

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "mergeflow.run/1"
OUR_DIRS = ("model", "compressed", "delta", "stats", JOURNAL_DIR)
SIDECAR_SUFFIXES = (".json", ".txt", ".model")  # config, tokenizer and friends copied next to the weights


class OutputState(Enum):
    FRESH = "fresh"
    RESUME = "resume"
    COMPLETE = "complete"


def read_manifest(output: str, options: StorageOptions | None = None) -> dict | None:
    store = storage_for(output, options)
    uri = join(output, MANIFEST)
    if not store.exists(uri):
        return None
    return json.loads(store.read_bytes(uri))


def clear(output: str, options: StorageOptions) -> None:
    store = storage_for(output, options)
    store.delete(join(output, MANIFEST))  # first: from here on the location holds no result
    for d in OUR_DIRS:
        store.delete_prefix(join(output, d))


def prepare_output(plan: Plan, overwrite: bool) -> OutputState:
    output, options = plan.config.output, plan.config.storage.options()
    store = storage_for(output, options)
    manifest = read_manifest(output, options)
    journal = Journal(output, options)
    if manifest is not None:
        if manifest.get("fingerprint") == plan.fingerprint and not overwrite:
            return OutputState.COMPLETE
        if not overwrite:
            raise OutputError(
                f"{output}: holds a finished merge of other inputs or settings (manifest.json); "
                "pass --overwrite to replace it or choose another --output"
            )
        log.warning("--overwrite: removing the finished run in %s", output)
        clear(output, options)
    elif journal.fingerprint() is not None:
        if journal.fingerprint() == plan.fingerprint:
            _drop_temp_files(output)
            return OutputState.RESUME
        log.warning("%s: discarding an unfinished run of other inputs or settings", output)
        clear(output, options)
    elif [u for u in store.list(output) if not basename(u).startswith(".")]:
        raise OutputError(f"{output}: exists and is not a mergeflow run; choose an empty or new output location")
    journal.start(plan.fingerprint)
    return OutputState.FRESH


def _drop_temp_files(output: str) -> None:
    """Temporary files of writers killed mid-shard (local outputs only; S3 multipart
    uploads that never completed are invisible)."""
    if is_s3(output):
        return
    from pathlib import Path

    for p in Path(output).rglob(".*.tmp"):
        p.unlink(missing_ok=True)


def write_model_index(plan: Plan) -> dict[str, tuple[str, int]]:
    """model.safetensors.index.json plus the base's config/tokenizer files. Returns written files."""
    options = plan.config.storage.options()
    store = storage_for(plan.config.output, options)
    weight_map = {}
    total = 0
    for spec in plan.shards:
        for job in spec.tensors:
            weight_map[job.name] = basename(spec.model_file())
            total += job.base.nbytes
    index = {"metadata": {"total_size": total, "format": "pt"}, "weight_map": weight_map}
    written = {"model/model.safetensors.index.json": _put(store, plan.config.output, "model/model.safetensors.index.json", json.dumps(index, indent=2).encode())}
    for uri in _sidecars(plan):
        rel = f"model/{basename(uri)}"
        written[rel] = _put(store, plan.config.output, rel, storage_for(uri, options).read_bytes(uri))
    return written


def _sidecars(plan: Plan) -> list[str]:
    if plan.base.uri.endswith(".safetensors"):
        return []
    store = storage_for(plan.base.uri, plan.config.storage.options())
    out = []
    for uri in store.list(plan.base.uri):
        name = basename(uri)
        if name.endswith(SIDECAR_SUFFIXES) and name != "model.safetensors.index.json" and "/" not in uri[len(plan.base.uri) + 1 :]:
            out.append(uri)
    return out


def write_compressed_index(plan: Plan) -> dict[str, tuple[str, int]]:
    tensors = {}
    for spec in plan.shards:
        for job in spec.tensors:
            if job.is_float:
                tensors[job.name] = {"part": spec.part, "dtype": job.dtype, "shape": list(job.shape)}
    doc = {
        "format": "mergeflow.tall/1",
        "tasks": list(plan.task_names),
        "lambdas": dict(zip(plan.task_names, plan.params.lambdas)),
        "tau_mtl": {"files": [s.tau_file() for s in plan.shards], "dtype": plan.params.store_dtype},
        "masks": {t: [s.mask_file(t) for s in plan.shards] for t in plan.task_names},
        "mask_order": "np.packbits (first element in the most significant bit), count = numel",
        "tensors": tensors,
    }
    store = storage_for(plan.config.output, plan.config.storage.options())
    return {"compressed/index.json": _put(store, plan.config.output, "compressed/index.json", json.dumps(doc, indent=1).encode())}


def _put(store, output: str, rel: str, data: bytes) -> tuple[str, int]:
    store.write_bytes(join(output, rel), data)
    return hashlib.sha256(data).hexdigest(), len(data)


def put_files(plan: Plan, files: dict[str, bytes]) -> dict[str, tuple[str, int]]:
    """Write small files under the run; returns {relative path: (sha256, size)} for the manifest."""
    store = storage_for(plan.config.output, plan.config.storage.options())
    return {rel: _put(store, plan.config.output, rel, data) for rel, data in files.items()}


def write_manifest(plan: Plan, outputs: dict[str, tuple[str, int]], inputs: dict[str, tuple[str, int]], extra: dict) -> dict:
    from workflows import __version__

    def files_of(cp) -> dict:
        # The stamp (size + mtime or ETag) lets a re-merge trust this sha256 without reading the file again.
        stamp = lambda f: {"stamp": plan.stamps[f]} if f in plan.stamps else {}  # noqa: E731
        return {basename(f): {"sha256": inputs[f][0], "size": inputs[f][1], **stamp(f)} for f in cp.files}

    doc = {
        "format": FORMAT,
        "mergeflow_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": plan.fingerprint,
        "method": plan.params.__dict__ | {"lambdas": dict(zip(plan.task_names, plan.params.lambdas))},
        "inputs": {
            "base": {"uri": plan.base.uri, "files": files_of(plan.base)},
            "tasks": [{"name": n, "uri": cp.uri, "files": files_of(cp)} for n, cp in zip(plan.task_names, plan.tasks)],
        },
        "shards": len(plan.shards),
        "outputs": {rel: {"sha256": sha, "size": size} for rel, (sha, size) in sorted(outputs.items())},
        **extra,
    }
    store = storage_for(plan.config.output, plan.config.storage.options())
    store.write_bytes(join(plan.config.output, MANIFEST), json.dumps(doc, indent=1).encode())
    return doc


def shard_outputs(results: list[ShardResult]) -> dict[str, tuple[str, int]]:
    return {rel: v for r in results for rel, v in r.outputs.items()}
