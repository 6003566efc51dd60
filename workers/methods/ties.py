"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

Follows the reference code exactly (docs/methods.md): trim keeps |tau_t| >= thr_t
where thr_t is the k-th smallest |tau_t| with k = P - int(P * density); the
thresholds are computed by workers/kth_value.py before this runs.
"""

import torch

from workers.methods.registry import ChunkGlobals, MethodOutput, MethodParams, merge_method, running_sum


# Row by row: every temporary is one chunk row (it stays in cache), and nothing reduces over
# the task dimension, which torch does slowly for (T, n) tensors. Masks are applied by
# multiplying with them (several times faster than torch.where on the CPU); where a zero's
# sign could reach an output it is normalised to +0.0, the fill torch.where used. For finite
# task vectors the results are bit-identical to the whole-tensor formulas in the comments.


def trim(taus: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """where(|tau_t| >= thr_t, tau_t, 0); dropped entries may be -0.0, which no later step
    can tell from +0.0 (sums of nonzero values, signs of sums, != 0 tests)."""
    thresholds = thresholds.to(taus.device)
    out = torch.empty_like(taus)
    mag = torch.empty_like(taus[0])
    for t in range(taus.shape[0]):
        torch.mul(taus[t], torch.abs(taus[t], out=mag) >= thresholds[t], out=out[t])
    return out


def elect_signs(trimmed: torch.Tensor, majority: int) -> tuple[torch.Tensor, int, int]:
    """Elected sign per coordinate, the chunk's sum of raw signs, and how many
    coordinates fell back to the majority sign while holding nonzero entries.

    The majority sign is a whole-model quantity. Workers apply a provisional one and
    report `ambiguous`; the driver re-runs only shards where it guessed wrong."""
    raw = torch.sign(running_sum(trimmed))
    zero = raw == 0
    held = trimmed[0] != 0  # (trimmed != 0).any(dim=0)
    for t in range(1, trimmed.shape[0]):
        held |= trimmed[t] != 0
    ambiguous = int((zero & held).sum())
    sign_sum = int(raw.sum(dtype=torch.int64)) if raw.numel() else 0
    return torch.where(zero, torch.full_like(raw, float(majority)), raw), sign_sum, ambiguous


def disjoint_merge(trimmed: torch.Tensor, signs: torch.Tensor, merge: str) -> torch.Tensor:
    # Entries agreeing with the elected sign; zeros never count, and where the sign is
    # still 0 (a whole-model tie) nothing is kept. With signs in {-1, 0, 1},
    # (sign(x) == s) & (x != 0) is exactly x * s > 0 (the product is exact).
    total = None
    count = torch.zeros_like(signs) if merge != "sum" else None
    agree = torch.empty_like(signs)
    for t in range(trimmed.shape[0]):
        keep = torch.mul(trimmed[t], signs, out=agree) > 0
        selected = torch.mul(trimmed[t], keep).add_(0.0)  # where(keep, x, +0.0): -0.0 + 0.0 is +0.0
        total = selected if total is None else total.add_(selected)  # task order, as running_sum
        if count is not None:
            count += keep
    if merge == "sum":
        return total
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
