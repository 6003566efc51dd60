"""Exact k-th smallest |tau| over data that never sits in one place.

For non-negative float32 values the IEEE bit pattern, read as an integer, sorts
like the value. So the k-th smallest value is found from two histograms of bit
patterns: the high 16 bits first (32768 bins, the sign bit is 0), then the low 16
bits of only those values whose high half is the winning bin. Both histograms are
additive across chunks and shards, which makes a distributed TIES threshold
bit-identical to `torch.kthvalue` on the flattened model vector.
"""

from __future__ import annotations

import numpy as np
import torch

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16


def abs_bits(values: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |values| (float32), order-preserving."""
    return values.abs().contiguous().view(torch.int32)


def new_histogram(tasks: int, bins: int) -> torch.Tensor:
    return torch.zeros(tasks * bins, dtype=torch.int64)


# |tau| bit patterns from here up are Inf (0x7F800000) and NaN: their high halves.
NONFINITE_HIGH = 0x7F80


def _rows(hist: torch.Tensor, bins: int) -> torch.Tensor:
    return hist.view(-1, bins)


def add_high_histogram(hist: torch.Tensor, taus: torch.Tensor) -> None:
    """Accumulate the high 16 bits of |tau_t| into hist, a flat (T * HIGH_BINS) counter."""
    rows = _rows(hist, HIGH_BINS)
    for t in range(taus.shape[0]):
        # one row at a time: temporaries stay O(chunk), and bincount is a single pass
        high = abs_bits(taus[t]) >> 16
        rows[t] += torch.bincount(high, minlength=HIGH_BINS).cpu()


def add_low_histogram(hist: torch.Tensor, taus: torch.Tensor, high_bins: np.ndarray) -> None:
    """Accumulate the low 16 bits of |tau_t| among values in row t's chosen high bin."""
    rows = _rows(hist, LOW_BINS)
    for t in range(taus.shape[0]):
        if high_bins[t] < 0:
            continue
        bits = abs_bits(taus[t])
        low = bits[(bits >> 16) == int(high_bins[t])] & 0xFFFF
        if low.numel():
            rows[t] += torch.bincount(low, minlength=LOW_BINS).cpu()


def nonfinite_count(hist: torch.Tensor) -> int:
    """How many NaN/Inf values a high histogram has counted, over all tasks."""
    return int(_rows(hist, HIGH_BINS)[:, NONFINITE_HIGH:].sum())


def as_rows(hist: torch.Tensor, tasks: int) -> np.ndarray:
    return hist.view(tasks, -1).numpy()


def high_histogram(taus: torch.Tensor) -> np.ndarray:
    """(T, HIGH_BINS) counts of the high 16 bits of |tau_t|, one row per task."""
    hist = new_histogram(taus.shape[0], HIGH_BINS)
    add_high_histogram(hist, taus)
    return as_rows(hist, taus.shape[0])


def low_histogram(taus: torch.Tensor, high_bins: np.ndarray) -> np.ndarray:
    """(T, LOW_BINS) counts of the low 16 bits of |tau_t| among values in row t's chosen high bin
    (rows with high bin -1 count nothing)."""
    hist = new_histogram(taus.shape[0], LOW_BINS)
    add_low_histogram(hist, taus, high_bins)
    return as_rows(hist, taus.shape[0])


def kth_rank(total: int, density: float) -> int:
    """The reference code's rank: k = P - int(P * density) (1-indexed; 0 means keep all)."""
    return total - int(total * density)


def locate(hist: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the bin holding the k-th smallest element and the rank within that bin.
    Rows with k <= 0 get bin -1."""
    cum = np.cumsum(hist, axis=1)
    bins = np.full(hist.shape[0], -1, dtype=np.int64)
    within = np.zeros(hist.shape[0], dtype=np.int64)
    for t in range(hist.shape[0]):
        if k[t] <= 0:
            continue
        b = int(np.searchsorted(cum[t], k[t], side="left"))
        bins[t] = b
        within[t] = k[t] - (cum[t, b - 1] if b > 0 else 0)
    return bins, within


def thresholds_from(high_bins: np.ndarray, low_hist: np.ndarray, within: np.ndarray) -> np.ndarray:
    """float32 thresholds; 0.0 (keep everything) for rows that keep all entries."""
    out = np.zeros(len(high_bins), dtype=np.float32)
    for t, hb in enumerate(high_bins):
        if hb < 0:
            continue
        low, _ = locate(low_hist[t : t + 1], within[t : t + 1])
        out[t] = np.array([(int(hb) << 16) | int(low[0])], dtype=np.int32).view(np.float32)[0]
    return out
