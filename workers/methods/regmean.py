"""RegMean (Jin et al. 2023, arXiv 2212.09849): each linear weight merged by the closed form that
minimises sum_t ||X_t W - X_t W_t||^2 over the tasks' layer inputs X_t, with the Grams' off-diagonals
shrunk by `alpha`; every other tensor is the mean of the task vectors.

Per linear weight W (torch layout: out x in, y = x W^T), from LOT's feature statistics:
- G_t = (sum over task t's feature rows of x x^T) / rows_t: the mean Gram of the layer's input,
  from fine-tuned model t on task t's exemplars (LOT's feature stage, its cache and its re-merge reuse)
- G~_t = G_t with off-diagonal entries times alpha (FusionBench's reduce_non_diagonal_ratio)
- W* = [(sum_t G~_t)^-1 sum_t G~_t W_t^T]^T, i.e. Delta* = W* - W_0 = (sum_t tau_t G~_t)(sum_t G~_t)^-1,
  a float64 LU solve per weight applied to blocks of whole rows

RegMean merges whole weights; with task vectors that is theta_0 + 1.0 * Delta* (and mean(theta_0 + tau_t)
= theta_0 + mean tau_t), so the model scale `scale` defaults to 1.0: RegMean itself. (`alpha` is the
ratio's name in the issue and in FusionBench's configs, so the scale has its own name.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from mergeflow.errors import CheckpointError
from mergeflow.workers.methods.base import MethodOutput, check_scale
from mergeflow.workers.methods.lot import Lot, solve
from mergeflow.workers.methods.lot.features import GRAM, ROWS
from mergeflow.workers.methods.lot.rules import agreed_rule
from mergeflow.workers.methods.registry import register

DEAD = "regmean.dead_inputs/"  # + weight name: input columns no task's features ever reach
PINV = "regmean.pinv/"  # + weight name: the Gram sum was singular, pinv was used


@dataclass(frozen=True)
class RegMeanParams:
    __pydantic_config__ = {"extra": "forbid"}
    scale: float | Literal["auto"] = field(
        default=1.0,
        metadata={
            "doc": "model = base + scale * merged vector (1.0 is RegMean itself); auto: chosen on validation data"
        },
    )
    alpha: float = field(
        default=0.95,
        metadata={
            "doc": "off-diagonal ratio: each Gram's off-diagonal entries are multiplied by alpha "
            "(FusionBench's CLIP config 0.95; 1.0 plain RegMean, 0 a per-input weighted mean)"
        },
    )
    model: str = field(
        default="",
        metadata={
            "doc": "builds each task's model and exemplars (LOT's feature stage): hf (transformers, "
            "from config.json) or module:function"
        },
    )
    exemplars: int = field(default=64, metadata={"doc": "exemplars per task for the Grams (LOT's default)"})
    exemplar_seed: int = field(default=0, metadata={"doc": "which exemplars, when more are available"})
    exemplar_files: dict[str, str] | None = field(
        default=None, metadata={"doc": "hf: a JSON file of token-id lists per task"}
    )
    stats_cache: str | None = field(
        default=None,
        metadata={
            "doc": "where feature statistics are cached by content (default OUTPUT/.lot_stats; LOT's "
            "statistics serve RegMean and back)"
        },
    )

    def __post_init__(self):
        check_scale("scale", self.scale)
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha: the off-diagonal ratio must be in [0, 1], got {self.alpha}")
        if self.exemplars < 1:
            raise ValueError(f"exemplars: must be >= 1, got {self.exemplars}")
        if not self.model:
            raise ValueError("model: RegMean runs each task's model on its exemplars; give hf or module:function")


# ------------------------------------------------------------------------------ the formulas


def reduce_off_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """G~ = G with off-diagonal entries times `ratio`, the diagonal exactly G's."""
    out = gram * ratio
    out.diagonal().copy_(gram.diagonal())
    return out


@dataclass
class RegMeanSolve:
    """(sum_t G~_t)^-1 for one linear weight, factored once, applied to blocks of rows.

    Inputs that no task's features ever reach (a zero diagonal of the sum, so a zero row and column
    in every G~_t) leave the least-squares problem undetermined in their columns: those columns take
    the mean task vector (RegMean's rule for weights without statistics), and the rest is solved on
    its own (the two parts do not interact). A sum still singular falls back to the pseudo-inverse
    (LOT's, keeping the base weights in directions no task's features span)."""

    grams: list[torch.Tensor]  # G~_t, float64
    live: torch.Tensor  # bool (in,): inputs some task's features reach
    lu: torch.Tensor | None
    pivots: torch.Tensor | None
    pinv: torch.Tensor | None

    @classmethod
    def of(cls, grams: list[torch.Tensor]) -> RegMeanSolve:
        total = solve.ordered_sum(grams)
        live = total.diagonal() != 0
        sub = total[live][:, live]
        if sub.numel() == 0:  # no input reached at all: every column is the mean task vector
            return cls(grams, live, None, None, sub)
        lu, pivots, info = torch.linalg.lu_factor_ex(sub)
        if int(info) != 0 or not bool(torch.isfinite(lu).all()):
            return cls(grams, live, None, None, solve.gram_pinv([sub]))
        return cls(grams, live, lu, pivots, None)

    @property
    def dead(self) -> int:
        return int((~self.live).sum())

    def rows(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Delta* for a block of rows: blocks[t] is task t's (rows x in) block of its task vector."""
        acc = None
        for d, g in zip(blocks, self.grams):  # sum_t tau_t G~_t, in task order
            term = d.to(torch.float64) @ g
            acc = term if acc is None else acc.add_(term)
        out = torch.empty_like(acc)
        live = self.live
        rhs = acc[:, live]
        if rhs.numel():
            out[:, live] = (
                rhs @ self.pinv if self.lu is None else torch.linalg.lu_solve(self.lu, self.pivots, rhs, left=False)
            )
        if not bool(live.all()):
            dead = ~live
            out[:, dead] = solve.ordered_sum([d.to(torch.float64)[:, dead] for d in blocks]) / len(blocks)
        return out


def regmean_delta(taus: list[torch.Tensor], grams: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """Delta* of a whole linear weight from per-task mean Grams (in x in): notebooks and tests."""
    return RegMeanSolve.of([reduce_off_diagonal(g.to(torch.float64), ratio) for g in grams]).rows(taus)


# ------------------------------------------------------------------------------ the method


@register
class RegMean(Lot):
    """LOT's feature stage, cache and manifest section (`lot`), RegMean's solve in the map."""

    name = "regmean"
    summary = "RegMean: per linear layer the least-squares merge on each task's input Grams, others the mean"
    Params = RegMeanParams
    scale = "scale"

    def tensor_kernel(self, access, params, ctx):
        headers, keys = ctx.shard
        job, device = access.job, access.device
        if agreed_rule(ctx.tensor, ctx.task_names, keys) != "linear":
            for lo, hi, base, taus in access.chunks():
                yield lo, hi, base, taus, MethodOutput(delta=solve.mean_delta(taus).to(torch.float32))
            return
        if len(job.shape) != 2:
            raise CheckpointError(f"tensor {job.name!r}: RegMean has an input Gram for it but it is not 2-D")
        width = job.shape[1]
        grams = []
        for task, h in zip(ctx.task_names, headers):
            info, rows = h[GRAM + job.name], h[ROWS + job.name]
            if tuple(info.shape) != (width, width):
                raise CheckpointError(
                    f"task {task!r}: input Gram for tensor {job.name!r} has shape {list(info.shape)}, "
                    f"expected {[width, width]} for a tensor of shape {list(job.shape)}"
                )
            n = float(access.elements(rows)[0])
            gram = access.elements(info).to(device).to(torch.float64).reshape(width, width)
            grams.append(reduce_off_diagonal(gram / n, params.alpha))
        solver = RegMeanSolve.of(grams)
        first = {}
        if solver.dead:
            first[DEAD + job.name] = solver.dead
        if solver.lu is None and solver.dead < width:
            first[PINV + job.name] = 1
        for lo, hi, base, taus in access.row_chunks():  # output rows are independent problems
            delta = solver.rows([row.view(-1, width) for row in taus]).reshape(-1).to(torch.float32)
            yield lo, hi, base, taus, MethodOutput(delta=delta, sums=first)
            first = {}

    def manifest(self, run, results) -> dict:
        doc = super().manifest(run, results)
        dead, pinv = {}, []
        for r in results:
            for key, value in r.sums.items():
                if key.startswith(DEAD):
                    dead[key[len(DEAD) :]] = int(value)
                elif key.startswith(PINV):
                    pinv.append(key[len(PINV) :])
        doc["regmean"] = {
            "alpha": run.params.alpha,
            "linear_weights": doc["lot"]["rules"]["linear"],
            "dead_inputs": dead,
            "pinv_fallback": sorted(pinv),
        }
        return doc

    def describe(self, manifest: dict) -> list[str]:
        lot, reg = manifest.get("lot"), manifest.get("regmean")
        if not lot or not reg:
            return []
        lines = [
            f"RegMean     {reg['linear_weights']} linear weight(s) solved on input Grams (off-diagonals x "
            f"{reg['alpha']:g}), other tensors the mean; features of {len(lot['stats'])} task(s): "
            f"{lot['features_computed']} computed, {lot['features_reused']} reused from {lot['stats_cache']}"
        ]
        if reg["dead_inputs"]:
            lines.append(
                f"  {len(reg['dead_inputs'])} weight(s) have inputs no exemplar reaches (their columns take the "
                "mean task vector; manifest regmean.dead_inputs)"
            )
        if reg["pinv_fallback"]:
            lines.append(f"  warning: singular Gram sum, pseudo-inverse used for {', '.join(reg['pinv_fallback'])}")
        return lines
