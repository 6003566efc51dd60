"""DARE (Yu et al. 2024, "Language Models are Super Mario", arXiv 2311.03099): drop each entry of
each task vector with probability 1 - density and rescale the survivors, then merge.

- `dare_linear`: model = theta_0 + alpha * sum_t dare(tau_t) (DARE over Task Arithmetic).
- `dare_ties`: DARE, optionally the TIES magnitude trim of the DARE'd vectors (`trim_density`, per
  tensor), then mergekit's sign consensus and disjoint merge (workers/methods/_sparsify.py).

dare(tau_t)_i = tau_t,i * m_t,i * s_t with m_t,i = [u_t(i) < density], u the counter-based uniform
of _sparsify.py keyed by (seed, t, tensor, i), and s_t = 1 / density (`rescale: inverse`, the
paper and MergeLM), ||tau_t||_1 / ||m_t * tau_t||_1 over the tensor (`l1`, current mergekit; 1 when
either norm is below 1e-7) or 1 (`none`, the paper's DropOnly).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from mergeflow.workers import kth_value
from mergeflow.workers.methods import _sparsify as sp
from mergeflow.workers.methods.base import Method, MethodOutput, check_fraction, check_scale
from mergeflow.workers.methods.registry import register
from mergeflow.workers.methods.ties.vectors import trim


@dataclass(frozen=True)
class DareLinearParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = field(
        default=0.3,
        metadata={
            "doc": "model = base + alpha * sum of the DARE'd task vectors; auto: chosen on validation data "
            "(mergekit's weights 1, lambda 1 is alpha 1.0)"
        },
    )
    density: float = field(
        default=0.9,
        metadata={
            "doc": "keep probability of each entry, in (0, 1]; drop rate p = 1 - density (MergeLM's "
            "weight_mask_rate default 0.1)"
        },
    )
    rescale: Literal["inverse", "l1", "none"] = field(
        default="inverse",
        metadata={
            "doc": "survivors times 1/density (the paper), l1: per tensor and task ||tau||_1 / ||kept||_1 "
            "(current mergekit), none: DropOnly"
        },
    )
    seed: int = field(
        default=0,
        metadata={"doc": "the drop masks' seed: masks depend only on (seed, task index, tensor, element)"},
    )

    def __post_init__(self):
        check_scale("alpha", self.alpha)
        check_fraction("density", self.density)
        sp.check_seed(self.seed)


@dataclass(frozen=True)
class DareTiesParams(DareLinearParams):
    alpha: float | Literal["auto"] | None = field(
        default=None,
        metadata={"doc": "model = base + alpha * merged vector; default 0.3 with merge sum, 1.0 with mean"},
    )
    merge: Literal["sum", "mean"] = field(
        default="sum",
        metadata={"doc": "disjoint merge of the entries agreeing with the elected sign (mergekit: sum)"},
    )
    trim_density: float | None = field(
        default=None,
        metadata={
            "doc": "TIES magnitude trim after DARE, per tensor: keep this share of each DARE'd task vector "
            "(MergeLM applies it, 0.2; mergekit does not: off)"
        },
    )

    def __post_init__(self):
        sp.default_alpha(self, mean=1.0, total=0.3)
        super().__post_init__()
        if self.trim_density is not None:
            check_fraction("trim_density", self.trim_density)


def dare_rows(taus: torch.Tensor, params, ctx, lo: int, scales=None) -> torch.Tensor:
    """(T, n) float32: dare(tau_t) over elements [lo, lo + n) of tensor ctx.tensor."""
    t, n = taus.shape
    out = torch.empty_like(taus)
    if params.density >= 1.0:  # nothing dropped; inverse and l1 rescale by exactly 1
        return out.copy_(taus)
    for i in range(t):
        keep = sp.bernoulli_keep(sp.stream_key(params.seed, i, ctx.tensor), lo, n, params.density, taus.device)
        if params.rescale == "inverse":
            scale = float(np.float32(1.0 / params.density))
        elif params.rescale == "l1":
            scale = scales[i]
        else:
            scale = 1.0
        torch.mul(taus[i], scale, out=out[i]).masked_fill_(keep.logical_not_(), 0.0)
    return out


def l1_scales(access, params, ctx) -> tuple[float, ...]:
    """Per task ||tau_t||_1 / ||m_t * tau_t||_1 over the tensor, exact (see _sparsify.l1_buckets)."""
    plain = DareLinearParams(density=params.density, rescale="none", seed=params.seed)
    blocks = ((lo, taus) for lo, _, _, taus in access.chunks())
    return sp.l1_scales(blocks, lambda taus, lo: dare_rows(taus, plain, ctx, lo), len(ctx.task_names), access.device)


def trim_thresholds(access, params, ctx, scales) -> torch.Tensor:
    """Per task the k-th smallest |dare(tau_t)| over the tensor, k = P - int(P * trim_density) (as
    TIES, workers/kth_value.py), with the same masks as the merge."""
    numel, t = access.job.numel, len(ctx.task_names)
    sample = kth_value.Sample.empty(t)
    for lo, _, _, taus in access.chunks(kth_value.sample_ranges(numel, zlib.crc32(ctx.tensor.encode()))):
        sample.add(dare_rows(taus, params, ctx, lo, scales))

    def run_pass(plan, _):
        counts = kth_value.new_counts(plan, access.device)
        for lo, _, _, taus in access.chunks():
            kth_value.add_counts(counts, dare_rows(taus, params, ctx, lo, scales), plan)
        return [c.cpu().numpy() for c in counts]

    k = np.full(t, kth_value.kth_rank(numel, params.trim_density), dtype=np.int64)
    return torch.from_numpy(kth_value.select(run_pass, sample, numel, k))


class _Dare(Method):
    consensus = False

    def prepare_tensor(self, access, params, ctx):
        extra = {}
        if params.rescale == "l1" and params.density < 1.0:
            extra["dare_scales"] = l1_scales(access, params, ctx)
        if getattr(params, "trim_density", None) is not None:
            extra["dare_thresholds"] = trim_thresholds(access, params, ctx, extra.get("dare_scales"))
        return extra

    def kernel(self, taus, params, ctx) -> MethodOutput:
        rows = dare_rows(taus, params, ctx, ctx.offset, ctx.globals.get("dare_scales"))
        if "dare_thresholds" in ctx.globals:
            rows = trim(rows, ctx.globals["dare_thresholds"])
        return MethodOutput(delta=sp.merge_rows(rows, self.consensus, getattr(params, "merge", "sum")))

    def manifest(self, run, results) -> dict:
        return sp.rng_manifest(run.params)

    def describe(self, manifest) -> list[str]:
        return sp.rng_describe(manifest)


@register
class DareLinear(_Dare):
    name = "dare_linear"
    summary = "DARE: drop entries at random (keep density), rescale by 1/density, sum (Yu et al. 2024)"
    Params = DareLinearParams


@register
class DareTies(_Dare):
    name = "dare_ties"
    summary = "DARE, then sign consensus and disjoint merge (mergekit dare_ties; optional TIES trim)"
    Params = DareTiesParams
    consensus = True
