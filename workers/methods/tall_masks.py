"""TALL masks (Wang et al. 2024, eq. 3): per task, keep the weights of tau_MTL where
the task's own vector dominates what the other tasks contribute."""

import torch

from mergeflow.workers.methods.registry import ChunkGlobals, MethodOutput, MethodParams, merge_method, running_sum
from mergeflow.workers.methods.ties import ties_vector


def multitask_vector(taus: torch.Tensor, params: MethodParams, g: ChunkGlobals) -> tuple[torch.Tensor, int, int]:
    """tau_MTL: the unscaled Task Arithmetic sum, or TIES with sum merge."""
    if params.base_merge == "ties":
        return ties_vector(taus, g, params.ties_merge)
    return running_sum(taus), 0, 0


def task_masks(taus: torch.Tensor, tau_mtl: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """|tau_t| > lambda_t * |tau_MTL - tau_t| per task row.

    Strict '>' as in the reference code; the paper's '>=' differs only where both sides are 0.
    Row by row into reused buffers (same float32 operations as the broadcast formula)."""
    masks = torch.empty(taus.shape, dtype=torch.bool, device=taus.device)
    other = torch.empty_like(tau_mtl)
    mag = torch.empty_like(tau_mtl)
    for t in range(taus.shape[0]):
        torch.sub(tau_mtl, taus[t], out=other).abs_().mul_(lambdas[t])
        torch.gt(torch.abs(taus[t], out=mag), other, out=masks[t])
    return masks


def mask_counts(masks: torch.Tensor) -> torch.Tensor:
    """How many task masks keep each weight: masks.sum(dim=0), added row by row in a small
    integer type (torch reduces bool tensors over their first dimension slowly)."""
    count = masks[0].to(torch.int16)
    for t in range(1, masks.shape[0]):
        count += masks[t]
    return count


def lambdas_on(params: MethodParams, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(params.lambdas, dtype=torch.float32, device=like.device)


@merge_method("tall_masks", compresses=True)
def tall_masks(taus, params: MethodParams, g: ChunkGlobals) -> MethodOutput:
    """TALL masks: tau_MTL plus one mask per task; model/ holds theta_0 + alpha * tau_MTL."""
    tau_mtl, sign_sum, ambiguous = multitask_vector(taus, params, g)
    masks = task_masks(taus, tau_mtl, lambdas_on(params, taus))
    return MethodOutput(delta=tau_mtl, tau_mtl=tau_mtl, masks=masks, sign_sum=sign_sum, ambiguous=ambiguous)
