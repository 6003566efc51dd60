"""Histogram selection is bit-identical to torch.kthvalue, the reference code's trim, even
when the data is split into arbitrary parts (as shards and chunks split it)."""

import numpy as np
import pytest
import torch

from workers import kth_value


def select(parts: list[torch.Tensor], density: float) -> np.ndarray:
    t = parts[0].shape[0]
    high = sum(kth_value.high_histogram(p) for p in parts)
    total = sum(p.shape[1] for p in parts)
    k = np.full(t, kth_value.kth_rank(total, density))
    bins, within = kth_value.locate(high, k)
    low = sum(kth_value.low_histogram(p, bins) for p in parts)
    return kth_value.thresholds_from(bins, low, within)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9])
def test_matches_kthvalue_over_split_data(seed, density):
    gen = torch.Generator().manual_seed(seed)
    n = 5000 + 37 * seed
    x = torch.randn(4, n, generator=gen) * torch.logspace(-6, 1, n).view(1, -1)[:, torch.randperm(n, generator=gen)]
    x[:, :100] = 0.0  # exact zeros and duplicates, as sparse task vectors have
    x[:, 100:200] = x[:, 200:300]
    cuts = sorted(torch.randint(1, n, (3,), generator=gen).tolist())
    parts = [x[:, a:b] for a, b in zip([0, *cuts], [*cuts, n]) if b > a]
    got = select(parts, density)
    k = n - int(n * density)
    want = x.abs().kthvalue(k, dim=1).values.numpy()
    assert np.array_equal(got, want)


def test_density_one_keeps_everything():
    x = torch.randn(2, 100)
    assert select([x], 1.0).tolist() == [0.0, 0.0]
