"""Which closed-form solution each parameter gets, decided by the statistics its feature pass
produced, and the whole LOT merge of in-memory state dicts (notebooks, the suite's report; the
batch merge streams the same solutions shard by shard: the LOT method's tensor kernel)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeflow.errors import CheckpointError
from mergeflow.workers.methods.lot import solve
from mergeflow.workers.methods.lot.features import ENERGY, GRAM, ROWS

RULES = ("linear", "norm_scale", "additive", "mean")


def rule_of(name: str, keys: set[str]) -> str:
    """The rule for parameter `name`, from the statistics keys of one task's feature pass."""
    if GRAM + name in keys:
        return "linear"
    if ENERGY + name in keys:
        return "norm_scale"
    if ROWS + name in keys:
        return "additive"
    return "mean"


def agreed_rule(name: str, task_names: Sequence[str], keys: Sequence[set[str]]) -> str:
    rules = [rule_of(name, k) for k in keys]
    for task, rule in zip(task_names, rules):
        if rule != rules[0]:
            raise CheckpointError(
                f"LOT statistics disagree on tensor {name!r}: task {task_names[0]!r} gives it the {rules[0]} rule, "
                f"task {task!r} the {rule} rule; every task's model must have the same layers (same method.model)"
            )
    return rules[0]


def merge_state_dicts(
    base: dict[str, torch.Tensor],
    finetuned: Sequence[dict[str, torch.Tensor]],
    stats: Sequence[dict[str, torch.Tensor]],
    alpha: float = 1.0,
) -> dict[str, torch.Tensor]:
    """theta_0 + alpha * Delta*, every floating-point tensor by its rule, in float32 (cast back to
    the base dtype); other tensors are copied from the base."""
    tasks = [str(i) for i in range(len(finetuned))]
    keys = [set(s) for s in stats]
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b.clone()
            continue
        taus = torch.stack([f[name].float() - b.float() for f in finetuned])
        rule = agreed_rule(name, tasks, keys)
        if rule == "linear":
            delta = solve.linear_delta(list(taus), [s[GRAM + name] for s in stats])
        elif rule == "norm_scale":
            delta = solve.norm_scale_delta(taus, torch.stack([s[ENERGY + name] for s in stats]))
        elif rule == "additive":
            delta = solve.additive_delta(taus, [float(s[ROWS + name]) for s in stats])
        else:
            delta = solve.mean_delta(taus)
        out[name] = (b.float() + alpha * delta.float()).to(b.dtype)
    return out
