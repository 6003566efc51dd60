"""DELLA (Deep et al. 2024, arXiv 2406.11617; MagPrune): per task and row, keep each entry with a
probability that grows with its magnitude rank, rescale the survivors, then merge.

- `della`: sign consensus and disjoint merge, mean by default (official code and mergekit `della`).
- `della_linear`: the plain sum (mergekit `della_linear`).

Per row of n entries (a slice along the last dimension; a 1-D tensor is one row, a 0-D tensor a
row of one): rank_i = 0..n-1 by increasing |tau_t,i| (ties by index: the lower index ranks
higher), r_i = rank_i / (n - 1) (1/2 when n = 1, where the official code divides 0 by 0),
p_i = (density - epsilon) + r_i * (2 epsilon) in float64, m_i = [u_t(i) < p_i] with u the
counter-based uniform of _sparsify.py keyed by (seed, t, tensor, flat index i). Survivors are
divided by p_i (`rescale: inverse`, official), multiplied by ||tau_t||_1 / ||m_t * tau_t||_1 over the
tensor (`l1`, current mergekit) or left (`none`). density 1 keeps tau_t as it is (both codes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mergeflow.workers.methods import _sparsify as sp
from mergeflow.workers.methods.base import Method, MethodOutput, check_fraction, check_scale
from mergeflow.workers.methods.registry import register


@dataclass(frozen=True)
class DellaLinearParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = field(
        default=0.3,
        metadata={"doc": "model = base + alpha * merged vector (mergekit's lambda, with weights 1); auto: chosen"},
    )
    density: float = field(
        default=0.7,
        metadata={"doc": "mean keep probability, in (0, 1]; 1 keeps everything (the official README: drop rate 0.3)"},
    )
    epsilon: float = field(
        default=0.15,
        metadata={
            "doc": "keep probabilities span density +- epsilon by magnitude rank; both ends must lie in (0, 1) "
            "(mergekit default; the official window_size is 2 epsilon)"
        },
    )
    rescale: Literal["inverse", "l1", "none"] = field(
        default="inverse",
        metadata={"doc": "survivors divided by their keep probability (official), l1: per tensor (mergekit), none"},
    )
    seed: int = field(
        default=0,
        metadata={"doc": "the drop masks' seed: masks depend only on (seed, task index, tensor, element)"},
    )

    def __post_init__(self):
        check_scale("alpha", self.alpha)
        check_fraction("density", self.density)
        if not self.epsilon >= 0.0:
            raise ValueError(f"epsilon: must be >= 0, got {self.epsilon}")
        if self.density < 1.0 and not (self.density - self.epsilon > 0.0 and self.density + self.epsilon < 1.0):
            raise ValueError(
                f"epsilon: density - epsilon and density + epsilon must lie in (0, 1), "
                f"got density {self.density}, epsilon {self.epsilon}"
            )
        sp.check_seed(self.seed)


@dataclass(frozen=True)
class DellaParams(DellaLinearParams):
    alpha: float | Literal["auto"] | None = field(
        default=None,
        metadata={"doc": "model = base + alpha * merged vector; default 1.0 with merge mean, 0.3 with sum"},
    )
    merge: Literal["mean", "sum"] = field(
        default="mean",
        metadata={"doc": "disjoint merge of the entries agreeing with the elected sign (official and mergekit: mean)"},
    )

    def __post_init__(self):
        sp.default_alpha(self, mean=1.0, total=0.3)
        super().__post_init__()


def keep_probabilities(block: torch.Tensor, width: int, params) -> torch.Tensor:
    """(R, width) float64 keep probabilities of a block of rows (R, width)."""
    ranks = sp.descending_ranks(block.abs())
    if width == 1:
        rel = torch.full(block.shape, 0.5, dtype=torch.float64, device=block.device)
    else:
        rel = (width - 1 - ranks).to(torch.float64).div_(width - 1)
    return rel.mul_(2.0 * params.epsilon).add_(params.density - params.epsilon)


def della_rows(taus: torch.Tensor, width: int, params, ctx, lo: int, scales=None, rescale=None) -> torch.Tensor:
    """(T, n) float32: MagPrune of each task's block of whole rows at elements [lo, lo + n)."""
    t, n = taus.shape
    rescale = rescale or params.rescale
    out = torch.empty_like(taus)
    if params.density >= 1.0:
        return out.copy_(taus)
    for i in range(t):
        p = keep_probabilities(taus[i].reshape(-1, width), width, params).reshape(-1)
        keep = sp.uniform(sp.stream_key(params.seed, i, ctx.tensor), lo, n, taus.device) < p
        if rescale == "inverse":
            kept = taus[i].to(torch.float64).div_(p).to(torch.float32)
        elif rescale == "l1":
            kept = taus[i] * scales[i]
        else:
            kept = taus[i].clone()
        out[i] = kept.masked_fill_(keep.logical_not_(), 0.0)
    return out


class _Della(Method):
    whole_tensors = True
    consensus = False

    def prepare_tensor(self, access, params, ctx):
        if params.rescale != "l1" or params.density >= 1.0 or access.job.numel == 0:
            return None
        width = sp.row_width(access.job.shape)
        blocks = ((lo, taus) for lo, _, _, taus in sp.row_blocks(access))
        masked = lambda taus, lo: della_rows(taus, width, params, ctx, lo, rescale="none")  # noqa: E731
        return {"della_scales": sp.l1_scales(blocks, masked, len(ctx.task_names), access.device)}

    def tensor_kernel(self, access, params, ctx):
        merge = getattr(params, "merge", "sum")
        width = sp.row_width(access.job.shape)
        for lo, hi, base, taus in sp.row_blocks(access):
            rows = della_rows(taus, width, params, ctx, lo, ctx.globals.get("della_scales"))
            yield lo, hi, base, taus, MethodOutput(delta=sp.merge_rows(rows, self.consensus, merge))

    def manifest(self, run, results) -> dict:
        return sp.rng_manifest(run.params)

    def describe(self, manifest) -> list[str]:
        return sp.rng_describe(manifest)


@register
class DellaLinear(_Della):
    name = "della_linear"
    summary = "DELLA: keep entries with probability rising with magnitude rank per row, rescale, sum"
    Params = DellaLinearParams


@register
class Della(_Della):
    name = "della"
    summary = "DELLA (MagPrune): rank-based keep probabilities per row, rescale by 1/p, sign consensus, mean"
    Params = DellaParams
    consensus = True
