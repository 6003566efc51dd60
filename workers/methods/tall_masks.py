"""TALL masks (Wang et al. 2024, eq. 3): per task, keep the weights of tau_MTL where
the task's own vector dominates what the other tasks contribute."""

import torch

from workers.methods.registry import ChunkGlobals, MethodOutput, MethodParams, merge_method, running_sum
from workers.methods.ties import ties_vector


def multitask_vector(taus: torch.Tensor, params: MethodParams, g: ChunkGlobals) -> tuple[torch.Tensor, int, int]:
    """tau_MTL: the unscaled Task Arithmetic sum, or TIES with sum merge."""
    if params.base_merge == "ties":
        return ties_vector(taus, g, params.ties_merge)
    return running_sum(taus), 0, 0


def task_masks(taus: torch.Tensor, tau_mtl: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    # Strict '>' as in the reference code; the paper's '>=' differs only where both sides are 0.
    return taus.abs() > lambdas[:, None] * (tau_mtl[None, :] - taus).abs()


def lambdas_on(params: MethodParams, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(params.lambdas, dtype=torch.float32, device=like.device)


@merge_method("tall_masks", compresses=True)
def tall_masks(taus, params: MethodParams, g: ChunkGlobals) -> MethodOutput:
    """TALL masks: tau_MTL plus one mask per task; model/ holds theta_0 + alpha * tau_MTL."""
    tau_mtl, sign_sum, ambiguous = multitask_vector(taus, params, g)
    masks = task_masks(taus, tau_mtl, lambdas_on(params, taus))
    return MethodOutput(delta=tau_mtl, tau_mtl=tau_mtl, masks=masks, sign_sum=sign_sum, ambiguous=ambiguous)
