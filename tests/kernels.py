"""A method's chunk kernel called directly, with the context merge_shard gives it: for the tests of
the formulas (reference cases, bit-for-bit equality with whole-tensor formulas)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeflow.workers.bits import unpack
from mergeflow.workers.methods import ChunkContext, get_method


@dataclass
class Out:
    delta: torch.Tensor
    tau_mtl: torch.Tensor | None  # a bundle's tau_MTL (as stored: float32 here)
    masks: torch.Tensor | None  # (T, n) bool, unpacked from the bundle's mask bytes
    sign_sum: int
    ambiguous: int


def kernel(
    name: str,
    taus: torch.Tensor,
    *,
    thresholds: torch.Tensor | None = None,
    majority: int = 1,
    lambdas: tuple[float, ...] | None = None,
    **params,
):
    """(params, Out) of method `name` on one chunk of task vectors, tasks named t0, t1, ..."""
    method = get_method(name)
    names = tuple(f"t{i}" for i in range(taus.shape[0]))
    if lambdas is not None:
        params["lambda_"] = dict(zip(names, lambdas))
    p = method.Params(**params)
    g = {"majority": majority}
    if thresholds is not None:
        g["tensor_thresholds"] = thresholds
    out = method.kernel(taus, p, ChunkContext("w", (taus.shape[1],), "F32", names, g))
    masks = None
    if f"mask/{names[0]}" in out.files:
        masks = torch.stack([unpack(out.files[f"mask/{n}"], taus.shape[1]) for n in names])
    return p, Out(out.delta, out.files.get("tau"), masks, out.sums.get("sign_sum", 0), out.sums.get("ambiguous", 0))
