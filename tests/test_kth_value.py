"""The k-th smallest |tau| selection is bit-identical to torch.kthvalue, the reference code's
trim, however the data is split into parts (as shards and chunks split it), in one pass where
the sample places the value well, and in more passes where it does not."""

import numpy as np
import pytest
import torch

from mergeflow.workers import kth_value
from mergeflow.workers.kth_value import Count


def select(parts: list[torch.Tensor], density: float, sample: kth_value.Sample | None = None):
    """kth_value.select over parts counted apart, sent compact and added up, as shards are.
    Returns the thresholds and each pass's plan."""
    t = parts[0].shape[0]
    total = sum(p.shape[1] for p in parts)
    if sample is None:
        sample = kth_value.Sample.empty(t)
        for p in parts:
            for lo, hi in kth_value.sample_ranges(p.shape[1], phase=p.shape[1]):
                sample.add(p[:, lo:hi])
    plans = []

    def run_pass(plan, i):
        assert i == len(plans)
        plans.append(plan)
        counts = [np.zeros(c.columns, dtype=np.int64) for c in plan]
        for p in parts:
            part = kth_value.new_counts(plan)
            kth_value.add_counts(part, p, plan)
            kth_value.add_compact(counts, kth_value.compact([c.numpy() for c in part]))
        return counts

    k = np.full(t, kth_value.kth_rank(total, density))
    return kth_value.select(run_pass, sample, total, k), plans


def reference(x: torch.Tensor, density: float) -> np.ndarray:
    k = x.shape[1] - int(x.shape[1] * density)
    return x.abs().kthvalue(k, dim=1).values.numpy() if k > 0 else np.zeros(x.shape[0], np.float32)


def split(x: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    n = x.shape[1]
    cuts = sorted(set(torch.randint(1, n, (4,), generator=gen).tolist()))
    return [x[:, a:b] for a, b in zip([0, *cuts], [*cuts, n])]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9, 1.0])
def test_matches_kthvalue_over_split_data(seed, density):
    gen = torch.Generator().manual_seed(seed)
    n = 5000 + 37 * seed
    x = torch.randn(4, n, generator=gen) * torch.logspace(-6, 1, n).view(1, -1)[:, torch.randperm(n, generator=gen)]
    x[:, :100] = 0.0  # exact zeros and duplicates, as sparse task vectors have
    x[:, 100:200] = x[:, 200:300]
    x[3, : n // 2] = 0.0
    got, _ = select(split(x, gen), density)
    assert np.array_equal(got, reference(x, density))
    assert np.array_equal(kth_value.exact_thresholds(x, density), reference(x, density))


def laplace_rows(n: int, seed: int) -> torch.Tensor:
    """Task-vector-like rows: Laplace values scaled per row of 1024 by a log-normal factor;
    row 1 mostly exact zeros (bf16 fine-tunes), row 2 with zeros just short of the k-th rank."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(3, n, generator=gen) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.4999)) * 1e-3
    x *= torch.exp(0.3 * torch.randn(3, n // 1024 + 1, generator=gen)).repeat_interleave(1024, dim=1)[:, :n]
    x[1, torch.rand(n, generator=gen) < 0.85] = 0.0
    x[2, torch.rand(n, generator=gen) < 0.7] = 0.0
    return x


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_sparse_task_vectors_take_one_pass_dense_ones_two_from_a_sample_of_few_blocks(density):
    x = laplace_rows(1 << 22, seed=1)
    gen = torch.Generator().manual_seed(0)
    got, plans = select(split(x, gen), density)
    assert np.array_equal(got, reference(x, density))
    # 85% zeros: the k-th value is 0 with room to spare, so the one pass counts zeros only
    assert plans[0][1] == Count("window", 0, 1)
    # dense Laplace rows: five parts sampled in one block each leave the k-th value's place too
    # uncertain for a window; they take the histogram, then a window on its bin (never a miss)
    assert plans[0][0] == Count("high") and plans[1][0] == Count("window", plans[1][0].lo, 1 << 16)
    assert len(plans) == 2 and plans[1][1] == kth_value.SKIP


def blocks_sample(x: torch.Tensor, block: int) -> kth_value.Sample:
    """A 1/32 sample of x in blocks of `block` values."""
    sample = kth_value.Sample.empty(x.shape[0])
    for lo in range(0, x.shape[1], block * kth_value.SAMPLE_EVERY):
        sample.add(x[:, lo : lo + block])
    return sample


def test_dense_task_vectors_take_one_pass_from_a_sample_of_many_blocks():
    x = laplace_rows(1 << 22, seed=1)
    many = blocks_sample(x, 512)  # 256 blocks, as a whole model's sample has per task
    got, plans = select(split(x, torch.Generator().manual_seed(0)), 0.5, sample=many)
    assert np.array_equal(got, reference(x, 0.5))
    assert plans[0][0].kind == "window" and 1 << 16 < plans[0][0].width <= kth_value.WINDOW_MAX_BINS << 16
    assert len(plans) == 1
    # the same number of values in two blocks: their rows' scales decide it, so no window is trusted
    few = blocks_sample(x, 1 << 16)
    assert few.blocks == 2 and few.high.sum() == many.high.sum()
    got, plans = select(split(x, torch.Generator().manual_seed(0)), 0.5, sample=few)
    assert np.array_equal(got, reference(x, 0.5))
    assert plans[0][0] == Count("high") and len(plans) == 2


@pytest.mark.parametrize("width_bins", [1, 3, 16])
def test_cpu_window_counts_equal_the_bincount_ones(width_bins):
    """The CPU's select-then-count path and the devices' bincount path give the same counts,
    at the window's edges, below it, above it, and at the largest bit patterns."""
    gen = torch.Generator().manual_seed(width_bins)
    bits = torch.randint(0, 1 << 31, (50_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    lo = 0x3A000000
    edges = torch.tensor(
        [lo - 1, lo, lo + (width_bins << 16) - 1, lo + (width_bins << 16), 2**31 - 1, 0], dtype=torch.int32
    )
    bits = torch.cat(
        [
            bits,
            edges,
            torch.randint(lo, lo + (width_bins << 16), (5000,), generator=gen, dtype=torch.int64).to(torch.int32),
        ]
    )
    for c in (Count("window", lo, width_bins << 16), Count("window", (1 << 31) - (width_bins << 16), width_bins << 16)):
        cpu = torch.zeros(c.columns, dtype=torch.int64)
        kth_value._add_window_cpu(cpu, bits, c)
        kth_value._add_window_cpu(cpu, bits[:1000], c)  # counts add up across chunks
        dev = torch.zeros(c.columns, dtype=torch.int64)
        kth_value.add_window(dev, bits, c, torch.empty_like(bits))
        kth_value.add_window(dev, bits[:1000], c, torch.empty(1000, dtype=torch.int32))
        assert torch.equal(cpu, dev) and int(cpu.sum()) == bits.numel() + 1000
        assert int(cpu[1:-1].sum()) > 0


def test_a_misleading_sample_costs_passes_not_exactness():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 200_000, generator=gen)
    lying = kth_value.Sample.empty(2)
    lying.add(torch.full((2, 100_000), 1e-3))  # a sample of other data: every value 0.001
    got, plans = select(split(x, gen), 0.2, sample=lying)
    assert np.array_equal(got, reference(x, 0.2))
    assert [c.kind for c in plans[0]] == ["window"] * 2  # it believed the sample ...
    assert [c.kind for c in plans[1]] == ["high"] * 2  # ... the window missed, a histogram ...
    assert [c.kind for c in plans[2]] == ["window"] * 2 and all(
        c.width == 1 << 16 for c in plans[2]
    )  # ... then its bin


def test_wide_windows_go_straight_to_the_histogram():
    x = torch.randn(1, 3000) * torch.logspace(-8, 8, 3000)  # 40 octaves: no narrow window exists
    got, plans = select([x], 0.5)
    assert np.array_equal(got, reference(x, 0.5))
    assert [c.kind for c in plans[0]] == ["high"] and len(plans) == 2


def test_density_one_keeps_everything_without_a_pass():
    x = torch.randn(2, 100)
    got, plans = select([x], 1.0)
    assert got.tolist() == [0.0, 0.0] and plans == []


@pytest.mark.parametrize(
    "count",
    [Count("high"), Count("window", 0, 1), Count("window", 0x3A000000, 1 << 16)],
    ids=["high", "zeros", "window"],
)
def test_counting_passes_report_nonfinite_values(count):
    x = torch.randn(2, 5000)
    counts = kth_value.new_counts((count, count))
    assert kth_value.add_counts(counts, x, (count, count)) < kth_value.NONFINITE_HIGH << 16
    x[1, 7] = float("nan")
    assert kth_value.add_counts(counts, x, (count, count)) >= kth_value.NONFINITE_HIGH << 16


def test_sample_reads_one_block_in_32_of_every_tensor():
    for numel in (1, 31, 32, 1000, 65_536 * 32 + 5, 10_000_000):
        ranges = list(kth_value.sample_ranges(numel, phase=numel))
        sampled = sum(hi - lo for lo, hi in ranges)
        assert all(0 <= lo < hi <= numel for lo, hi in ranges)
        assert sampled <= max(1, numel // 32) + kth_value.SAMPLE_BLOCK  # tensors under 32 values may give none
        if numel >= 32 * 32:
            assert abs(sampled - numel / 32) <= numel / 32 * 0.05 + 1
