"""Isotropic merging (Marczak et al., ICML 2025, arXiv 2502.04959; official code
danielm1405/iso-merging @ d34010af, src/utils/iso.py).

Per 2-D tensor (the rule of _svd.py) of shape m x n, r = min(m, n), in float64:

Iso-C (`iso_c`): Delta_TA = sum_t tau_t = U diag(s) V^T; delta = mean(s) * U V^T, the mean over all r
singular values (zeros included), the isotropic spectrum.

Iso-CTS (`iso_cts`), f = common_space_fraction:
    k = int(r * f); ts = round((r - k) / T) * T; k = r - ts; s = ts / T   (Python round: half to even)
    common: the top-k triplets of SVD(Delta_TA);
    task t: the top-s triplets of SVD(tau_t - U_c U_c^T tau_t) (the common space projected out on the left);
    stack the T task blocks and the common block (r triplets), delta = mean(sigma) * polar(U) polar(V)^T.
    T = 1 or f = 1 is Iso-C.

Every other float tensor: the mean of the task vectors. model = theta_0 + alpha * delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mergeflow.workers.methods._svd import (
    DEFAULT_EXCLUDE,
    EXCLUDE_DOC,
    SvdMethod,
    check_pattern,
    cutoff,
    kept,
    polar,
    task_sum64,
    thin_svd,
)
from mergeflow.workers.methods.base import check_scale
from mergeflow.workers.methods.registry import register

ALPHA_DOC = (
    "model = base + alpha * delta, the mean tensors included (official code: swept over 0.1..3.0 on "
    "validation with early stopping); auto: chosen on validation data"
)


def iso_c(taus: torch.Tensor) -> torch.Tensor:
    """Iso-C of one 2-D tensor from its task vectors (T, m, n): float64 delta (m, n)."""
    m, n = taus.shape[1:]
    u, s, vh = thin_svd(task_sum64(taus))
    q = kept(s, cutoff(m, n, s[0]))
    return s.mean() * (u[:, :q] @ vh[:q])


def cts_split(r: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common size k, task-specific size s per task) as the official code computes them, with
    k + T * s = r. Where its rounding would ask for more task-specific directions than r (only for
    small fractions: r = 6, T = 4, f = 0 gives ts = 8), one task-specific direction per task less."""
    common = int(r * fraction)
    ts = round((r - common) / tasks) * tasks
    if ts > r:
        ts -= tasks
    return r - ts, ts // tasks


def iso_cts(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """Iso-CTS of one 2-D tensor from its task vectors (T, m, n): float64 delta (m, n)."""
    t, m, n = taus.shape
    k, per = cts_split(min(m, n), t, fraction)
    u, s, vh = thin_svd(task_sum64(taus))
    uc, sc, vhc = u[:, :k], s[:k], vh[:k]
    blocks = []
    if per:
        for row in taus:
            tau = row.double()
            uts, sts, vhts = thin_svd(tau - uc @ (uc.T @ tau))
            blocks.append((uts[:, :per].clone(), sts[:per].clone(), vhts[:per].clone()))
            del tau, uts, sts, vhts
    blocks.append((uc, sc, vhc))  # the official order: task blocks, then the common space
    sigma = torch.cat([b[1] for b in blocks])
    if not sigma.numel() or float(sigma.max()) == 0.0:
        return torch.zeros((m, n), dtype=torch.float64, device=taus.device)
    thr = cutoff(m, n, sigma.max())
    keep = [kept(b[1], thr) for b in blocks]
    uu = torch.cat([b[0][:, :q] for b, q in zip(blocks, keep)], dim=1)
    vv = torch.cat([b[2][:q] for b, q in zip(blocks, keep)], dim=0)
    return sigma.mean() * (polar(uu) @ polar(vv))


@dataclass(frozen=True)
class IsoCParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = field(default=1.0, metadata={"doc": ALPHA_DOC})
    svd_exclude: str = field(default=DEFAULT_EXCLUDE, metadata={"doc": EXCLUDE_DOC})

    def __post_init__(self):
        check_scale("alpha", self.alpha)
        check_pattern("svd_exclude", self.svd_exclude)


@dataclass(frozen=True)
class IsoCtsParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = field(default=1.0, metadata={"doc": ALPHA_DOC})
    common_space_fraction: float = field(
        default=0.8,
        metadata={"doc": "share of the r = min(m, n) directions taken from the common space (the official 0.8)"},
    )
    svd_exclude: str = field(default=DEFAULT_EXCLUDE, metadata={"doc": EXCLUDE_DOC})

    def __post_init__(self):
        check_scale("alpha", self.alpha)
        if not 0.0 <= self.common_space_fraction <= 1.0:
            raise ValueError(f"common_space_fraction: must be in [0, 1], got {self.common_space_fraction}")
        check_pattern("svd_exclude", self.svd_exclude)


@register
class IsoC(SvdMethod):
    name = "iso_c"
    summary = "Iso-C: the Task Arithmetic sum with a flat (isotropic) spectrum per 2-D tensor (Marczak et al. 2025)"
    Params = IsoCParams

    def svd_delta(self, taus, params, ctx):
        return iso_c(taus).to(torch.float32), {}


@register
class IsoCts(SvdMethod):
    name = "iso_cts"
    summary = "Iso-CTS: Iso-C over the common subspace plus each task's own directions (Marczak et al. 2025)"
    Params = IsoCtsParams

    def svd_delta(self, taus, params, ctx):
        return iso_cts(taus, params.common_space_fraction).to(torch.float32), {}
