"""Find a checkpoint's safetensors files and the location of every tensor, from headers alone.

A checkpoint is a Hugging Face style directory (`model.safetensors`, or shards plus
`model.safetensors.index.json`; `config.json` alongside) or one `.safetensors`
file, on a local path or under s3://. Pickled `.bin` checkpoints are refused:
loading them would execute code from the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from mergeflow.errors import CheckpointError, StorageError
from mergeflow.infra.storage import StorageOptions, basename, join, storage_for
from mergeflow.workers import lora
from mergeflow.workers.safetensors_io import FileHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class UnreadableIndex(CheckpointError):
    """An index that is not JSON at all; discovery takes it for one still being written."""


@dataclass(frozen=True)
class Checkpoint:
    """Headers of one checkpoint: enough to plan and to read any tensor by range."""

    uri: str
    files: tuple[str, ...]
    file_sizes: dict[str, int]
    tensors: dict[str, TensorInfo]
    config_json: str | None  # URI of config.json when present
    adapter: dict | None = None  # a PEFT LoRA adapter's config (tensors then come from workers/lora.py's bind)

    @property
    def nbytes(self) -> int:
        return sum(self.file_sizes.values())


def resolve_files(uri: str, options: StorageOptions | None = None) -> tuple[list[str], str | None]:
    """The safetensors files making up the checkpoint at `uri`, and its config.json if any.

    Storage failures (no access, missing bucket, unreachable endpoint) come out as
    CheckpointError one-liners naming the URI, like every other checkpoint problem."""
    try:
        return _resolve_files(uri, options)
    except StorageError as e:
        raise CheckpointError(str(e)) from None


def _resolve_files(uri: str, options: StorageOptions | None) -> tuple[list[str], str | None]:
    store = storage_for(uri, options)
    if uri.endswith(".safetensors"):
        if not store.exists(uri):
            raise CheckpointError(f"{uri}: checkpoint file not found")
        return [uri], None
    if uri.endswith((".bin", ".pt", ".pth", ".ckpt")):
        raise CheckpointError(f"{uri}: pickled checkpoints are refused (unsafe to load); convert to safetensors first")
    config_uri = join(uri, "config.json")
    config = config_uri if store.exists(config_uri) else None
    names = folder_files(uri, lambda n: store.exists(join(uri, n)), store.read_bytes)
    if names is not None:
        return [join(uri, n) for n in names], config
    # An object store's "folder" exists when objects lie under it (its exists() checks the prefix).
    if config is None and not store.exists(uri):
        where = store.missing_hint(uri)
        raise CheckpointError(f"{uri}: checkpoint not found{where}")
    if store.exists(join(uri, "pytorch_model.bin")):
        raise CheckpointError(
            f"{uri}: only pytorch_model.bin found; pickled checkpoints are refused, convert to safetensors"
        )
    if store.exists(join(uri, "adapter_model.bin")):
        raise CheckpointError(
            f"{uri}: only adapter_model.bin found; pickled adapters are refused, save with "
            "safe_serialization (adapter_model.safetensors)"
        )
    raise CheckpointError(f"{uri}: no {SINGLE_NAME}, {INDEX_NAME} or PEFT adapter ({lora.WEIGHTS}) found")


def folder_files(folder: str, has: Callable[[str], bool], read_bytes: Callable[[str], bytes]) -> list[str] | None:
    """Names of the safetensors files a checkpoint folder is read from, or None when it has neither
    an index nor model.safetensors. The index wins when both are there. `has(name)` says whether
    the folder holds a file; shared with tasks_from discovery, so a folder counts as complete by the
    very files a merge will read."""
    if has(INDEX_NAME):
        index_uri = join(folder, INDEX_NAME)
        return index_shards(index_uri, read_bytes(index_uri))
    if has(SINGLE_NAME):
        return [SINGLE_NAME]
    if has(lora.CONFIG) and has(lora.WEIGHTS):  # a PEFT adapter: its config decides the task vector too
        return [lora.WEIGHTS, lora.CONFIG]
    return None


def index_shards(index_uri: str, data: bytes) -> list[str]:
    """The shard names an index's weight_map lists, sorted, each a plain file name beside the index."""
    try:
        index = json.loads(data)
    except ValueError:  # a truncated index is not JSON: UnreadableIndex lets discovery wait for the rest
        raise UnreadableIndex(f"{index_uri}: not a valid safetensors index (not JSON)") from None
    try:
        names = sorted(set(index["weight_map"].values()))
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f"{index_uri}: not a valid safetensors index (needs a 'weight_map' of tensor name to shard file name)"
        ) from None
    if not names:
        raise CheckpointError(f"{index_uri}: its weight_map lists no shards")
    for name in names:
        if not _plain_shard_name(name):
            # A crafted index must not make a merge read (and publish the sums of) files elsewhere.
            raise CheckpointError(
                f"{index_uri}: weight_map entry {name!r} is not a .safetensors file name in the "
                "checkpoint folder; list shards by bare file name"
            )
    return names


def _plain_shard_name(name: object) -> bool:
    # No separator means no "../", no absolute path and no sub-folder; NUL would break the path itself.
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0")
    )


def open_checkpoint(uri: str, options: StorageOptions | None = None) -> Checkpoint:
    """Read every header of a checkpoint (a few KiB per file) in parallel. A PEFT adapter's tensors
    are its own (lora_A, lora_B, ...) until `bind_adapter` maps them onto a base."""
    files, config = resolve_files(uri, options)
    weights = [f for f in files if f.endswith(".safetensors")]
    try:
        with ThreadPoolExecutor(max_workers=min(16, len(weights))) as pool:
            headers: list[FileHeader] = list(pool.map(lambda f: read_header(f, options), weights))
    except StorageError as e:
        raise CheckpointError(str(e)) from None
    tensors: dict[str, TensorInfo] = {}
    for h in headers:
        for name, info in h.tensors.items():
            if name in tensors:
                raise CheckpointError(
                    f"{uri}: tensor {name!r} appears in both {basename(tensors[name].file)} and {basename(h.file)}"
                )
            tensors[name] = info
    if not tensors:
        raise CheckpointError(f"{uri}: checkpoint holds no tensors")
    adapter = None
    if any(basename(f) == lora.CONFIG for f in files):
        cfg_uri = next(f for f in files if basename(f) == lora.CONFIG)
        adapter = lora.read_config(cfg_uri, storage_for(cfg_uri, options).read_bytes(cfg_uri))
    sizes = {h.file: h.size for h in headers}
    sizes |= {f: storage_for(f, options).size(f) for f in files if f not in sizes}
    return Checkpoint(uri, tuple(files), sizes, tensors, config, adapter)


def bind_adapter(task: Checkpoint, base: Checkpoint, where: str) -> Checkpoint:
    """An adapter checkpoint with its tensors as the base's names, each mapped to its source
    (workers/lora.py); a full checkpoint as it is."""
    if task.adapter is None:
        return task
    return replace(task, tensors=lora.bind(task.tensors, task.adapter, base.tensors, where))
