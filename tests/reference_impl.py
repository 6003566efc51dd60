"""Single-process, flattened reference implementation of the merge-method spec (docs/methods.md).

Ground truth for the tests of the distributed implementation: favour obviousness over speed.
Everything is computed on whole flattened model vectors in float32, in sorted-name order.
"""

from __future__ import annotations

import numpy as np
import torch

StateDict = dict[str, torch.Tensor]


def ordered_sum(rows) -> torch.Tensor:
    """Sum over tasks strictly in order t = 1..T. torch's dim-0 sum reorders additions
    depending on tensor width, so "the" sum needs a fixed order to be reproducible
    across shard and chunk sizes; this is the order mergeflow defines."""
    rows = list(rows)
    acc = rows[0].clone()
    for r in rows[1:]:
        acc = acc + r
    return acc


def float_names(sd: StateDict) -> list[str]:
    return sorted(n for n, t in sd.items() if t.is_floating_point())


def task_vectors(base: StateDict, tasks: list[StateDict]) -> list[StateDict]:
    names = float_names(base)
    return [{n: t[n].float() - base[n].float() for n in names} for t in tasks]


def flatten(sd: StateDict, names: list[str]) -> torch.Tensor:
    return torch.cat([sd[n].float().reshape(-1) for n in sorted(names)])


def unflatten(vec: torch.Tensor, like: StateDict, names: list[str]) -> StateDict:
    out, offset = {}, 0
    for n in sorted(names):
        numel = like[n].numel()
        out[n] = vec[offset : offset + numel].reshape(like[n].shape)
        offset += numel
    assert offset == vec.numel(), "vector length does not match the named tensors"
    return out


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    # Exactly the TIES reference code: k-th smallest |tau| with k = P - int(P * density), keep >= it
    # (so int(P*density)+1 entries survive when there are no ties).
    p = tau.numel()
    k = p - int(p * density)
    if k == 0:  # density 1.0: kthvalue(0) is undefined, keep everything
        return tau.clone()
    thr = torch.kthvalue(tau.abs(), k).values
    return torch.where(tau.abs() >= thr, tau, torch.zeros_like(tau))


def ties_merge(
    taus: list[torch.Tensor],
    density: float = 0.2,
    scope: str = "global",
    merge: str = "mean",
    sizes: list[int] | None = None,
) -> torch.Tensor:
    if scope == "global":
        trimmed = [_trim(t, density) for t in taus]
    elif scope == "tensor":
        assert sizes is not None and sum(sizes) == taus[0].numel()
        trimmed = [torch.cat([_trim(seg, density) for seg in t.split(list(sizes))]) for t in taus]
    else:
        raise ValueError(f"unknown scope {scope!r}")
    stacked = torch.stack(trimmed)  # (T, P)

    sign = torch.sign(ordered_sum(stacked))
    # Majority sign is taken over the whole vector even in tensor scope (reference code).
    sign[sign == 0] = torch.sign(sign.sum())

    keep = (torch.sign(stacked) == sign) & (stacked != 0)
    selected = torch.where(keep, stacked, torch.zeros_like(stacked))
    total = ordered_sum(selected)
    if merge == "sum":
        return total
    if merge == "mean":
        return total / keep.sum(0).float().clamp(min=1)
    raise ValueError(f"unknown merge {merge!r}")


def tall_masks(taus: list[torch.Tensor], tau_mtl: torch.Tensor, lambdas: list[float]) -> list[torch.Tensor]:
    assert len(taus) == len(lambdas)
    return [tau.float().abs() > lam * (tau_mtl.float() - tau.float()).abs() for tau, lam in zip(taus, lambdas)]


def consensus(masks: list[torch.Tensor], tau_mtl: torch.Tensor, k: int) -> torch.Tensor:
    count = torch.stack([m.long() for m in masks]).sum(0)
    return torch.where(count >= k, tau_mtl, torch.zeros_like(tau_mtl))


def packbits(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.detach().cpu().numpy().astype(bool))  # MSB first, zero-padded


def unpackbits(packed: np.ndarray, count: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed, count=count).astype(bool))


def merged_state_dict(base: StateDict, delta_vec: torch.Tensor, names: list[str], alpha: float) -> StateDict:
    delta = unflatten(delta_vec, base, names)
    out = {n: t.clone() for n, t in base.items()}
    for n in delta:
        # Multiply first, then add, in float32: the order the other implementation must match bit for bit.
        out[n] = (base[n].float() + (alpha * delta[n])).to(base[n].dtype)
    return out


def rebuild(base: StateDict, tau_mtl_vec: torch.Tensor, mask_vec: torch.Tensor, names: list[str]) -> StateDict:
    masked = torch.where(mask_vec, tau_mtl_vec, torch.zeros_like(tau_mtl_vec))
    delta = unflatten(masked, base, names)
    out = {n: t.clone() for n, t in base.items()}
    for n in delta:
        out[n] = (base[n].float() + delta[n]).to(base[n].dtype)
    return out


def merge(
    base: StateDict,
    tasks: list[StateDict],
    method: str,
    *,
    alpha: float,
    density: float = 0.2,
    scope: str = "global",
    merge: str | None = None,
    lambdas: float | list[float] | dict[int, float] | None = None,
    base_merge: str = "task_arithmetic",
    k: int = 2,
) -> dict:
    names = float_names(base)
    taus = [flatten(tv, names) for tv in task_vectors(base, tasks)]
    sizes = [base[n].numel() for n in names]

    if method == "task_arithmetic":
        return {"model": merged_state_dict(base, ordered_sum(taus), names, alpha)}
    if method == "ties":
        tau = ties_merge(taus, density, scope, merge or "mean", sizes)
        return {"model": merged_state_dict(base, tau, names, alpha)}
    if method not in ("tall_masks", "consensus"):
        raise ValueError(f"unknown method {method!r}")

    if base_merge == "task_arithmetic":
        tau_mtl = ordered_sum(taus)
    elif base_merge == "ties":
        tau_mtl = ties_merge(taus, density, scope, "sum", sizes)
    else:
        raise ValueError(f"unknown base_merge {base_merge!r}")
    if lambdas is None:
        raise ValueError("the reference has no validation loop: lambdas must be given")
    if isinstance(lambdas, (int, float)):
        lambdas = [float(lambdas)] * len(taus)
    elif isinstance(lambdas, dict):  # per-task map, keyed by task index
        lambdas = [lambdas[t] for t in range(len(taus))]
    masks = tall_masks(taus, tau_mtl, list(lambdas))
    merged = tau_mtl if method == "tall_masks" else consensus(masks, tau_mtl, k)
    return {"model": merged_state_dict(base, merged, names, alpha), "tau_mtl": tau_mtl, "masks": masks}
