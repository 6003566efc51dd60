"""Consensus merging (Wang et al. 2024, sec. 4): tau_MTL restricted to the weights that at least
k TALL masks keep. The bundle is TALL's, so each task also rebuilds from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mergeflow.workers.methods.registry import register
from mergeflow.workers.methods.tall_masks import TallMasks, TallMasksParams, mask_counts


@dataclass(frozen=True)
class ConsensusParams(TallMasksParams):
    k: int = field(default=2, metadata={"doc": "keep weights that at least k task masks keep"})

    def __post_init__(self):
        super().__post_init__()
        if self.k < 0:
            raise ValueError(f"k: must be >= 0, got {self.k}")


def consensus_vector(masks: torch.Tensor, tau_mtl: torch.Tensor, k: int) -> torch.Tensor:
    keep = mask_counts(masks) >= k
    # where(keep, tau_mtl, +0.0) by multiplying (faster on the CPU); + 0.0 turns -0.0 into +0.0
    return torch.mul(tau_mtl, keep).add_(0.0)


@register
class Consensus(TallMasks):
    name = "consensus"
    summary = "Consensus: tau_MTL restricted to weights kept by at least k task masks"
    Params = ConsensusParams

    def delta(self, tau_mtl, masks, params):
        return consensus_vector(masks, tau_mtl, params.k)
