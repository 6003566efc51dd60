"""Re-merge of one shard of a running-sum method (Task Arithmetic): the parent run's unscaled sum
plus the tasks appended since.

Task Arithmetic sums task vectors strictly in task order (`running_sum`, t = 1..T, float32), and a
run that keeps `delta/` stores that float32 sum exactly. So when tasks 1..k are unchanged and tasks
k+1..T are appended, `previous + tau_{k+1} + ... + tau_T` performs the very same float32 additions
as a from-scratch merge and gives its bytes exactly, while reading only the previous sum, the base
and the new tasks. (Removing or replacing a task is not done by subtraction: float32 addition is not
invertible, so those re-merges recompute the sum.)
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from mergeflow.errors import CheckpointError
from mergeflow.workers.dtypes import TORCH_DTYPES
from mergeflow.workers.layers import layer_of
from mergeflow.workers.reading import ShardReader, chunk_ranges, copy_exact, task_row
from mergeflow.workers.safetensors_io import TensorInfo
from mergeflow.workers.shard import (
    LayerStats,
    ShardResult,
    ShardSpec,
    apply_scale,
    commit_writers,
    open_writers,
    to_bytes,
)


@dataclass(frozen=True)
class PreviousSum:
    """What a shard needs from the parent run: where its delta/ files hold each float tensor
    (float32, any shard layout), and per layer the sum of tau_t^2 of the tasks it summed."""

    tensors: dict[str, TensorInfo]
    tau_sq: dict[str, tuple[float, ...]]
    tasks: int  # k: the spec's first k tasks are already in the sum


def append_shard(spec: ShardSpec, previous: PreviousSum) -> ShardResult:
    """Like merge_shard for Task Arithmetic, from the previous sum: writes model/ and delta/."""
    t0 = time.perf_counter()
    k = previous.tasks
    new = dataclasses.replace(
        spec,
        task_names=spec.task_names[k:],
        tensors=tuple(dataclasses.replace(j, tasks=j.tasks[k:]) for j in spec.tensors),
    )
    device = torch.device(spec.device)
    result = ShardResult(spec.index, {}, {})
    with ExitStack() as cleanup, ExitStack() as files:
        reader = ShardReader.for_spec(spec, files)
        writers = open_writers(new, cleanup)
        model, delta = writers.get("model"), writers.get("delta")
        for job in new.tensors:
            if not job.is_float:
                copy_exact(new, job, reader, model)  # checks the new tasks agree with the base
                continue
            held = previous.tensors.get(job.name)
            if held is None or held.dtype != "F32" or held.shape != job.shape:
                raise CheckpointError(
                    f"tensor {job.name!r}: the previous run's delta/ does not hold it as "
                    f"float32{list(job.shape)}; re-merge from scratch"
                )
            sq = np.zeros(len(new.task_names))
            for lo, hi in chunk_ranges(job.numel, spec.chunk_elems):
                acc = reader.elements(held, lo, hi).to(device)
                base = reader.elements(job.base, lo, hi).to(device).float()
                _finite(base, "base", job.name)
                for i, (name, info) in enumerate(zip(new.task_names, job.tasks)):
                    tau = torch.empty(hi - lo, dtype=torch.float32, device=device)
                    task_row(tau, info, base, lo, hi, reader)
                    _finite(tau, f"task {name!r}", job.name)
                    acc += tau  # the next step of running_sum, in the same order
                    sq[i] += float((tau.double() ** 2).sum())
                if model is not None:
                    model.write(job.name, to_bytes(apply_scale(base, acc, spec.scale, TORCH_DTYPES[job.dtype])))
                if delta is not None:
                    delta.write(job.name, to_bytes(acc))
            layer = layer_of(job.name)
            stats = result.layers.setdefault(layer, LayerStats(0, np.zeros(len(spec.task_names))))
            old = np.zeros(len(spec.task_names))
            old[k:] = sq
            stats.add(LayerStats(job.numel, old))
        for layer, stats in result.layers.items():
            stats.tau_sq[:k] = previous.tau_sq[layer]
        commit_writers(writers, cleanup, reader, result)
    result.seconds = time.perf_counter() - t0
    return result


def _finite(x: torch.Tensor, who: str, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise CheckpointError(f"{who}: tensor {name!r} contains NaN or Inf values")
