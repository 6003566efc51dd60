"""Exact k-th smallest |tau| over data that never sits in one place.

For non-negative float32 values the IEEE bit pattern, read as an integer, sorts like the
value, so counts of bit patterns locate the k-th smallest value exactly. Counts are additive
across chunks and shards, which makes a distributed TIES threshold bit-identical to
`torch.kthvalue` on the flattened model vector.

Counting every one of the 2^31 patterns is too much, so the selection narrows down: a 1/32
sample places each task's k-th value in a window of a few thousand to a few hundred thousand
patterns; one pass counts the values below the window and every pattern inside it, and that
is the answer when the k-th value is inside (the usual case). A task whose window would be
too wide, or missed, takes a pass over the high 16 bits (32768 bins, the sign bit is 0) and
then a window on the winning bin. The result never depends on the sample; only the number
of passes does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

HIGH_BINS = 1 << 15
# |tau| bit patterns from here up are Inf (0x7F800000) and NaN: their high halves.
NONFINITE_HIGH = 0x7F80


def abs_bits(values: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |values| (float32), order-preserving."""
    return values.abs().contiguous().view(torch.int32)


def high_histogram(taus: torch.Tensor) -> np.ndarray:
    """(T, HIGH_BINS) counts of the high 16 bits of |tau_t|, one row per task."""
    return np.stack([torch.bincount(abs_bits(row) >> 16, minlength=HIGH_BINS).cpu().numpy() for row in taus])


def kth_rank(total: int, density: float) -> int:
    """The reference code's rank: k = P - int(P * density) (1-indexed; 0 means keep all)."""
    return total - int(total * density)


# ------------------------------------------------------------------------ selection

SAMPLE_EVERY = 32  # the sample reads one block in this many
SAMPLE_BLOCK = 1 << 16  # elements per sampled block: long reads, spread evenly over each tensor
SAMPLE_SLACK = 0.01  # rank margin for the sample's correlation (see first_count) ...
BLOCK_SLACK = 0.05  # ... or this over sqrt(blocks sampled), when larger (under 25 blocks: one tensor)
WINDOW_MAX_BINS = 16  # widest window, in high-half bins of 65536 bit patterns (8 MiB of int64
# counts per task). On a CPU a window pass costs ~2-3 ns per value at any width up to this, as it
# counts only the few percent of values inside (_add_window_cpu); a bincount of every value into
# 1M columns took ~18 ns. A wider window would mean a second pass on the CPU and, more, memory.


def sample_ranges(numel: int, phase: int = 0):
    """Element ranges [lo, hi) the sample reads from a tensor: 1 / SAMPLE_EVERY of it, in blocks
    at a fixed stride (small tensors get proportionally small blocks, so none is over-weighted)."""
    block = max(1, min(SAMPLE_BLOCK, numel // SAMPLE_EVERY))
    stride = block * SAMPLE_EVERY
    for lo in range((phase % SAMPLE_EVERY) * block, numel, stride):
        yield lo, min(numel, lo + block)


@dataclass
class Sample:
    """High-half histogram and exact zeros of sampled |tau| values, additive across shards."""

    high: np.ndarray  # (T, HIGH_BINS)
    zeros: np.ndarray  # (T,)
    blocks: int = 0  # sampled blocks (add() takes one block at a time)

    @classmethod
    def empty(cls, tasks: int) -> Sample:
        return cls(np.zeros((tasks, HIGH_BINS), dtype=np.int64), np.zeros(tasks, dtype=np.int64))

    def add(self, taus: torch.Tensor) -> None:
        self.high += high_histogram(taus)
        self.zeros += (taus.shape[1] - torch.count_nonzero(taus, dim=1)).cpu().numpy()
        self.blocks += 1

    def __add__(self, other: Sample) -> Sample:
        return Sample(self.high + other.high, self.zeros + other.zeros, self.blocks + other.blocks)

    def first_plan(self, total: int, k: np.ndarray) -> list[Count]:
        """The first pass's Count for every task (see first_count)."""
        return [first_count(self.high[t], int(self.zeros[t]), total, int(k[t]), self.blocks) for t in range(len(k))]


@dataclass(frozen=True)
class Count:
    """What one pass counts for one task: nothing ("skip"), the high-half histogram ("high"),
    or the values below, at each bit pattern of, and above the window [lo, lo + width)
    ("window")."""

    kind: Literal["skip", "window", "high"] = "skip"
    lo: int = 0
    width: int = 0

    @property
    def columns(self) -> int:
        return {"skip": 0, "window": self.width + 2, "high": HIGH_BINS}[self.kind]


SKIP = Count()
Plan = tuple  # of Count, one per task: what a pass counts


def first_count(high: np.ndarray, zeros: int, total: int, k: int, blocks: int) -> Count:
    """The first pass for one task: a window around its k-th value as the sample places it."""
    n = int(high.sum())
    if k <= 0:
        return SKIP
    if n == 0:
        return Count("high")
    # The sample's rank of the k-th value, give or take 6 binomial standard deviations, plus a
    # slack times the binomial spread of a sample of one: values within a block are correlated
    # (rows share a scale), so the sample errs ~10x more than a binomial one. On whole-model
    # samples (~230 blocks a task) of bench/families.py models the error was 0.0033 (sparse) and
    # 0.0087 (dense task vectors) times that spread: SAMPLE_SLACK. One tensor's sample holds a
    # handful of blocks and errs like that many observations: BLOCK_SLACK / sqrt(blocks) (with a
    # constant slack, 5 of 14 dense tensors' windows missed; with this, none of 71). A window
    # that misses costs two more passes, never exactness.
    q = min(1.0, k / total)
    spread = math.sqrt(q * (1 - q))
    slack = max(SAMPLE_SLACK, BLOCK_SLACK / math.sqrt(max(blocks, 1)))
    margin = 6.0 * spread * math.sqrt(n) + slack * spread * n + 8
    r_lo, r_hi = max(1, math.floor(q * n - margin)), min(n, math.ceil(q * n + margin))
    if r_hi <= zeros:
        return Count("window", 0, 1)  # the k-th value is 0: only exact zeros need counting
    cum = np.cumsum(high)
    b_lo, b_hi = (int(np.searchsorted(cum, r, side="left")) for r in (r_lo, r_hi))
    if b_hi - b_lo + 1 > WINDOW_MAX_BINS:
        return Count("high")
    return Count("window", b_lo << 16, (b_hi - b_lo + 1) << 16)


def zeros_expected(sample: Sample, total: int, k: np.ndarray) -> bool:
    """Whether the sample puts every task's k-th value at 0 with margin (some task must trim at
    all): the thresholds are then all 0 unless each task has fewer than k exact zeros, which the
    apply pass can count instead of a pass of its own."""
    plan = sample.first_plan(total, k)
    return any(counts_zeros(c) for c in plan) and zeros_only(plan)


def counts_zeros(c: Count) -> bool:
    """The window [0, 1): the pass only needs how many values are exactly 0."""
    return c.kind == "window" and c.lo == 0 and c.width == 1


def zeros_only(plan: Plan) -> bool:
    """A pass that counts nothing but exact zeros, for every task it counts at all."""
    return all(c.kind == "skip" or counts_zeros(c) for c in plan)


def small_int_sum(values: torch.Tensor) -> int:
    """Sum of a row of small integers held as floats: float32 keeps every partial sum exact below
    2**24 and reduces 4-10x faster than int64 or float64."""
    dtype = torch.float32 if values.numel() < 1 << 24 else torch.float64
    return int(values.sum(dtype=dtype)) if values.numel() else 0


def nonzero_counts(taus: torch.Tensor) -> np.ndarray:
    """Per row of finite taus (T, n), how many values are not 0: |sign| summed (torch.count_nonzero
    branches per value: ~5x slower on sparse float rows)."""
    scratch = torch.empty_like(taus[0])
    return np.array([small_int_sum(torch.sign(row, out=scratch).abs_()) for row in taus], dtype=np.int64)


def new_counts(plan: Plan, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    return [torch.zeros(c.columns, dtype=torch.int64, device=device) for c in plan]


def add_counts(counts: list[torch.Tensor], taus: torch.Tensor, plan: Plan) -> int:
    """Count taus (T, n) as the plan says, row by row. Returns the largest |tau| bit pattern
    seen (NONFINITE_HIGH << 16 or more means a NaN or Inf)."""
    top = 0
    if not taus.shape[1]:
        return top
    mag = torch.empty_like(taus[0])  # scratch rows, reused across tasks: fresh ones cost page faults
    key = torch.empty(taus.shape[1], dtype=torch.int32, device=taus.device)
    for t, c in enumerate(plan):
        if c.kind == "skip":
            continue
        bits = torch.abs(taus[t], out=mag).view(torch.int32)
        top = max(top, int(bits.max()))
        if c.kind == "high":
            counts[t] += torch.bincount(torch.bitwise_right_shift(bits, 16, out=key), minlength=HIGH_BINS)
        elif counts_zeros(c):  # zeros against the rest: one count, no histogram
            nonzero = int(torch.count_nonzero(bits))
            counts[t][1] += bits.numel() - nonzero
            counts[t][2] += nonzero
        elif bits.device.type == "cpu":
            _add_window_cpu(counts[t], bits, c)
        else:
            add_window(counts[t], bits, c, key)
    return top


def add_window(row: torch.Tensor, bits: torch.Tensor, c: Count, key: torch.Tensor) -> None:
    """Window counts [below, one per pattern in [lo, lo + width), above] with one bincount over
    every value (int32 scratch `key`): for devices, where a histogram of any width is cheap."""
    torch.sub(bits, c.lo, out=key).clamp_(-1, c.width).add_(1)
    row += torch.bincount(key, minlength=c.width + 2)


def _add_window_cpu(row: torch.Tensor, bits: torch.Tensor, c: Count) -> None:
    """add_window on a CPU: select the values inside the window (a few percent of them) and count
    only those, in numpy (torch's comparisons and masked_select cost ~2x more here). A bincount
    over every value writes width + 2 counters per chunk, which leaves the cache."""
    b = bits.numpy()
    last = c.lo + c.width - 1  # <= 2**31 - 1: compared as int32
    below = int(np.count_nonzero(b < c.lo))
    inside = b[(b >= c.lo) & (b <= last)]
    out = row.numpy()
    np.add.at(out, inside - (c.lo - 1), 1)
    out[0] += below
    out[-1] += b.size - below - inside.size


def compact(counts: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per task, the nonzero columns of a pass's counts and their values: what a shard sends
    back (a window is up to WINDOW_MAX_BINS << 16 columns, nearly all empty)."""
    out = []
    for row in counts:
        idx = np.flatnonzero(row)
        out.append((idx.astype(np.int32), row[idx]))
    return out


def add_compact(counts: list[np.ndarray], parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for row, (idx, values) in zip(counts, parts):
        row[idx] += values


def summed(plan: Plan, shard_parts) -> list[np.ndarray]:
    """One pass's counts over the whole model: the compact parts every shard sent, added up."""
    counts = [np.zeros(c.columns, dtype=np.int64) for c in plan]
    for parts in shard_parts:
        add_compact(counts, parts)
    return counts


def select(run_pass: Callable[[Plan, int], list[np.ndarray]], sample: Sample, total: int, k: np.ndarray) -> np.ndarray:
    """Exact k-th smallest |tau| per task (float32; 0.0 where k <= 0: keep everything).

    run_pass(plan, i) runs pass i over all the data and returns each task's summed counts. A
    task is done after one pass when its sampled window holds its k-th value; otherwise (window
    too wide, or missed) a high-half histogram pass finds the bin of 65536 patterns that holds
    it, and a window on that bin finishes. At most three passes, usually one."""
    out = np.zeros(len(k), dtype=np.float32)
    plan = sample.first_plan(total, k)
    exact = [False] * len(k)  # the window comes from a full histogram: it cannot miss
    passes = 0
    while any(c.kind != "skip" for c in plan):
        counts = run_pass(tuple(plan), passes)
        passes += 1
        for t, c in enumerate(plan):
            if c.kind == "high":
                high_bin = int(np.searchsorted(np.cumsum(counts[t]), k[t], side="left"))
                plan[t], exact[t] = Count("window", high_bin << 16, 1 << 16), True
            elif c.kind == "window":
                rank, below, cum = int(k[t]), int(counts[t][0]), np.cumsum(counts[t][1:-1])
                if below < rank <= below + int(cum[-1]):
                    out[t] = _as_float(c.lo + int(np.searchsorted(cum, rank - below, side="left")))
                    plan[t] = SKIP
                elif exact[t]:
                    raise RuntimeError("TIES thresholds: the data changed between two passes over it")
                else:
                    plan[t] = Count("high")
    return out


def _as_float(pattern: int) -> np.float32:
    return np.array([pattern], dtype=np.int32).view(np.float32)[0]


def exact_thresholds(taus: torch.Tensor, density: float) -> np.ndarray:
    """select() over taus (T, n) held in memory."""
    t, n = taus.shape
    sample = Sample.empty(t)
    for lo, hi in sample_ranges(n):
        sample.add(taus[:, lo:hi])

    def run_pass(plan: Plan, _: int) -> list[np.ndarray]:
        counts = new_counts(plan, taus.device)
        add_counts(counts, taus, plan)
        return [c.cpu().numpy() for c in counts]

    return select(run_pass, sample, n, np.full(t, kth_rank(n, density), dtype=np.int64))
