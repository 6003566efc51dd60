"""TIES merging (Yadav et al. 2023): trim each task vector to its top `density` by magnitude,
elect a sign per weight, average (or sum) the entries that agree with it.

Trim thresholds are exact: one per task over the whole model (scope "global", as the paper's
code) or per tensor; thresholds.py computes them. Where the elected sign is exactly 0 but some
trimmed entry is not, the reference falls back to the whole-model majority sign: a sum known only
after the map, so shards use a provisional one and after_map redoes the few that guessed wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from mergeflow.workers import kth_value
from mergeflow.workers.methods.base import Method, MethodOutput, Redo, check_fraction, check_scale
from mergeflow.workers.methods.registry import register
from mergeflow.workers.methods.ties import thresholds
from mergeflow.workers.methods.ties.vectors import ties_vector


@dataclass(frozen=True)
class TiesParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] | None = field(
        default=None,
        metadata={
            "doc": "model = base + alpha * merged vector; default 1.0 with merge mean (already one task's "
            "scale), 0.3 with sum"
        },
    )
    density: float = field(default=0.2, metadata={"doc": "share of each task vector kept by the trim, in (0, 1]"})
    scope: Literal["global", "tensor"] = field(
        default="global", metadata={"doc": "trim threshold over the whole model (the paper's code) or per tensor"}
    )
    merge: Literal["mean", "sum"] = field(default="mean", metadata={"doc": "disjoint merge of the agreeing entries"})

    def __post_init__(self):
        if self.alpha is None:
            object.__setattr__(self, "alpha", 1.0 if self.merge == "mean" else 0.3)
        check_scale("alpha", self.alpha)
        check_fraction("density", self.density)


def trim_thresholds(ctx) -> torch.Tensor:
    return ctx.globals["tensor_thresholds"]


class TiesStages:
    """The driver-side and per-tensor stages of TIES, shared by the methods that merge with it
    (TALL masks and consensus over TIES)."""

    @staticmethod
    def prepare_tensor(access, density: float, scope: str, globals_: dict) -> dict:
        if scope == "tensor":
            return {"tensor_thresholds": thresholds.tensor_thresholds(access, density)}
        return {"tensor_thresholds": torch.tensor(globals_["thresholds"], dtype=torch.float32)}

    @staticmethod
    def after_map(run, results: dict, density: float) -> Redo | None:
        saved = run.saved
        if "zeros_to_check" in saved:  # thresholds of 0 guessed from the sample: the merge counted the zeros
            saved["zero_guess"] = "confirmed" if thresholds.check_zeros(run, results, density) else "refuted"
            run.globals.update(thresholds=tuple(saved["thresholds"]), count_zeros=False)
            run.save()
            if saved["zero_guess"] == "refuted":
                return Redo(run.shards, f"merge ({run.method.name})")
        redo = majority_redo(run.shards, [results[s.index] for s in run.shards])
        return Redo(redo, "TIES majority-sign fix-up") if redo else None

    @staticmethod
    def can_reuse(recorded, spec) -> bool:
        """A shard is reusable when merged with the run's thresholds (and counted zeros, where the
        run checks guessed ones); the majority sign is checked after the map anyway."""
        used, want = recorded.globals_used, spec.globals
        same = list(used.get("thresholds") or []) == list(want.get("thresholds") or [])
        return same and ("zeros" in recorded.sums or not want.get("count_zeros"))

    @staticmethod
    def manifest(run, results: list) -> dict:
        doc = {
            "thresholds": list(run.globals.get("thresholds") or ()),  # empty: per-tensor scope
            "majority": int(np.sign(sum(r.sums.get("sign_sum", 0) for r in results))),
        }
        if run.saved.get("zero_guess"):
            doc["zero_guess"] = run.saved["zero_guess"]
        return {"ties": doc}

    @staticmethod
    def describe(manifest: dict) -> list[str]:
        if "ties" not in manifest:
            return []
        ties = manifest["ties"]
        lines = [
            f"TIES        thresholds per task {[f'{x:.3g}' for x in ties['thresholds']] or 'per tensor'}, "
            f"majority sign {ties['majority']:+d}"
        ]
        guess = {
            "confirmed": "0 from the sample, confirmed by the merge's zero counts",
            "refuted": "the sample's 0 was refuted by the merge's zero counts; merged again with these",
        }
        if ties.get("zero_guess") in guess:
            lines.append(f"            thresholds: {guess[ties['zero_guess']]}")
        return lines


def majority_redo(specs: list, results: list) -> list:
    """The whole-model majority sign is known only after the map: the shards that relied on a
    different provisional sign at an exact tie, with the true one, to merge again."""
    majority = int(np.sign(sum(r.sums.get("sign_sum", 0) for r in results)))
    by_index = {s.index: s for s in specs}
    return [
        by_index[r.index].with_globals(majority=majority)
        for r in results
        if r.sums.get("ambiguous") and r.globals_used.get("majority", 1) != majority
    ]


def ties_chunk(taus: torch.Tensor, ctx, merge: str) -> tuple[torch.Tensor, dict]:
    """The TIES vector of a chunk and its sums (zero counts when the run checks guessed thresholds)."""
    sums = {}
    if ctx.globals.get("count_zeros"):
        sums["zeros"] = taus.shape[1] - kth_value.nonzero_counts(taus)
    merged, sign_sum, ambiguous = ties_vector(taus, trim_thresholds(ctx), ctx.globals.get("majority", 1), merge)
    sums |= {"sign_sum": sign_sum, "ambiguous": ambiguous}
    return merged, sums


@register
class Ties(Method):
    name = "ties"
    summary = "TIES: trim each task vector to its top density, elect signs, average agreeing entries"
    Params = TiesParams

    def before_map(self, run) -> None:
        thresholds.prepare(run, run.params.density, run.params.scope, guess_zeros=True)

    def prepare_tensor(self, access, params, ctx):
        return TiesStages.prepare_tensor(access, params.density, params.scope, ctx.globals)

    def kernel(self, taus, params, ctx) -> MethodOutput:
        merged, sums = ties_chunk(taus, ctx, params.merge)
        return MethodOutput(delta=merged, sums=sums)

    def after_map(self, run, results):
        return TiesStages.after_map(run, results, run.params.density)

    def can_reuse(self, recorded, spec) -> bool:
        return TiesStages.can_reuse(recorded, spec)

    def manifest(self, run, results):
        return TiesStages.manifest(run, results)

    def describe(self, manifest):
        return TiesStages.describe(manifest)
