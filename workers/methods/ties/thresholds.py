"""TIES trim thresholds, exact: per task the k-th smallest |tau_t| over the whole model (global
scope, as the paper and its code) or over one tensor (scope "tensor").

The counting math is workers/kth_value.py. Here: the passes over a shard's tensors (run in Ray
tasks by `run.map`), the driver's selection across shards, the zero guess for sparse task vectors,
and thresholds carried over from a re-merge's parent. docs/design.md explains the passes.
"""

from __future__ import annotations

import logging
import zlib
from contextlib import ExitStack

import numpy as np
import torch

from mergeflow.workers import kth_value
from mergeflow.workers.dtypes import TORCH_DTYPES
from mergeflow.workers.reading import ChunkBuffers, ShardReader, TensorAccess, check_finite, chunk_ranges, task_chunks
from mergeflow.workers.safetensors_io import TensorInfo

log = logging.getLogger(__name__)


# --------------------------------------------------------------------- passes over one shard


def _float_jobs(spec):
    return [j for j in spec.tensors if j.is_float]


def _phase(name: str) -> int:
    return zlib.crc32(name.encode())  # a fixed, name-dependent offset for each tensor's sample blocks


def _sample(spec, job, reader: ShardReader, buffers: ChunkBuffers, sample: kth_value.Sample) -> None:
    for _, _, _, taus in task_chunks(spec, job, reader, buffers, kth_value.sample_ranges(job.numel, _phase(job.name))):
        sample.add(taus)


def _count(
    spec, job, reader: ShardReader, buffers: ChunkBuffers, plan: kth_value.Plan, counts: list[torch.Tensor]
) -> None:
    """Add one tensor to a threshold pass's counts. A NaN or Inf shows as the largest bit
    pattern, so the finite check costs nothing unless one is there."""
    if kth_value.zeros_only(plan) and all(isinstance(i, TensorInfo) and i.dtype == job.dtype for i in job.tasks):
        _count_zeros(spec, job, reader, plan, counts)
        return
    top = 0
    for _, _, _, taus in task_chunks(spec, job, reader, buffers):
        top = max(top, kth_value.add_counts(counts, taus, plan))
    if top >= kth_value.NONFINITE_HIGH << 16:
        check_finite(spec, job, reader)  # raises, naming the input; else a finite difference overflowed


# Integer views of the float types, to compare stored values bit by bit.
_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _count_zeros(spec, job, reader: ShardReader, plan: kth_value.Plan, counts: list[torch.Tensor]) -> None:
    """The zeros-only pass in the stored dtype: tau_t is 0 exactly where the task's value equals
    the base's (widening is exact, and IEEE subtraction of two different floats is never 0).

    Equal floats have equal bits except +0.0 and -0.0, so the pass counts the nonzero xors of
    the bit patterns (~4x faster than a float comparison). Where the base holds a signed zero
    (rare) the chunk is compared as floats instead, as +0.0 == -0.0. A NaN counts as 0 when both
    sides hold the same NaN bits; the apply pass names any NaN or Inf input."""
    device = torch.device(spec.device)
    stored = TORCH_DTYPES[job.dtype]
    as_int = _SAME_WIDTH_INT[stored]
    for lo, hi in chunk_ranges(job.numel, spec.chunk_elems):
        base = reader.elements(job.base, lo, hi).to(device)
        diff = torch.empty(hi - lo, dtype=as_int, device=device)
        signed_zero = int(torch.count_nonzero(torch.bitwise_left_shift(base.view(as_int), 1, out=diff))) < hi - lo
        for t, (c, info) in enumerate(zip(plan, job.tasks)):
            if c.kind == "skip":
                continue
            value = reader.scratch_elements(info, lo, hi).to(device)
            if signed_zero:
                zeros = int(torch.count_nonzero(torch.eq(value, base)))
            else:
                torch.bitwise_xor(value.view(as_int), base.view(as_int), out=diff)
                zeros = (hi - lo) - int(torch.count_nonzero(diff))
            counts[t][1] += zeros
            counts[t][2] += (hi - lo) - zeros


def shard_sample(spec) -> tuple[kth_value.Sample, int]:
    """|tau| statistics of a 1/32 sample of this shard, and how many values it holds per task."""
    sample = kth_value.Sample.empty(len(spec.task_names))
    with ExitStack() as stack:
        reader = ShardReader.for_spec(spec, stack)
        buffers = ChunkBuffers(spec)
        for job in _float_jobs(spec):
            _sample(spec, job, reader, buffers, sample)
    return sample, sum(j.numel for j in _float_jobs(spec))


def shard_counts(spec, plan: kth_value.Plan) -> list[tuple[np.ndarray, np.ndarray]]:
    """One counting pass of the global thresholds over this shard (see kth_value.select)."""
    counts = kth_value.new_counts(plan, spec.device)
    with ExitStack() as stack:
        reader = ShardReader.for_spec(spec, stack)
        buffers = ChunkBuffers(spec)
        for job in _float_jobs(spec):
            _count(spec, job, reader, buffers, plan, counts)
    return kth_value.compact([c.cpu().numpy() for c in counts])


def tensor_thresholds(access: TensorAccess, density: float) -> torch.Tensor:
    """Per-tensor thresholds (scope "tensor"): the global selection's steps over one tensor."""
    spec, job, reader, buffers = access.spec, access.job, access.reader, access._buffers
    t = len(spec.task_names)
    sample = kth_value.Sample.empty(t)
    _sample(spec, job, reader, buffers, sample)

    def run_pass(plan: kth_value.Plan, _: int) -> list[np.ndarray]:
        counts = kth_value.new_counts(plan, spec.device)
        _count(spec, job, reader, buffers, plan, counts)
        return [c.cpu().numpy() for c in counts]

    k = np.full(t, kth_value.kth_rank(job.numel, density), dtype=np.int64)
    return torch.from_numpy(kth_value.select(run_pass, sample, job.numel, k))


# ------------------------------------------------------------------ the driver, over shards


def _sample_all(run) -> tuple[kth_value.Sample, int]:
    sample, total = kth_value.Sample.empty(len(run.task_names)), 0
    for part, numel in run.each_shard(shard_sample, desc="TIES threshold: sample"):
        sample, total = sample + part, total + numel
    return sample, total


def _ranks(run, total: int, density: float) -> np.ndarray:
    return np.full(len(run.task_names), kth_value.kth_rank(total, density), dtype=np.int64)


def exact(run, density: float, sampled: tuple[kth_value.Sample, int] | None = None) -> tuple[float, ...]:
    """Exact whole-model thresholds. A 1/32 sample places each k-th value in a narrow window; one
    counting pass then finds it exactly. Tasks whose window would be too wide, or missed, take
    two histogram passes."""
    sample, total = sampled or _sample_all(run)

    def run_pass(counting: kth_value.Plan, i: int) -> list[np.ndarray]:
        kinds = sorted({c.kind for c in counting} - {"skip"})
        counts = kth_value.summed(
            counting, run.each_shard(shard_counts, counting, desc=f"TIES threshold: pass {i + 1} ({'+'.join(kinds)})")
        )
        if i == 1:
            log.info(
                "TIES thresholds: %s needed more than one pass",
                ", ".join(run.task_names[j] for j, c in enumerate(counting) if c.kind != "skip"),
            )
        return counts

    return tuple(float(x) for x in kth_value.select(run_pass, sample, total, _ranks(run, total, density)))


def first(run, density: float, guess_zeros: bool) -> dict:
    """Thresholds for the journal: {"thresholds": [...]}, exact, or, when the sample puts every
    task's k-th |tau| at 0 with margin (sparse task vectors: most bf16 weights of a fine-tune often
    keep their base value), thresholds of 0 plus {"zeros_to_check": k}. The merge then counts each
    task's zeros and check_zeros confirms them: one pass over the inputs fewer, and the same
    result, as trimming at 0 keeps everything."""
    sample, total = _sample_all(run)
    k = _ranks(run, total, density)
    if guess_zeros and kth_value.zeros_expected(sample, total, k):
        return {"thresholds": [0.0] * len(run.task_names), "zeros_to_check": k.tolist()}
    return {"thresholds": list(exact(run, density, (sample, total)))}


def check_zeros(run, results: dict, density: float) -> bool:
    """True when every task has at least k exact zeros (the guessed thresholds of 0 are the exact
    ones); otherwise run.saved["thresholds"] becomes the exact thresholds and the caller merges again."""
    saved = run.saved
    k = np.asarray(saved.pop("zeros_to_check"), dtype=np.int64)
    zeros = np.sum([r.sums["zeros"] for r in results.values()], axis=0)
    short = [run.task_names[t] for t in np.flatnonzero(zeros < k)]
    if not short:
        return True
    log.warning(
        "TIES: the sample put every threshold at 0 but %s %s fewer zeros than trimming needs; computing "
        "exact thresholds and merging again",
        ", ".join(short),
        "has" if len(short) == 1 else "have",
    )
    saved["thresholds"] = list(exact(run, density))
    return False


def from_parent(run, density: float) -> dict[int, float]:
    """Task index -> the parent run's global threshold for the same (base, task content, density):
    a threshold depends on the base, the task and the density alone."""
    if run.parent is None or run.digests is None:
        return {}
    m = run.parent
    thresholds = (m.get("ties") or {}).get("thresholds") or []
    if not thresholds or m["method"].get("scope") != "global" or m["method"].get("density") != density:
        return {}
    old = run.parent_digests
    cache = {(old.base, d): thr for (_, d), thr in zip(old.tasks, thresholds)}
    new = run.digests
    return {i: cache[(new.base, d)] for i, (_, d) in enumerate(new.tasks) if (new.base, d) in cache}


def with_cache(run, cache: dict[int, float], density: float) -> tuple[float, ...]:
    """Cached thresholds as they are, the passes over the other tasks only."""
    missing = [i for i in range(len(run.task_names)) if i not in cache]
    fresh = dict(zip(missing, exact(run.task_subset(missing), density))) if missing else {}
    return tuple(cache[i] if i in cache else fresh[i] for i in range(len(run.task_names)))


def prepare(run, density: float, scope: str, guess_zeros: bool) -> None:
    """Before the map: the thresholds every shard trims with (global scope), journaled."""
    run.globals.setdefault("majority", 1)
    if scope != "global":
        return
    saved = run.saved
    if not saved.get("thresholds"):
        cache = from_parent(run, density)
        run.reused["thresholds_of"] = [run.task_names[i] for i in sorted(cache)]
        run.reused["thresholds_computed_for"] = [n for i, n in enumerate(run.task_names) if i not in cache]
        saved |= {"thresholds": list(with_cache(run, cache, density))} if cache else first(run, density, guess_zeros)
        run.save()
    run.globals["thresholds"] = tuple(saved["thresholds"])
    run.globals["count_zeros"] = "zeros_to_check" in saved
