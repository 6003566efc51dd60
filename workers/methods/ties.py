"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

Follows the reference code exactly (docs/methods.md): trim keeps |tau_t| >= thr_t
where thr_t is the k-th smallest |tau_t| with k = P - int(P * density); the
thresholds are computed by workers/kth_value.py before this runs.
"""

import numpy as np
import torch

from workers.methods.registry import ChunkGlobals, MethodOutput, MethodParams, merge_method

# Row by row, with float arithmetic only: every temporary is one chunk row (it stays in
# cache), nothing reduces over the task dimension (torch does that slowly for (T, n)
# tensors), and no boolean mask meets a float tensor (torch's type promotion runs those
# products 5-10x slower than float ones). For finite task vectors the results are
# bit-identical to the whole-tensor formulas in the comments (tests/test_methods.py).


def _just_below(threshold: float) -> float:
    """The largest float32 below threshold: |x| > it  <=>  |x| >= threshold, for float32 x."""
    return float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))


def trim(taus: torch.Tensor, thresholds: torch.Tensor) -> list[torch.Tensor]:
    """where(|tau_t| >= thr_t, tau_t, 0) per row; a row with threshold 0 keeps everything (and is
    returned as a view of taus). hardshrink is that test in one vectorised pass."""
    rows = []
    for t, thr in enumerate(thresholds.tolist()):
        if thr > 0:
            rows.append(torch.ops.aten.hardshrink.out(taus[t], _just_below(thr), out=torch.empty_like(taus[t])))
        else:
            rows.append(taus[t])
    return rows


def elect_signs(trimmed: list[torch.Tensor], majority: int) -> tuple[torch.Tensor, int, int]:
    """Elected sign per coordinate, the chunk's sum of raw signs, and how many
    coordinates fell back to the majority sign while holding nonzero entries.

    The majority sign is a whole-model quantity. Workers apply a provisional one and
    report `ambiguous`; the driver re-runs only shards where it guessed wrong."""
    summed = trimmed[0].clone()  # sum over tasks in task order (as running_sum)
    held = torch.abs(trimmed[0])  # > 0 where some task holds a nonzero entry
    mag = torch.empty_like(held)
    for x in trimmed[1:]:
        summed += x
        held += torch.abs(x, out=mag)
    raw = torch.sign(summed)
    zero = raw == 0
    ambiguous = int(torch.count_nonzero(zero & (held > 0)))
    sign_sum = int(raw.sum(dtype=torch.int64)) if raw.numel() else 0
    if majority:
        raw.masked_fill_(zero, float(majority))  # where(raw == 0, majority, raw)
    return raw, sign_sum, ambiguous


def disjoint_merge(trimmed: list[torch.Tensor], signs: torch.Tensor, merge: str) -> torch.Tensor:
    # Entries agreeing with the elected sign: with signs in {-1, 0, 1}, max(x * s, 0) is |x|
    # where sign(x) == s and x != 0, else 0, and multiplying back by s gives x exactly. Where
    # the sign is still 0 (a whole-model tie) nothing is kept.
    total = torch.zeros_like(signs)
    count = torch.zeros_like(signs) if merge != "sum" else None
    agree = torch.empty_like(signs)
    for x in trimmed:
        torch.mul(x, signs, out=agree).clamp_min_(0.0)
        total.addcmul_(agree, signs)  # + x where it agrees; the product is exact, so no rounding differs
        if count is not None:
            count += torch.sign(agree)
    total.add_(0.0)  # where(keep, x, +0.0) summed: a -0.0 total becomes +0.0
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
