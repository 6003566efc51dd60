"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

Follows the reference code exactly (docs/methods.md): trim keeps |tau_t| >= thr_t
where thr_t is the k-th smallest |tau_t| with k = P - int(P * density); the
thresholds are computed by workers/kth_value.py before this runs.
"""

import torch

from workers.methods.registry import ChunkGlobals, MethodOutput, MethodParams, merge_method, running_sum


def trim(taus: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    keep = taus.abs() >= thresholds.to(taus.device)[:, None]
    return torch.where(keep, taus, torch.zeros((), dtype=taus.dtype, device=taus.device))


def elect_signs(trimmed: torch.Tensor, majority: int) -> tuple[torch.Tensor, int, int]:
    """Elected sign per coordinate, the chunk's sum of raw signs, and how many
    coordinates fell back to the majority sign while holding nonzero entries.

    The majority sign is a whole-model quantity. Workers apply a provisional one and
    report `ambiguous`; the driver re-runs only shards where it guessed wrong."""
    raw = torch.sign(running_sum(trimmed))
    zero = raw == 0
    ambiguous = int((zero & (trimmed != 0).any(dim=0)).sum())
    sign_sum = int(raw.sum(dtype=torch.int64)) if raw.numel() else 0
    return torch.where(zero, torch.full_like(raw, float(majority)), raw), sign_sum, ambiguous


def disjoint_merge(trimmed: torch.Tensor, signs: torch.Tensor, merge: str) -> torch.Tensor:
    # Entries agreeing with the elected sign; zeros never count, and where the sign is
    # still 0 (a whole-model tie) nothing is kept.
    keep = (torch.sign(trimmed) == signs[None, :]) & (trimmed != 0)
    selected = torch.where(keep, trimmed, torch.zeros((), dtype=trimmed.dtype, device=trimmed.device))
    total = running_sum(selected)
    if merge == "sum":
        return total
    count = keep.sum(dim=0).to(total.dtype)
    return total / torch.clamp(count, min=1)


def ties_vector(taus: torch.Tensor, g: ChunkGlobals, merge: str) -> tuple[torch.Tensor, int, int]:
    trimmed = trim(taus, g.thresholds)
    signs, sign_sum, ambiguous = elect_signs(trimmed, g.majority)
    return disjoint_merge(trimmed, signs, merge), sign_sum, ambiguous


@merge_method("ties")
def ties(taus, params: MethodParams, g: ChunkGlobals) -> MethodOutput:
    """TIES: trim each task vector to its top density, elect signs, average agreeing entries."""
    merged, sign_sum, ambiguous = ties_vector(taus, g, params.ties_merge)
    return MethodOutput(delta=merged, sign_sum=sign_sum, ambiguous=ambiguous)
