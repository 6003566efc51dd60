"""LOT's closed-form solutions (workers/methods/lot/solve.py) on the reference cases of ALGORITHMS.md, and
against brute-force least squares on random features.

The spec writes linear layers in the paper's layout Y = X W (W is in x out); the code uses torch's
W (out x in), y = x W^T, so the reference task vectors are transposed going in and coming out."""

import pytest
import torch

from mergeflow.workers.methods.lot import solve

X1 = torch.tensor([[1.0, 0, 1], [0, 1, 0]], dtype=torch.float64)
X2 = torch.tensor([[1.0, 1, 0], [0, 0, 2]], dtype=torch.float64)
T1 = torch.tensor([[0.5, -0.2], [0.1, 0.3], [0.0, 0.4]])  # paper layout (in x out)
T2 = torch.tensor([[-0.3, 0.1], [0.2, 0.0], [0.6, -0.5]])
F32 = 1e-7  # task vectors are float32, as in a merge; the solve itself runs in float64


def gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x


def test_linear_full_rank_reference():
    delta = solve.linear_delta([T1.T, T2.T], [gram(X1), gram(X2)])
    expected = torch.tensor([[-9 / 65, 23 / 65], [9 / 130, 3 / 130], [79 / 130, -28 / 65]], dtype=torch.float64)
    torch.testing.assert_close(delta.T, expected, rtol=0, atol=F32)


def test_linear_rank_deficient_reference_keeps_base_in_the_null_space():
    x1, x2 = torch.tensor([[1.0, 0, 1]], dtype=torch.float64), torch.tensor([[1.0, 1, 0]], dtype=torch.float64)
    delta = solve.linear_delta([T1.T, T2.T], [gram(x1), gram(x2)])
    expected = torch.tensor([[0.133333, 0.1], [-0.233333, 0.0], [0.366667, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(delta.T, expected, rtol=0, atol=1e-6)
    # zero drift: each task's features see exactly its own update
    for x, t in [(x1, T1), (x2, T2)]:
        torch.testing.assert_close(x @ delta.T, x @ t.double(), rtol=0, atol=F32)
    # (1, -1, -1) spans the null space of G1 + G2: the solution has no component there
    null = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(delta @ null, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_norm_scale_reference():
    xh1 = torch.tensor([[1.0, 0, -1], [0.5, -1, 0.5]])
    xh2 = torch.tensor([[0.0, 2, 1], [1, 1, 0]])
    energies = torch.stack([(xh1**2).sum(0), (xh2**2).sum(0)])
    deltas = torch.tensor([[0.2, -0.1, 0.0], [-0.2, 0.3, 0.1]])
    out = solve.norm_scale_delta(deltas, energies)
    torch.testing.assert_close(out, torch.tensor([1 / 45, 7 / 30, 2 / 45], dtype=torch.float64), rtol=0, atol=F32)
    # a channel no task's normalised input reaches keeps the base value
    zero = solve.norm_scale_delta(deltas, torch.zeros_like(energies))
    assert torch.equal(zero, torch.zeros(3, dtype=torch.float64))


def test_bias_reference_row_weighted_mean():
    deltas = torch.tensor([[0.1, 0.2, -0.3], [0.3, 0.0, 0.1]])
    out = solve.additive_delta(deltas, [2, 2])  # X1 and X2 have two rows each
    torch.testing.assert_close(out, torch.tensor([0.2, 0.1, -0.1], dtype=torch.float64), rtol=0, atol=F32)
    torch.testing.assert_close(
        solve.additive_delta(deltas, [3, 1]), torch.tensor([0.15, 0.15, -0.2], dtype=torch.float64)
    )
    torch.testing.assert_close(solve.mean_delta(deltas), torch.tensor([0.2, 0.1, -0.1], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_linear_equals_brute_force_least_squares(seed):
    """Delta* minimises sum_t ||X_t (W0 + Delta - W_t)^T||^2: stack every task's features and targets
    X_t Delta_t^T and solve the one least-squares problem with torch.linalg.lstsq."""
    gen = torch.Generator().manual_seed(seed)
    t, d_in, d_out = 2 + seed % 3, 5 + seed, 3 + seed % 2
    xs = [
        torch.randn(int(torch.randint(2, 9, (1,), generator=gen)), d_in, generator=gen, dtype=torch.float64)
        for _ in range(t)
    ]
    deltas = [torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for _ in range(t)]
    ours = solve.linear_delta(deltas, [gram(x) for x in xs])
    stacked = torch.cat(xs)
    targets = torch.cat([x @ d.T for x, d in zip(xs, deltas)])
    # gelsd returns the minimum-norm solution, so rank-deficient draws must agree too
    brute = torch.linalg.lstsq(stacked, targets, driver="gelsd").solution.T
    torch.testing.assert_close(ours, brute, rtol=1e-8, atol=1e-8)
    drift = solve.feature_drift(ours, deltas, [gram(x) for x in xs])
    for other in (sum(deltas) / t, sum(deltas), deltas[0]):
        assert drift <= solve.feature_drift(other, deltas, [gram(x) for x in xs]) + 1e-9


def test_row_blocks_give_the_whole_tensor_solution():
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(6, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    deltas = [torch.randn(10, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    grams = [gram(x) for x in xs]
    whole = solve.linear_delta(deltas, grams)
    pinv = solve.gram_pinv(grams)
    blocks = torch.cat([solve.linear_rows([d[lo : lo + 3] for d in deltas], grams, pinv) for lo in range(0, 10, 3)])
    assert torch.equal(blocks, whole)
