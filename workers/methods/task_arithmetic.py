"""Task Arithmetic (Ilharco et al. 2023): the model is theta_0 + alpha * sum_t tau_t."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mergeflow.workers.methods.base import Method, MethodOutput, check_scale, running_sum
from mergeflow.workers.methods.registry import register


@dataclass(frozen=True)
class TaskArithmeticParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = field(
        default=0.3, metadata={"doc": "model = base + alpha * sum of task vectors; auto: chosen on validation data"}
    )

    def __post_init__(self):
        check_scale("alpha", self.alpha)


@register
class TaskArithmetic(Method):
    name = "task_arithmetic"
    summary = "Task Arithmetic: the sum of task vectors, scaled by alpha (Ilharco et al. 2023)"
    Params = TaskArithmeticParams
    running_sum = True  # a re-merge that appends tasks extends the parent's delta/ (workers/append.py)

    def kernel(self, taus, params, ctx) -> MethodOutput:
        return MethodOutput(delta=running_sum(taus))
