"""TIES' vector math on one chunk: trim, elect sign, disjoint merge (Yadav et al. 2023), exactly
as the reference code (docs/methods.md): trim keeps |tau_t| >= thr_t where thr_t is the k-th
smallest |tau_t| with k = P - int(P * density)."""

import numpy as np
import torch

from mergeflow.workers.kth_value import small_int_sum

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


def elect_signs(trimmed: list[torch.Tensor], majority: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Elected sign per coordinate, the chunk's sum of raw signs, and `tied`: 1.0 where the raw
    sign is 0 (the sum of the trimmed entries is exactly 0), else 0.0.

    The majority sign is a whole-model quantity. Workers apply a provisional one and report
    how many tied coordinates it decided; the driver re-runs only shards where it guessed wrong."""
    summed = trimmed[0].clone()  # sum over tasks in task order (as running_sum)
    for x in trimmed[1:]:
        summed += x
    raw = torch.sign(summed)
    sign_sum = small_int_sum(raw)
    tied = torch.mul(raw, raw).neg_().add_(1.0)  # 1 - raw**2, exact for raw in {-1, 0, 1}
    if majority:
        raw.add_(tied, alpha=float(majority))  # where(raw == 0, majority, raw) without a bool mask
    return raw, sign_sum, tied


def disjoint_merge(trimmed: list[torch.Tensor], signs: torch.Tensor, merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged vector and, per coordinate, the sum of |entries| agreeing with the sign.

    With signs in {-1, 0, 1}, max(x * s, 0) is |x| where sign(x) == s and x != 0, else 0; the
    agreeing magnitudes are summed and multiplied by s once at the end, which is exact (round to
    nearest is symmetric), so the result equals summing the agreeing x themselves. Where the sign
    is still 0 (a whole-model tie) nothing is kept."""
    magnitude = torch.zeros_like(signs)
    count = torch.zeros_like(signs) if merge != "sum" else None
    agree = torch.empty_like(signs)
    agrees = torch.empty_like(signs) if count is not None else None  # 1 where x agrees, else 0
    for x in trimmed:
        torch.mul(x, signs, out=agree).clamp_min_(0.0)
        magnitude += agree
        if count is not None:
            count += torch.sign(agree, out=agrees)
    total = torch.mul(magnitude, signs).add_(0.0)  # + 0.0: a -0.0 total becomes +0.0
    if count is not None:
        total /= count.clamp_min_(1.0)
    return total, magnitude


def ties_vector(
    taus: torch.Tensor, thresholds: torch.Tensor, majority: int, merge: str
) -> tuple[torch.Tensor, int, int]:
    """The TIES merged vector of a chunk, the sum of its elected signs, and how many coordinates
    the (provisional) majority sign decided."""
    trimmed = trim(taus, thresholds)
    signs, sign_sum, tied = elect_signs(trimmed, majority)
    merged, magnitude = disjoint_merge(trimmed, signs, merge)
    return merged, sign_sum, _decided_by_majority(trimmed, tied, magnitude, majority)


def _decided_by_majority(
    trimmed: list[torch.Tensor], tied: torch.Tensor, magnitude: torch.Tensor, majority: int
) -> int:
    """Tied coordinates holding a nonzero trimmed entry: those whose result depends on the majority sign.

    A tie with a nonzero entry has entries of both signs (same-signed nonzero floats never sum to
    0), so with majority +1 or -1 some entry agrees and its magnitude is > 0 there. With majority 0
    nothing agrees, and the entries are looked at directly (a rare fix-up pass)."""
    if not majority:
        magnitude = torch.zeros_like(tied)
        for x in trimmed:
            magnitude += torch.abs(x)
    return small_int_sum(torch.sign(magnitude).mul_(tied))
