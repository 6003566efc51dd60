"""Decide what an output location may be used for, and make a run a result.

A run is a result exactly when OUT/manifest.json exists, and it is written last:
after the model index, the compressed index and the stats. A finished output is
only ever replaced with --overwrite, which first removes its manifest and then only
the files that manifest or the run's journal lists: a folder is mergeflow's only when
its manifest says so (`format: mergeflow.run/1`) or it holds a journal, and anything
else is refused untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from enum import Enum

from mergeflow.errors import MergeflowError, OutputError
from mergeflow.infra.storage import StorageOptions, basename, join, plain_name, safe_relpath, storage_for
from mergeflow.workers.safetensors_io import StreamingWriter, read_header
from mergeflow.workers.shard import ShardResult
from mergeflow.workflows.config import TASK_NAME
from mergeflow.workflows.journal import Journal
from mergeflow.workflows.plan import Plan

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRACKING = "tracking.json"
FORMAT = "mergeflow.run/1"
OUR_DIRS = ("model", "compressed", "delta", "stats", "lora")
# Names our shard writers give their files: what a commit may remove when no record lists it.
PART_FILE = re.compile(r"(-\d{5}-of-\d{5}|^model/model)\.safetensors$")  # model.safetensors: one-file model/


class OutputState(Enum):
    FRESH = "fresh"
    RESUME = "resume"
    COMPLETE = "complete"


def parse_manifest(uri: str, data: bytes) -> dict:
    """A manifest this mergeflow wrote, with every file name in it checked to stay inside its folder."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        doc = None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("mergeflow.run/"):
        raise OutputError(
            f"{uri}: not a manifest mergeflow wrote (no 'format: {FORMAT}'); nothing was touched: "
            "move it away or choose another location"
        )
    if fmt != FORMAT:
        raise OutputError(
            f"{uri}: written in format {fmt!r}, which this mergeflow ({FORMAT}) does not read; upgrade mergeflow"
        )
    try:
        for rel in doc["outputs"]:
            safe_relpath(rel, f"{uri}: outputs")
        for cp in [doc["inputs"]["base"], *doc["inputs"]["tasks"]]:
            for name in cp["files"]:
                plain_name(name, f"{uri}: inputs")
        for task in doc["inputs"]["tasks"]:
            if not isinstance(task["name"], str) or not TASK_NAME.fullmatch(task["name"]):
                raise OutputError(f"{uri}: task name {task['name']!r} is not a valid task name")
    except (KeyError, TypeError, AttributeError):
        raise OutputError(f"{uri}: a mergeflow manifest missing its outputs or inputs (the run is corrupt)") from None
    except MergeflowError as e:
        raise OutputError(f"{e} (the run is corrupt or was tampered with)") from None
    return doc


def read_manifest(output: str, options: StorageOptions | None = None) -> dict | None:
    store = storage_for(output, options)
    uri = join(output, MANIFEST)
    if not store.exists(uri):
        return None
    return parse_manifest(uri, store.read_bytes(uri))


def clear(output: str, options: StorageOptions, manifest: dict | None) -> None:
    """Remove the mergeflow run at `output`: its manifest first (from then on the location holds no
    result), then the files it or the journal lists, our writers' leftovers and the journal.
    Nothing else is touched."""
    store = storage_for(output, options)
    journal = Journal(output, options)
    listed = set(manifest["outputs"]) if manifest else set()
    listed |= journal.listed_outputs()
    store.delete(join(output, MANIFEST))
    for rel in sorted(listed):
        store.delete(join(output, rel))
    if store.exists(join(output, TRACKING)):
        store.delete(join(output, TRACKING))
    for d in OUR_DIRS:
        store.drop_partial_writes(join(output, d))
    store.delete_prefix(journal.root)
    store.remove_empty_dirs(output, OUR_DIRS)


def refuse_foreign(output: str, options: StorageOptions) -> None:
    """Raise unless `output` is new, empty, or a mergeflow run (read-only: before the lock is taken)."""
    if read_manifest(output, options) is None and Journal(output, options).fingerprint() is None:
        store = storage_for(output, options)
        if [u for u in store.list(output) if not basename(u).startswith(".")]:
            raise OutputError(
                f"{output}: exists and is not a mergeflow run; nothing was touched: choose an empty "
                "or new output location"
            )


def prepare_output(plan: Plan, overwrite: bool) -> OutputState:
    output, options = plan.config.output, plan.config.storage.options()
    refuse_foreign(output, options)
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
        clear(output, options, manifest)
    elif journal.fingerprint() is not None:
        if journal.fingerprint() == plan.fingerprint:
            drop_partial_writes(output, options)
            return OutputState.RESUME
        log.warning("%s: discarding an unfinished run of other inputs or settings", output)
        clear(output, options, None)
    journal.start(plan.fingerprint)
    return OutputState.FRESH


def drop_partial_writes(output: str, options: StorageOptions) -> None:
    """What writers killed mid-file left in our folders: local temp files, S3 uploads never completed."""
    store = storage_for(output, options)
    for d in OUR_DIRS:
        store.drop_partial_writes(join(output, d))


def sweep(plan: Plan, outputs: dict[str, tuple[str, int]]) -> None:
    """Before the manifest: our folders hold exactly the files it will list. Temp files of killed
    workers (Ray retried their shards) and part files no record lists (an earlier attempt of this
    run) go; anything else found there is reported, not deleted."""
    output, options = plan.config.output, plan.config.storage.options()
    drop_partial_writes(output, options)
    store = storage_for(output, options)
    prefix = output.rstrip("/") + "/"
    for d in OUR_DIRS:
        for uri in store.list(join(output, d)):
            rel = uri[len(prefix) :]
            if rel in outputs:
                continue
            if PART_FILE.search(rel):
                store.delete(uri)
            else:
                log.warning("%s: not written by this run; left in place, but not part of the result", uri)


SINGLE_FILE = "model/model.safetensors"
COPY_BLOCK = 64 * 2**20  # bytes per read when the parts are joined


def consolidate(plan: Plan, outputs: dict[str, tuple[str, int]]) -> tuple[dict[str, tuple[str, int]], bool]:
    """model/ as one model.safetensors when its parts together fit execution.max_file_size: the parts'
    tensors in part order, copied block by block and hashed while written. Returns the outputs with
    the single file in place of the parts (which sweep() removes) and whether it was written."""
    parts = [s.model_file() for s in plan.shards]
    limit = plan.config.execution.max_file_size
    if not limit or any(p not in outputs for p in parts) or sum(outputs[p][1] for p in parts) > limit:
        return outputs, False
    output, options = plan.config.output, plan.config.storage.options()
    layouts = []
    for rel in parts:
        header = read_header(join(output, rel), options)
        layouts.append((rel, sorted(header.tensors.values(), key=lambda i: i.start)))
    entries = [(i.name, i.dtype, tuple(i.shape)) for _, infos in layouts for i in infos]
    writer = StreamingWriter(join(output, SINGLE_FILE), entries, options, rel=SINGLE_FILE)
    try:
        for rel, infos in layouts:
            _copy_tensors(writer, join(output, rel), infos, options)
        sha = writer.commit()
    except BaseException:
        writer.abort()
        raise
    kept = {rel: v for rel, v in outputs.items() if rel not in parts}
    return kept | {SINGLE_FILE: (sha, writer.bytes_written)}, True


def restore_part(output: str, rel: str, entries: list, options: StorageOptions) -> tuple[str, int] | None:
    """A model part written again from model/model.safetensors (a run interrupted after its parts
    were joined, before its manifest): (sha256, size) of the part, or None when the joined file is
    not there or lacks the part's tensors. The caller compares with the journal's record."""
    single = join(output, SINGLE_FILE)
    if not storage_for(output, options).exists(single):
        return None
    tensors = read_header(single, options).tensors
    if any(name not in tensors for name, _, _ in entries):
        return None
    writer = StreamingWriter(join(output, rel), entries, options, rel=rel)
    try:
        _copy_tensors(writer, single, [tensors[name] for name, _, _ in entries], options)
        return writer.commit(), writer.bytes_written
    except BaseException:
        writer.abort()
        raise


def _copy_tensors(writer: StreamingWriter, uri: str, infos, options: StorageOptions) -> None:
    reader = storage_for(uri, options).open_reader(uri)
    try:
        for info in infos:
            for lo in range(info.start, info.end, COPY_BLOCK):
                writer.write(info.name, reader.read(lo, min(lo + COPY_BLOCK, info.end)))
    finally:
        reader.close()


def model_parts(plan: Plan) -> dict[str, list[str]]:
    """Which tensors each shard wrote: the layout a bundle's files follow once model/ is one file."""
    return {spec.part: [job.name for job in spec.tensors] for spec in plan.shards}


def write_model_index(plan: Plan, single: bool = False) -> dict[str, tuple[str, int]]:
    """model.safetensors.index.json plus the base's config/tokenizer files. Returns written files.
    With `single` the index maps every tensor to model.safetensors, for tools that read the index."""
    options = plan.config.storage.options()
    store = storage_for(plan.config.output, options)
    weight_map = {}
    total = 0
    for spec in plan.shards:
        for job in spec.tensors:
            weight_map[job.name] = basename(SINGLE_FILE if single else spec.model_file())
            total += job.base.nbytes
    index = {"metadata": {"total_size": total, "format": "pt"}, "weight_map": weight_map}
    written = {
        "model/model.safetensors.index.json": _put(
            store, plan.config.output, "model/model.safetensors.index.json", json.dumps(index, indent=2).encode()
        )
    }
    for rel_in_base, uri in _sidecars(plan):
        rel = f"model/{rel_in_base}"
        data = storage_for(uri, options).read_bytes(uri)
        if rel_in_base == "config.json":
            data = _honest_config(data, plan)
        written[rel] = _put(store, plan.config.output, rel, data)
    return written


# What a library needs next to the weights to load the model as the base loads: tokenizers, configs,
# generation and chat settings, sentence-transformers' modules.json and its module folders
# (1_Pooling/, 2_Normalize/, ...). Weights are not copied (the merge writes its own), nor pickles.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", ".gitattributes"}


def _sidecars(plan: Plan) -> list[tuple[str, str]]:
    """(path relative to the base folder, URI) of every non-weight file of the base."""
    if plan.base.uri.endswith(".safetensors"):
        return []
    store = storage_for(plan.base.uri, plan.config.storage.options())
    root = plan.base.uri.rstrip("/") + "/"
    out = []
    for uri in store.list(plan.base.uri):
        rel = uri[len(root) :] if uri.startswith(root) else basename(uri)
        parts = rel.split("/")
        if rel in SKIP_NAMES or rel.endswith(WEIGHT_SUFFIXES) or any(p.startswith(".") for p in parts):
            continue
        out.append((safe_relpath(rel, plan.base.uri), uri))
    return out


def _honest_config(data: bytes, plan: Plan) -> bytes:
    """config.json as the base has it, but with its torch_dtype the dtype the weights really have."""
    try:
        cfg = json.loads(data)
    except ValueError:
        return data
    dtypes = {j.dtype for s in plan.shards for j in s.tensors if j.is_float}
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    if not isinstance(cfg, dict) or len(dtypes) != 1:
        return data
    actual = names.get(next(iter(dtypes)))
    changed = False
    for key in ("torch_dtype", "dtype"):
        if key in cfg and cfg[key] != actual:
            cfg[key], changed = actual, True
    return json.dumps(cfg, indent=2).encode() + b"\n" if changed else data


def model_card(plan: Plan, method: dict, inputs: dict[str, tuple[str, int]]) -> bytes:
    """model/README.md: YAML front matter (base model, method and parameters, every input with its
    sha256, the mergeflow version; the convention Hugging Face model cards and mergekit follow) and a
    short human summary."""
    import yaml

    from mergeflow import __version__

    def digest(cp) -> str:
        return hashlib.sha256("\n".join(sorted(inputs[f][0] for f in cp.files)).encode()).hexdigest()

    from mergeflow.infra.tracking import redact

    library = "sentence-transformers" if any(r == "modules.json" for r, _ in _sidecars(plan)) else "transformers"
    front = {
        "base_model": redact(plan.base.uri),
        "library_name": library,
        "tags": ["merge", "mergeflow", method["name"]],
        "mergeflow": {
            "version": __version__,
            "method": method,
            "inputs": [{"name": "base", "uri": redact(plan.base.uri), "sha256": digest(plan.base)}]
            + [
                {"name": n, "uri": redact(cp.uri), "sha256": digest(cp), "kind": "lora" if cp.adapter else "full"}
                for n, cp in zip(plan.task_names, plan.tasks)
            ],
        },
    }
    params = ", ".join(f"{k} {v}" for k, v in method.items() if k != "name")
    body = (
        f"# {method['name']} merge of {len(plan.tasks)} tasks\n\nMerged by mergeflow {__version__} from "
        f"`{redact(plan.base.uri)}` and {', '.join(f'`{n}`' for n in plan.task_names)} ({params}). Every input's "
        "sha256 is above and in the run's manifest.json.\n"
    )
    return b"---\n" + yaml.safe_dump(front, sort_keys=False).encode() + b"---\n\n" + body.encode()


def _put(store, output: str, rel: str, data: bytes) -> tuple[str, int]:
    store.write_bytes(join(output, rel), data)
    return hashlib.sha256(data).hexdigest(), len(data)


def put_files(plan: Plan, files: dict[str, bytes]) -> dict[str, tuple[str, int]]:
    """Write small files under the run; returns {relative path: (sha256, size)} for the manifest."""
    store = storage_for(plan.config.output, plan.config.storage.options())
    return {rel: _put(store, plan.config.output, rel, data) for rel, data in files.items()}


def write_manifest(
    plan: Plan, method: dict, outputs: dict[str, tuple[str, int]], inputs: dict[str, tuple[str, int]], extra: dict
) -> dict:
    """manifest.json, last: `method` is the method's record (its name and every declared parameter)."""
    from mergeflow import __version__

    def files_of(cp) -> dict:
        # The stamp (size + mtime or ETag) lets a re-merge trust this sha256 without reading the file again.
        stamp = lambda f: {"stamp": plan.stamps[f]} if f in plan.stamps else {}  # noqa: E731
        return {basename(f): {"sha256": inputs[f][0], "size": inputs[f][1], **stamp(f)} for f in cp.files}

    doc = {
        "format": FORMAT,
        "mergeflow_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": plan.fingerprint,
        "method": method,
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
