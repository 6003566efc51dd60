"""Plan a merge from headers alone: validate the checkpoints against each other and
split the tensors into shards of whole layers with roughly equal input bytes.

Nothing here reads tensor data, so every check below runs in seconds and fails
before any heavy work starts.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mergeflow.errors import CheckpointError
from mergeflow.infra.storage import storage_for
from mergeflow.workers.checkpoint import Checkpoint, bind_adapter, open_checkpoint
from mergeflow.workers.dtypes import is_float
from mergeflow.workers.layers import group_layers, natural_key
from mergeflow.workers.methods import Method
from mergeflow.workers.shard import ShardSpec, TensorJob
from mergeflow.workflows.config import MergeConfig

MIN_AUTO_SHARD = 64 * 2**20
MAX_AUTO_SHARD = 2 * 2**30


@dataclass(frozen=True)
class Plan:
    config: MergeConfig
    method: Method
    params: object  # the method's parameters (auto values still auto)
    base: Checkpoint
    tasks: tuple[Checkpoint, ...]
    shards: tuple[ShardSpec, ...]
    fingerprint: str  # changes whenever the inputs, method or shard layout change
    stamps: dict[str, str] = field(default_factory=dict)  # input file -> size:mtime or size:ETag

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.config.task_names

    @property
    def input_bytes(self) -> int:
        return self.base.nbytes + sum(t.nbytes for t in self.tasks)

    @property
    def parameters(self) -> int:
        return sum(i.numel for i in self.base.tensors.values())

    def describe(self) -> str:
        params = self.method.describe_params(self.method.record(self.params, self.task_names))
        lines = [
            f"method      {self.method.name} ({params})",
            f"tasks       {len(self.tasks)}: {', '.join(self.task_names)}",
            f"tensors     {len(self.base.tensors)} ({self.parameters:,} parameters)",
            f"input       {self.input_bytes / 1e9:.3f} GB in {len(self.base.files) * (len(self.tasks) + 1)} files",
            f"shards      {len(self.shards)}",
            f"output      {self.config.output}",
        ]
        return "\n".join(lines)


def open_all(config: MergeConfig) -> tuple[Checkpoint, list[Checkpoint]]:
    options = config.storage.options()
    uris = [config.base] + [t.checkpoint for t in config.tasks]
    labels = ["base"] + [f"task {t.name!r}" for t in config.tasks]

    def one(i: int) -> Checkpoint:
        try:
            return open_checkpoint(uris[i], options)
        except CheckpointError as e:
            raise CheckpointError(f"{labels[i]}: {e}") from None

    with ThreadPoolExecutor(max_workers=8) as pool:
        cps = list(pool.map(one, range(len(uris))))
    base = cps[0]
    if base.adapter is not None:
        raise CheckpointError(
            f"base: {base.uri} is a PEFT adapter; the base must be a full checkpoint (the one the "
            "adapters were trained on)"
        )
    return base, [bind_adapter(cp, base, labels[i + 1]) for i, cp in enumerate(cps[1:])]


def check_compatible(base: Checkpoint, name: str, task: Checkpoint) -> None:
    """Same tensor names and shapes as the base; float vs non-float must agree."""
    missing = sorted(set(base.tensors) - set(task.tensors), key=natural_key)
    if missing:
        raise CheckpointError(f"task {name!r}: tensor {missing[0]!r} is missing ({task.uri}); it is in the base")
    extra = sorted(set(task.tensors) - set(base.tensors), key=natural_key)
    if extra:
        raise CheckpointError(f"task {name!r}: tensor {extra[0]!r} is not in the base ({task.uri})")
    for tname, b in base.tensors.items():
        t = task.tensors[tname]
        if t.shape != b.shape:
            raise CheckpointError(
                f"task {name!r}: tensor {tname!r} has shape {list(t.shape)}, the base has {list(b.shape)}"
            )
        if is_float(t.dtype) != is_float(b.dtype):
            raise CheckpointError(f"task {name!r}: tensor {tname!r} is {t.dtype}, the base has {b.dtype}")


def auto_shard_size(input_bytes: int) -> int:
    """Enough shards to keep a cluster busy, few enough that per-task overhead stays small."""
    return max(MIN_AUTO_SHARD, min(MAX_AUTO_SHARD, math.ceil(input_bytes / 32)))


def input_stamps(files: list[str], options) -> dict[str, str]:
    """Cheap change detection for every input file: size and mtime (local) or ETag (S3)."""

    def fp(f: str) -> str:
        return storage_for(f, options).fingerprint(f)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(files, pool.map(fp, files)))


def fingerprint(config: MergeConfig, base: Checkpoint, tasks: list[Checkpoint], groups, stamps: dict[str, str]) -> str:
    doc = {
        "params": config.method.model_dump(),
        "base": base.uri,
        "tasks": [[n, t.uri] for n, t in zip(config.task_names, tasks)],
        "files": stamps,
        "shards": groups,
    }
    if config.method.auto():
        doc["selection"] = config.selection.model_dump()
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=list).encode()).hexdigest()


def make_plan(config: MergeConfig, device: str = "cpu") -> Plan:
    method, params = config.method.method, config.method.params
    if config.method.auto():
        from mergeflow.workers.evaluation import load_evaluator

        load_evaluator(config.selection.evaluator)  # a bad evaluator fails here, before any tensor is read
    base, tasks = open_all(config)
    for name, task in zip(config.task_names, tasks):
        check_compatible(base, name, task)
    input_bytes = base.nbytes + sum(t.nbytes for t in tasks)
    ex = config.execution
    shard_size = auto_shard_size(input_bytes) if ex.shard_size == "auto" else int(ex.shard_size)
    groups = group_layers(base, tasks, shard_size)
    specs = tuple(
        ShardSpec(
            index=i,
            count=len(groups),
            tensors=tuple(TensorJob(n, base.tensors[n], tuple(t.tensors[n] for t in tasks)) for n in names),
            task_names=config.task_names,
            method=method,
            params=params,
            output=config.output,
            chunk_elems=ex.chunk_elems,
            device=device,
            storage=config.storage.options(),
            write_delta=ex.keep_delta is True,
        )
        for i, names in enumerate(groups)
    )
    stamps = input_stamps([f for cp in [base, *tasks] for f in cp.files], config.storage.options())
    return Plan(
        config, method, params, base, tuple(tasks), specs, fingerprint(config, base, tasks, groups, stamps), stamps
    )
