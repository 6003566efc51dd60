"""TALL masks (Wang et al. 2024, eq. 3): tau_MTL (Task Arithmetic's sum, or TIES with sum merge)
plus one mask per task keeping the weights where the task's own vector dominates what the other
tasks contribute. model/ holds theta_0 + alpha * tau_MTL; `mergeflow reconstruct` rebuilds each
task's theta_0 + m_t * tau_MTL from the bundle (bundle.py)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from mergeflow.workers.bits import pack_rows, row_counts
from mergeflow.workers.dtypes import TORCH_DTYPES
from mergeflow.workers.methods.base import Method, MethodOutput, check_fraction, check_scale, running_sum
from mergeflow.workers.methods.registry import register
from mergeflow.workers.methods.tall_masks import bundle, lambdas
from mergeflow.workers.methods.ties import TiesStages, majority_redo, thresholds, ties_chunk


@dataclass(frozen=True)
class TallMasksParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = field(default=0.3, metadata={"doc": "model/ = base + alpha * tau_MTL"})
    lambda_: float | dict[str, float] | Literal["auto"] = field(
        default=0.4,
        metadata={"doc": "mask threshold: one value, {task: value}, or auto (chosen per task on validation data)"},
    )
    base_merge: Literal["task_arithmetic", "ties"] = field(
        default="task_arithmetic",
        metadata={"doc": "tau_MTL: the Task Arithmetic sum, or TIES with sum merge (the paper's two variants)"},
    )
    density: float = field(default=0.2, metadata={"doc": "base_merge ties: share of each task vector kept"})
    scope: Literal["global", "tensor"] = field(default="global", metadata={"doc": "base_merge ties: trim scope"})
    store_dtype: Literal["base", "float32"] = field(
        default="base",
        metadata={
            "doc": "dtype of tau_MTL in compressed/: the base's, or float32 (rebuilds exactly what the masks saw)"
        },
    )

    def __post_init__(self):
        check_scale("alpha", self.alpha)
        check_fraction("density", self.density)
        lam = self.lambda_
        if lam != "auto" and any(
            not math.isfinite(x) or x < 0 for x in (lam.values() if isinstance(lam, dict) else [lam])
        ):
            raise ValueError("lambda: values must be finite and >= 0")


def multitask_vector(taus: torch.Tensor, params, ctx) -> tuple[torch.Tensor, dict]:
    """tau_MTL and the sums TIES reports (none for Task Arithmetic)."""
    if params.base_merge == "ties":
        return ties_chunk(taus, ctx, "sum")
    return running_sum(taus), {}


def task_masks(taus: torch.Tensor, tau_mtl: torch.Tensor, lambdas_: torch.Tensor) -> torch.Tensor:
    """|tau_t| > lambda_t * |tau_MTL - tau_t| per task row.

    Strict '>' as in the reference code; the paper's '>=' differs only where both sides are 0.
    Row by row into reused buffers (same float32 operations as the broadcast formula)."""
    masks = torch.empty(taus.shape, dtype=torch.bool, device=taus.device)
    other = torch.empty_like(tau_mtl)
    mag = torch.empty_like(tau_mtl)
    for t in range(taus.shape[0]):
        torch.sub(tau_mtl, taus[t], out=other).abs_().mul_(lambdas_[t])
        torch.gt(torch.abs(taus[t], out=mag), other, out=masks[t])
    return masks


def mask_counts(masks: torch.Tensor) -> torch.Tensor:
    """How many task masks keep each weight: masks.sum(dim=0), added row by row in a small
    integer type (torch reduces bool tensors over their first dimension slowly)."""
    count = masks[0].to(torch.int16)
    for t in range(1, masks.shape[0]):
        count += masks[t]
    return count


def chunk_lambdas(params, ctx, like: torch.Tensor) -> torch.Tensor:
    lam = params.lambda_
    if lam == "auto":  # the candidate pass: the masks written are the grid's (bundle.shard_files)
        lam = ctx.globals["mask_grid"][0]
    return torch.tensor(
        bundle.lambdas_of(dataclasses.replace(params, lambda_=lam), ctx.task_names),
        dtype=torch.float32,
        device=like.device,
    )


@register
class TallMasks(Method):
    name = "tall_masks"
    summary = "TALL masks: tau_MTL plus one mask per task; model/ holds theta_0 + alpha * tau_MTL"
    Params = TallMasksParams
    selectable = ("lambda_",)
    compresses = True

    def check(self, params, task_names):
        lam = params.lambda_
        if isinstance(lam, dict):
            unknown = sorted(set(lam) - set(task_names))
            missing = [t for t in task_names if t not in lam]
            if unknown:
                raise ValueError(f"lambda: names unknown task {unknown[0]!r}")
            if missing:
                raise ValueError(f"lambda: no value for task {missing[0]!r} (give every task one)")

    # ------------------------------------------------------------------ worker side

    def prepare_tensor(self, access, params, ctx):
        if params.base_merge == "ties":
            return TiesStages.prepare_tensor(access, params.density, params.scope, ctx.globals)
        return None

    def shard_files(self, spec):
        return bundle.shard_files(spec)

    def delta(self, tau_mtl: torch.Tensor, masks: torch.Tensor, params) -> torch.Tensor:
        """What model/ holds, unscaled."""
        return tau_mtl

    def kernel(self, taus, params, ctx) -> MethodOutput:
        tau_mtl, sums = multitask_vector(taus, params, ctx)
        masks = task_masks(taus, tau_mtl, chunk_lambdas(params, ctx, taus))
        store = torch.float32 if params.store_dtype == "float32" else TORCH_DTYPES[ctx.dtype]
        files = {"tau": tau_mtl.to(store)}
        packed = pack_rows(masks).cpu()
        grid = ctx.globals.get("mask_grid")
        if grid:
            t = taus.shape[0]
            for i, lam in enumerate(grid):
                candidate = pack_rows(task_masks(taus, tau_mtl, torch.full((t,), lam, device=taus.device))).cpu()
                files |= {f"grid/{i}/{task}": candidate[row] for row, task in enumerate(ctx.task_names)}
        else:
            files |= {f"mask/{task}": packed[row] for row, task in enumerate(ctx.task_names)}
        layer_sums = {
            "kept": row_counts(masks, packed),
            "count_hist": torch.bincount(mask_counts(masks), minlength=taus.shape[0] + 1)
            .cpu()
            .numpy()
            .astype(np.int64),
        }
        return MethodOutput(delta=self.delta(tau_mtl, masks, params), files=files, sums=sums, layer_sums=layer_sums)

    # ------------------------------------------------------------------ driver side

    def before_map(self, run) -> None:
        p = run.params
        if p.base_merge == "ties":  # lambda candidates need exact thresholds: no zero guess then
            thresholds.prepare(run, p.density, p.scope, guess_zeros=p.lambda_ != "auto")
        if p.lambda_ == "auto":
            chosen = run.saved.get("lambda") or lambdas.select(run, majority_redo if p.base_merge == "ties" else None)
            run.saved["lambda"] = chosen
            run.save()
            run.selection["lambda"] = chosen
            run.params = dataclasses.replace(p, lambda_={t: float(chosen["chosen"][t]) for t in run.task_names})

    def after_map(self, run, results):
        if run.params.base_merge == "ties":
            return TiesStages.after_map(run, results, run.params.density)
        return None

    def can_reuse(self, recorded, spec) -> bool:
        return TiesStages.can_reuse(recorded, spec)

    def run_files(self, run, results):
        return {bundle.INDEX: bundle.index_doc(run)}

    def manifest(self, run, results):
        return TiesStages.manifest(run, results) if run.params.base_merge == "ties" else {}

    def describe(self, manifest: dict) -> list[str]:
        s, method = manifest.get("summary", {}), manifest["method"]
        lines = []
        if "mask_density" in s:
            lam = method.get("lambda")
            lines.append("mask density per task (share of weights the task's mask keeps):")
            for t in (t["name"] for t in manifest["inputs"]["tasks"]):
                value = lam.get(t) if isinstance(lam, dict) else lam
                lines.append(f"  {t:<24} {s['mask_density'][t]:7.2%}   lambda {value:g}")
            hist = s["tasks_keeping"]
            total = max(sum(hist), 1)
            lines.append("weights kept by c tasks (c = 0 catastrophic, 1 selfish):")
            for c, n in enumerate(hist):
                lines.append(f"  {c:>3}  {n / total:7.2%}  {'#' * round(40 * n / total)}")
        return lines + TiesStages.describe(manifest)

    # ------------------------------------------------------------------ reconstruct

    def rebuild_specs(self, run, manifest, task, parts, base, output, options, chunk_elems, model_order):
        return bundle.rebuild_specs(run, manifest, task, parts, base, output, options, chunk_elems, model_order)

    rebuild_part = staticmethod(bundle.rebuild_part)  # a plain function: Ray ships it by reference
