"""A throwaway merge method, defined outside mergeflow in one file: the mean of the task vectors
times `gain`. What a user's own method looks like (tests/test_plugins.py runs it end to end)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

import mergeflow


@dataclass(frozen=True)
class ScaledMeanParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = 1.0
    gain: float = field(default=0.5, metadata={"doc": "the mean of the task vectors is multiplied by this"})

    def __post_init__(self):
        if not self.gain > 0:
            raise ValueError(f"gain: must be > 0, got {self.gain}")


@mergeflow.register_method
class ScaledMean(mergeflow.Method):
    name = "scaled_mean"
    summary = "gain x the mean of the task vectors (a test plugin)"
    Params = ScaledMeanParams

    def kernel(self, taus: torch.Tensor, params, ctx) -> mergeflow.MethodOutput:
        return mergeflow.MethodOutput(delta=taus.mean(dim=0) * params.gain)
