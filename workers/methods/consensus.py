"""Consensus merging (Wang et al. 2024, sec. 4): drop weights fewer than k TALL masks keep."""

import torch

from mergeflow.workers.methods.registry import ChunkGlobals, MethodOutput, MethodParams, merge_method
from mergeflow.workers.methods.tall_masks import lambdas_on, mask_counts, multitask_vector, task_masks


def consensus_vector(masks: torch.Tensor, tau_mtl: torch.Tensor, k: int) -> torch.Tensor:
    keep = mask_counts(masks) >= k
    # where(keep, tau_mtl, +0.0) by multiplying (faster on the CPU); + 0.0 turns -0.0 into +0.0
    return torch.mul(tau_mtl, keep).add_(0.0)


@merge_method("consensus", compresses=True)
def consensus(taus, params: MethodParams, g: ChunkGlobals) -> MethodOutput:
    """Consensus: tau_MTL restricted to weights kept by at least k task masks."""
    tau_mtl, sign_sum, ambiguous = multitask_vector(taus, params, g)
    masks = task_masks(taus, tau_mtl, lambdas_on(params, taus))
    return MethodOutput(
        delta=consensus_vector(masks, tau_mtl, params.k),
        tau_mtl=tau_mtl,
        masks=masks,
        sign_sum=sign_sum,
        ambiguous=ambiguous,
    )
