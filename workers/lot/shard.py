"""LOT's merge of one shard: per tensor, the closed-form solution its statistics allow.

Same inputs and outputs as workers/shard.py's merge_shard (a ShardSpec in; the shard's model file
and/or its float32 delta file out, through the same range reads and streaming writer), plus one
statistics file per task. The delta file holds Delta* unscaled, so alpha selection and apply_shard
work on LOT runs as on any other.
Linear weights stream over row blocks: pinv(sum_t G_t) is computed once per tensor and each block
of rows is solved on its own, so memory is O(T x in^2) for the Grams plus O(T x block x in).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack

import numpy as np
import torch

from mergeflow.workers.dtypes import TORCH_DTYPES
from mergeflow.errors import CheckpointError
from mergeflow.workers.layers import layer_of
from mergeflow.workers.lot import solve
from mergeflow.workers.lot.features import ENERGY, GRAM, ROWS
from mergeflow.workers.lot.rules import agreed_rule
from mergeflow.workers.safetensors_io import TensorInfo, read_header
from mergeflow.workers.shard import (LayerStats, ShardReader, ShardResult, ShardSpec, TensorJob, _bytes, _open_writers,
                           apply_alpha, commit_writers, copy_exact, task_chunks)


def _stat(reader: ShardReader, info: TensorInfo, device: torch.device) -> torch.Tensor:
    return reader.elements(info, 0, info.numel).to(device).to(torch.float64).reshape(info.shape)


def lot_shard(spec: ShardSpec, stats: tuple[str, ...]) -> ShardResult:
    """Merge one shard with LOT; `stats[t]` is task t's statistics file (workers/lot/features.py)."""
    t0 = time.perf_counter()
    device = torch.device(spec.device)
    headers = [read_header(uri, spec.storage).tensors for uri in stats]
    keys = [set(h) for h in headers]
    t = len(spec.task_names)
    alpha = spec.params.alpha
    result = ShardResult(spec.index, {}, {})
    with ExitStack() as cleanup, ExitStack() as files:
        reader = ShardReader.for_spec(spec, files)
        writers = _open_writers(spec, False, cleanup)  # model/ and/or delta/, as spec.write_model/write_delta say
        model, delta_file = writers.get(spec.model_file()), writers.get(spec.delta_file())
        for job in spec.tensors:
            if not job.is_float:
                copy_exact(spec, job, reader, model)
                continue
            rule = agreed_rule(job.name, spec.task_names, keys)
            stats_layer = LayerStats(0, np.zeros(t))
            out_dtype = TORCH_DTYPES[job.dtype]
            for lo, hi, base, delta, taus in _solve(spec, job, rule, headers, reader, device):
                delta = delta.to(torch.float32)
                if model is not None:
                    model.write(job.name, _bytes(apply_alpha(base, delta, alpha, out_dtype)))
                if delta_file is not None:
                    delta_file.write(job.name, _bytes(delta))
                stats_layer.add(LayerStats(hi - lo, (taus.double() ** 2).sum(dim=1).cpu().numpy()))
            result.layers.setdefault(layer_of(job.name), LayerStats(0, np.zeros(t))).add(stats_layer)
        commit_writers(writers, cleanup, reader, result)
    result.seconds = time.perf_counter() - t0
    return result


def _solve(spec: ShardSpec, job: TensorJob, rule: str, headers: list[dict[str, TensorInfo]], reader: ShardReader,
           device: torch.device):
    """Yield (lo, hi, base, delta*, taus) over the tensor's flattened elements."""
    if rule == "linear":
        if len(job.shape) != 2:
            raise CheckpointError(f"tensor {job.name!r}: LOT has an input Gram for it but it is not 2-D {list(job.shape)}")
        width = job.shape[1]
        infos = [h[GRAM + job.name] for h in headers]
        _check_shape(job, spec.task_names, infos, (width, width), "input Gram")
        grams = [_stat(reader, i, device) for i in infos]
        pinv = solve.gram_pinv(grams)
        # chunks of whole rows: a row block's solution needs only its own rows
        rows_spec = dataclasses.replace(spec, chunk_elems=max(1, spec.chunk_elems // width) * width)
        for lo, hi, base, taus in task_chunks(rows_spec, job, reader):
            blocks = [row.view(-1, width) for row in taus]
            yield lo, hi, base, solve.linear_rows(blocks, grams, pinv).reshape(-1), taus
        return
    if rule == "norm_scale":
        infos = [h[ENERGY + job.name] for h in headers]
        _check_shape(job, spec.task_names, infos, (job.numel,), "channel energy")
        energies = torch.stack([_stat(reader, i, device) for i in infos])
        for lo, hi, base, taus in task_chunks(spec, job, reader):
            yield lo, hi, base, solve.norm_scale_delta(taus, energies[:, lo:hi]), taus
        return
    if rule == "additive":
        rows = [float(_stat(reader, h[ROWS + job.name], device)[0]) for h in headers]
        for lo, hi, base, taus in task_chunks(spec, job, reader):
            yield lo, hi, base, solve.additive_delta(taus, rows), taus
        return
    for lo, hi, base, taus in task_chunks(spec, job, reader):
        yield lo, hi, base, solve.mean_delta(taus), taus


def _check_shape(job: TensorJob, tasks: tuple[str, ...], infos: list[TensorInfo], shape: tuple[int, ...], what: str) -> None:
    for task, info in zip(tasks, infos):
        if tuple(info.shape) != shape:
            raise CheckpointError(f"task {task!r}: LOT {what} for tensor {job.name!r} has shape {list(info.shape)}, "
                                  f"expected {list(shape)} for a tensor of shape {list(job.shape)}")
