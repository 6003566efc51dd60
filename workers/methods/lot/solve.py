"""LOT's closed-form solutions, one per kind of parameter (ALGORITHMS.md, "LOT merging").

Tensors in, tensors out; no files, no devices chosen here. Torch layout throughout: a linear
weight W is (out x in) and acts as y = x W^T, so the paper's T* = (sum X^T X)^+ (sum X^T X T_t)
reads Delta* = (sum_t Delta_t G_t) pinv(sum_t G_t) with G_t = X_t^T X_t.

Sums over tasks run in task order (t = 1..T), like every other method, so results do not depend
on how a tensor is split into row blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ordered_sum(items: Sequence[torch.Tensor]) -> torch.Tensor:
    acc = items[0].clone()
    for x in items[1:]:
        acc += x
    return acc


def gram_pinv(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """pinv(sum_t G_t) in float64, for the symmetric PSD sum of input Grams.

    The symmetric eigen-solver with numpy/torch's default cut-off (eps * size * largest
    eigenvalue) zeroes the null space, so directions no task's features span keep the base
    weight (Delta* = 0 there), and the rank-deficient reference case gives the minimum-norm answer."""
    total = ordered_sum([g.to(torch.float64) for g in grams])
    total = (total + total.T) / 2  # exact symmetry; float64 accumulation can leave 1-ulp asymmetry
    return torch.linalg.pinv(total, hermitian=True)


def linear_rows(deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], pinv: torch.Tensor) -> torch.Tensor:
    """Rows of Delta* for one linear weight: (sum_t Delta_t[rows] G_t) pinv, float64.

    A weight's output rows are independent least-squares problems sharing pinv, so callers
    stream over row blocks; `deltas[t]` is task t's (rows x in) block of its task vector."""
    acc = None
    for d, g in zip(deltas, grams):
        term = d.to(torch.float64) @ g.to(torch.float64)
        acc = term if acc is None else acc.add_(term)
    return acc @ pinv


def linear_delta(deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """Delta* for a whole linear weight (out x in)."""
    return linear_rows(deltas, grams, gram_pinv(grams))


def norm_scale_delta(deltas: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
    """Norm scale gamma: per channel, the energy-weighted mean sum_t E_t Delta_t / sum_t E_t
    (0 where no task's normalised input has energy). deltas, energies: (T, d)."""
    e = energies.to(torch.float64)
    num = ordered_sum(list(e * deltas.to(torch.float64)))
    den = ordered_sum(list(e))
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def additive_delta(deltas: torch.Tensor, rows: Sequence[float]) -> torch.Tensor:
    """Biases, norm shifts and other additive parameters: the row-weighted mean
    sum_t n_t Delta_t / sum_t n_t. deltas: (T, n)."""
    n = torch.tensor([float(r) for r in rows], dtype=torch.float64, device=deltas.device)
    if float(n.sum()) <= 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.float64, device=deltas.device)
    return ordered_sum(list(n[:, None] * deltas.to(torch.float64))) / n.sum()


def mean_delta(deltas: torch.Tensor) -> torch.Tensor:
    """Everything LOT has no features for (embeddings, convolutions): the mean task vector."""
    return ordered_sum(list(deltas.to(torch.float64))) / deltas.shape[0]


def feature_drift(weight: torch.Tensor, finetuned: Sequence[torch.Tensor], grams: Sequence[torch.Tensor]) -> float:
    """sum_t ||X_t (W - W_t)^T||_F^2 = sum_t tr((W - W_t) G_t (W - W_t)^T): the objective LOT minimises."""
    total = 0.0
    for w_t, g in zip(finetuned, grams):
        d = weight.to(torch.float64) - w_t.to(torch.float64)
        total += float(((d @ g.to(torch.float64)) * d).sum())
    return total
