"""Model Breadcrumbs (Davari & Belilovsky 2024, arXiv 2312.06795): per task, drop the largest
entries (outliers, share `gamma`) and the small ones, keep the `density` share just below, then merge.

- `breadcrumbs`: model = theta_0 + alpha * sum_t mask_t(tau_t) (the official code).
- `breadcrumbs_ties`: mergekit's variant, the masked vectors merged by sign consensus.

Ranks are by decreasing |tau_t|, ties by index (the lower index ranks higher); rank r (0-based) is
kept when n_rm <= r < n_rm + n_keep:
- `scope: row` (official `TaskVectorMiddleKeep`, default): per slice along the last dimension of
  c entries (a 1-D tensor is one row), n_rm = int(c * gamma), n_keep = int(c * density);
- `scope: tensor` (mergekit `magnitude_outliers`): over the flattened tensor of N entries,
  n_keep = int(N * density), n_rm = min(int(N * gamma), N - n_keep) (mergekit lowers the removal
  to keep the target). Unlike mergekit, n_rm = 0 removes nothing: mergekit's slice `[n_bot:-0]` is
  empty and zeroes the whole tensor (any tensor under 1/gamma entries).
A 0-D tensor is kept as it is (official code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mergeflow.workers.methods import _sparsify as sp
from mergeflow.workers.methods.base import Method, MethodOutput, check_fraction, check_scale
from mergeflow.workers.methods.registry import register


@dataclass(frozen=True)
class BreadcrumbsParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = field(
        default=0.2,
        metadata={"doc": "model = base + alpha * merged vector (the official search's start point); auto: chosen"},
    )
    density: float = field(
        default=0.15,
        metadata={"doc": "share of each row (or tensor) kept, below the removed top, in (0, 1] (official beta)"},
    )
    gamma: float = field(
        default=0.006,
        metadata={
            "doc": "share of the largest |entries| removed first, in [0, 1) (official start point; mergekit 0.01)"
        },
    )
    scope: Literal["row", "tensor"] = field(
        default="row",
        metadata={
            "doc": "ranks per slice along the last dimension (official code) or over the whole tensor (mergekit)"
        },
    )

    def __post_init__(self):
        check_scale("alpha", self.alpha)
        check_fraction("density", self.density)
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma: must be in [0, 1), got {self.gamma}")


@dataclass(frozen=True)
class BreadcrumbsTiesParams(BreadcrumbsParams):
    alpha: float | Literal["auto"] | None = field(
        default=None,
        metadata={"doc": "model = base + alpha * merged vector; default 0.2 with merge sum, 1.0 with mean"},
    )
    merge: Literal["sum", "mean"] = field(
        default="sum",
        metadata={"doc": "disjoint merge of the entries agreeing with the elected sign (mergekit: sum)"},
    )

    def __post_init__(self):
        sp.default_alpha(self, mean=1.0, total=0.2)
        super().__post_init__()


def kept_ranks(width: int, params) -> tuple[int, int]:
    """(n_rm, n_keep) for one ranked slice of `width` entries."""
    if params.scope == "row":
        return int(width * params.gamma), int(width * params.density)
    keep = int(width * params.density)
    return min(int(width * params.gamma), width - keep), keep


def breadcrumbs_rows(taus: torch.Tensor, width: int, params) -> torch.Tensor:
    """(T, n) float32: each task's row block (n = rows * width) with only the kept ranks. One task at
    a time, so the ranking's scratch is paid once, not T times; a single row (scope tensor, whole
    tensors of up to 10^8 entries) by two selections instead of a sort."""
    t, n = taus.shape
    n_rm, n_keep = kept_ranks(width, params)
    out = torch.empty_like(taus)
    if width == n:  # one row, the whole tensor (scope tensor): select, do not sort
        for i in range(t):
            out[i] = torch.where(sp.rank_window(taus[i].abs(), n_rm, n_rm + n_keep), taus[i], 0.0)
        return out
    for i in range(t):
        blocks = taus[i].reshape(n // width, width)
        ranks = sp.descending_ranks(blocks.abs())
        keep = (ranks >= n_rm) & (ranks < n_rm + n_keep)
        out[i] = torch.where(keep, blocks, 0.0).reshape(n)
    return out


class _Breadcrumbs(Method):
    whole_tensors = True
    consensus = False

    def tensor_kernel(self, access, params, ctx):
        merge = getattr(params, "merge", "sum")
        if len(access.job.shape) == 0:  # kept as it is
            for lo, hi, base, taus in access.chunks():
                yield lo, hi, base, taus, MethodOutput(delta=sp.merge_rows(taus, self.consensus, merge))
            return
        if params.scope == "tensor":
            if access.job.numel:
                base, taus = sp.whole_flat(access)
                rows = breadcrumbs_rows(taus, taus.shape[1], params)
                yield 0, taus.shape[1], base, taus, MethodOutput(delta=sp.merge_rows(rows, self.consensus, merge))
            return
        width = sp.row_width(access.job.shape)
        for lo, hi, base, taus in sp.row_blocks(access):
            rows = breadcrumbs_rows(taus, width, params)
            yield lo, hi, base, taus, MethodOutput(delta=sp.merge_rows(rows, self.consensus, merge))

    def memory(self, run) -> int | None:
        """scope tensor holds its largest tensor whole: base, T task vectors, T masked ones and the
        delta in float32, plus one task's selection scratch (|tau|, kthvalue's copy, masks, an int64
        cumsum of the ties), counted as 32 bytes a weight."""
        if run.params.scope != "tensor":
            return None
        t = len(run.task_names)
        return sp.largest_tensor(run) * (4 * (2 * t + 2) + 32) + 256 * 2**20


@register
class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"
    summary = "Model Breadcrumbs: drop each row's top gamma and keep the next density by magnitude, sum"
    Params = BreadcrumbsParams


@register
class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    summary = "Model Breadcrumbs masks, then sign consensus and disjoint merge (mergekit breadcrumbs_ties)"
    Params = BreadcrumbsTiesParams
    consensus = True
