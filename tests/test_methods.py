"""The worker-side chunk methods on the reference cases of the method spec (docs/methods.md).

These go through the same functions the Ray workers call, with TIES thresholds from
the histogram selection in workers/kth_value.py, not from torch.kthvalue."""

import numpy as np
import pytest
import torch
from kernels import kernel

from mergeflow.workers import kth_value
from mergeflow.workers.bits import pack_rows, pack_rows_torch, unpack

THETA0 = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.5])
TAUS = torch.tensor(
    [
        [0.5, 0.45, 0.1, 0.8, 0.0, -0.3],
        [-0.5, 0.4, 0.1, -0.15, 0.0, -0.35],
        [0.45, -0.3, 0.5, -0.05, 0.0, 0.2],
    ]
)


def thresholds(taus: torch.Tensor, density: float) -> torch.Tensor:
    return torch.from_numpy(kth_value.exact_thresholds(taus, density))


def run(name: str, **kw):
    kw.setdefault("alpha", 1.0)
    if name in ("tall_masks", "consensus"):
        kw["lambdas"] = (0.5, 0.5, 0.5)
    ties = name == "ties" or kw.get("base_merge") == "ties"
    return kernel(name, TAUS, thresholds=thresholds(TAUS, kw.get("density", 0.2)) if ties else None, **kw)


def test_task_arithmetic_sum_and_scaled_model():
    params, out = run("task_arithmetic", alpha=0.3)
    torch.testing.assert_close(out.delta, torch.tensor([0.45, 0.55, 0.7, 0.6, 0.0, -0.45]))
    torch.testing.assert_close(
        THETA0 + params.alpha * out.delta, torch.tensor([1.135, -0.835, 0.71, 0.18, 2.0, -0.635])
    )


def test_ties_trim_keeps_four_of_six_per_task():
    thr = thresholds(TAUS, 0.5)
    assert ((TAUS.abs() >= thr[:, None]).sum(dim=1) == 4).all()
    # identical to torch.kthvalue over the flattened vector, the reference code's rule
    for t in range(3):
        assert thr[t] == TAUS[t].abs().kthvalue(6 - int(6 * 0.5)).values


@pytest.mark.parametrize(
    "merge,expected", [("mean", [0.475, 0.425, 0.5, 0.8, 0, -0.325]), ("sum", [0.95, 0.85, 0.5, 0.8, 0, -0.65])]
)
def test_ties_reference(merge, expected):
    _, out = run("ties", density=0.5, merge=merge)
    torch.testing.assert_close(out.delta, torch.tensor(expected))
    assert out.ambiguous == 0


def test_tall_masks_reference_masks_packing_and_rebuild():
    _, out = run("tall_masks")
    expected = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(out.masks, expected)
    assert pack_rows(out.masks)[:, 0].tolist() == [212, 196, 160]
    assert out.masks.sum(dim=0).tolist() == [3, 2, 1, 1, 0, 2]
    rebuilt = [THETA0 + torch.where(unpack(pack_rows(out.masks)[t], 6), out.tau_mtl, 0.0) for t in range(3)]
    torch.testing.assert_close(rebuilt[0], torch.tensor([1.45, -0.45, 0.5, 0.6, 2.0, -0.95]))
    torch.testing.assert_close(rebuilt[1], torch.tensor([1.45, -0.45, 0.5, 0.0, 2.0, -0.95]))
    torch.testing.assert_close(rebuilt[2], torch.tensor([1.45, -1.0, 1.2, 0.0, 2.0, -0.5]))


def test_consensus_reference_and_limits():
    _, out = run("consensus", k=2)
    torch.testing.assert_close(out.delta, torch.tensor([0.45, 0.55, 0, 0, 0, -0.45]))
    torch.testing.assert_close(THETA0 + out.delta, torch.tensor([1.45, -0.45, 0.5, 0.0, 2.0, -0.95]))
    _, k0 = run("consensus", k=0)
    torch.testing.assert_close(k0.delta, TAUS.sum(dim=0))  # k = 0 is Task Arithmetic
    _, k4 = run("consensus", k=4)
    assert torch.count_nonzero(k4.delta) == 0  # k > T is the base model


def test_ties_sign_tie_uses_majority_and_is_reported():
    taus = torch.tensor([[0.5, 0.3, 0.2], [-0.5, 0.1, 0.4]])
    _, out = kernel("ties", taus, thresholds=torch.zeros(2), majority=-1, alpha=1.0, density=1.0, merge="sum")
    assert out.ambiguous == 1 and out.sign_sum == 2
    assert out.delta.tolist()[0] == -0.5  # the tie at coordinate 0 follows the majority sign given


def test_pack_rows_matches_numpy_packbits_on_odd_lengths():
    gen = torch.Generator().manual_seed(1)
    for n in [1, 7, 8, 9, 61]:
        m = torch.rand(3, n, generator=gen) > 0.5
        packed = pack_rows(m)
        assert torch.equal(pack_rows_torch(m), packed)  # the accelerator path, run here on the CPU
        for t in range(3):
            assert packed[t].numpy().tolist() == np.packbits(m[t].numpy()).tolist()
            assert torch.equal(unpack(packed[t], n), m[t])


def _whole_tensor_ties(taus, thresholds, majority, merge):
    """The whole-tensor TIES formulas the row-wise worker code must match bit for bit."""
    zero = torch.zeros(())
    trimmed = torch.where(taus.abs() >= thresholds[:, None], taus, zero)
    summed = trimmed[0].clone()
    for t in range(1, len(trimmed)):
        summed += trimmed[t]
    raw = torch.sign(summed)
    signs = torch.where(raw == 0, torch.full_like(raw, float(majority)), raw)
    keep = (torch.sign(trimmed) == signs[None, :]) & (trimmed != 0)
    selected = torch.where(keep, trimmed, zero)
    total = selected[0].clone()
    for t in range(1, len(selected)):
        total += selected[t]
    merged = total if merge == "sum" else total / torch.clamp(keep.sum(dim=0).to(total.dtype), min=1)
    ambiguous = int(((raw == 0) & (trimmed != 0).any(dim=0)).sum())  # ties the majority sign decides
    return merged, int(raw.sum()), ambiguous


@pytest.mark.parametrize("merge", ["sum", "mean"])
@pytest.mark.parametrize("majority", [1, -1, 0])
def test_row_wise_ties_and_consensus_match_whole_tensor_formulas_bit_for_bit(merge, majority):
    gen = torch.Generator().manual_seed(7)
    taus = torch.randn(5, 4001, generator=gen)
    taus[:, ::3] = 0.0
    taus[:, 1::7] = -0.0  # zero signs must come out as the whole-tensor formulas give them
    taus[1:3, 5::11] = -taus[0, 5::11]  # exact cancellations: elected sign 0, majority fallback
    thresholds = torch.tensor([0.5, 0.0, 1.0, 0.2, 3.0])
    _, out = kernel("ties", taus, thresholds=thresholds, majority=majority, alpha=1.0, merge=merge)
    want, sign_sum, ambiguous = _whole_tensor_ties(taus, thresholds, majority, merge)
    assert torch.equal(out.delta.view(torch.int32), want.view(torch.int32))
    assert (out.sign_sum, out.ambiguous) == (sign_sum, ambiguous) and ambiguous > 0

    lambdas = (0.3, 0.5, 0.0, 1.0, 0.7)
    _, out = kernel("consensus", taus, lambdas=lambdas, alpha=1.0, k=2)
    tau_mtl = out.tau_mtl  # the running sum, checked by test_task_arithmetic_sum_and_scaled_model
    masks = taus.abs() > torch.tensor(lambdas)[:, None] * (tau_mtl[None, :] - taus).abs()
    assert torch.equal(out.masks, masks)
    cons = torch.where(masks.sum(dim=0) >= 2, tau_mtl, torch.zeros(()))
    assert torch.equal(out.delta.view(torch.int32), cons.view(torch.int32))
