"""Checks tests/reference_impl.py against the reference cases of the merge-method spec (docs/methods.md)."""

import numpy as np
import pytest
import torch

try:  # works whether or not tests/ becomes a package
    from . import reference_impl as ref
except ImportError:
    import reference_impl as ref

ATOL = 1e-6

THETA0 = [1.0, -1.0, 0.5, 0.0, 2.0, -0.5]
TAUS = [
    [0.5, 0.45, 0.1, 0.8, 0.0, -0.3],
    [-0.5, 0.4, 0.1, -0.15, 0.0, -0.35],
    [0.45, -0.3, 0.5, -0.05, 0.0, 0.2],
]
NAMES = ["w"]


def f32(values):
    return torch.tensor(values, dtype=torch.float32)


def close(actual, expected):
    torch.testing.assert_close(actual, f32(expected), atol=ATOL, rtol=0)


@pytest.fixture
def taus():
    return [f32(t) for t in TAUS]


@pytest.fixture
def base():
    # The int tensor checks that non-float tensors are skipped and copied through unchanged.
    return {"w": f32(THETA0), "step": torch.tensor([7], dtype=torch.int64)}


@pytest.fixture
def tasks(base):
    return [{"w": base["w"] + f32(t), "step": torch.tensor([t_i], dtype=torch.int64)} for t_i, t in enumerate(TAUS)]


def test_task_vectors_and_flatten_roundtrip(base, tasks):
    tvs = ref.task_vectors(base, tasks)
    assert all(set(tv) == {"w"} for tv in tvs)
    for tv, expected in zip(tvs, TAUS):
        assert tv["w"].dtype == torch.float32
        close(tv["w"], expected)
    sd = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": f32([1.0, 2.0])}
    vec = ref.flatten(sd, ["b", "a"])
    close(vec, [1.0, 2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # sorted-name order: "a" first
    back = ref.unflatten(vec, sd, ["a", "b"])
    assert back["b"].shape == (2, 3)
    torch.testing.assert_close(back["b"], sd["b"].float())


def test_task_arithmetic(base, tasks, taus):
    close(torch.stack(taus).sum(0), [0.45, 0.55, 0.7, 0.6, 0.0, -0.45])
    out = ref.merge(base, tasks, "task_arithmetic", alpha=0.3)
    close(out["model"]["w"], [1.135, -0.835, 0.71, 0.18, 2.0, -0.635])
    assert torch.equal(out["model"]["step"], base["step"])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("mean", [0.475, 0.425, 0.5, 0.8, 0.0, -0.325]),
        ("sum", [0.95, 0.85, 0.5, 0.8, 0.0, -0.65]),
    ],
)
def test_ties(base, tasks, taus, mode, expected):
    close(ref.ties_merge(taus, 0.5, "global", mode, None), expected)
    close(ref.ties_merge(taus, 0.5, "tensor", mode, [6]), expected)
    out = ref.merge(base, tasks, "ties", alpha=1.0, density=0.5, merge=mode)
    close(out["model"]["w"], [a + b for a, b in zip(THETA0, expected)])


def test_ties_reference_trim_keeps_int_p_density_plus_one(taus):
    # density 0.5 on P = 6 keeps 4 entries per task (no ties among the nonzero |tau|).
    kept = [ref._trim(t, 0.5) for t in taus]
    assert [int((k != 0).sum()) for k in kept] == [4, 4, 4]
    assert torch.equal(ref._trim(taus[0], 1.0), taus[0])


def test_ties_tensor_scope_single_segment_equals_global():
    gen = torch.Generator().manual_seed(0)
    taus = [torch.randn(97, generator=gen) for _ in range(4)]
    for density in (0.1, 0.2, 0.5, 1.0):
        for mode in ("mean", "sum"):
            assert torch.equal(
                ref.ties_merge(taus, density, "tensor", mode, [97]), ref.ties_merge(taus, density, "global", mode, None)
            )


def test_ties_tensor_scope_trims_per_segment():
    # density 0.34: global keeps int(6*0.34)+1 = 3 entries (all from the big segment);
    # per tensor keeps int(3*0.34)+1 = 2 entries of each segment.
    tau = f32([10.0, 20.0, 30.0, 0.1, 0.2, 0.3])
    glob = ref.ties_merge([tau], 0.34, "global", "sum", None)
    per = ref.ties_merge([tau], 0.34, "tensor", "sum", [3, 3])
    close(glob, [10.0, 20.0, 30.0, 0.0, 0.0, 0.0])
    close(per, [0.0, 20.0, 30.0, 0.0, 0.2, 0.3])


EXPECTED_MASKS = [[1, 1, 0, 1, 0, 1], [1, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 0]]
EXPECTED_REBUILT = [
    [1.45, -0.45, 0.5, 0.6, 2.0, -0.95],
    [1.45, -0.45, 0.5, 0.0, 2.0, -0.95],
    [1.45, -1.0, 1.2, 0.0, 2.0, -0.5],
]


def test_tall_masks_packbits_counts_rebuild(base, taus):
    tau_mtl = torch.stack(taus).sum(0)
    masks = ref.tall_masks(taus, tau_mtl, [0.5, 0.5, 0.5])
    for m, expected in zip(masks, EXPECTED_MASKS):
        assert m.dtype == torch.bool
        assert m.tolist() == [bool(x) for x in expected]

    packed = [ref.packbits(m) for m in masks]
    assert [p.dtype for p in packed] == [np.uint8] * 3
    assert [p.tolist() for p in packed] == [[212], [196], [160]]
    for p, m in zip(packed, masks):
        assert torch.equal(ref.unpackbits(p, 6), m)

    assert torch.stack(masks).sum(0).tolist() == [3, 2, 1, 1, 0, 2]

    for m, expected in zip(masks, EXPECTED_REBUILT):
        rebuilt = ref.rebuild(base, tau_mtl, m, NAMES)
        close(rebuilt["w"], expected)
        assert torch.equal(rebuilt["step"], base["step"])


def test_tall_masks_via_merge(base, tasks):
    out = ref.merge(base, tasks, "tall_masks", alpha=0.3, lambdas=0.5)
    close(out["tau_mtl"], [0.45, 0.55, 0.7, 0.6, 0.0, -0.45])
    assert [m.int().tolist() for m in out["masks"]] == EXPECTED_MASKS
    close(out["model"]["w"], [1.135, -0.835, 0.71, 0.18, 2.0, -0.635])
    per_task = ref.merge(base, tasks, "tall_masks", alpha=0.3, lambdas={0: 0.5, 1: 0.5, 2: 0.5})
    assert [m.int().tolist() for m in per_task["masks"]] == EXPECTED_MASKS


def test_tall_masks_ties_base(base, tasks):
    out = ref.merge(base, tasks, "tall_masks", alpha=1.0, lambdas=[0.5] * 3, base_merge="ties", density=0.5)
    close(out["tau_mtl"], [0.95, 0.85, 0.5, 0.8, 0.0, -0.65])


def test_consensus(base, tasks, taus):
    tau_mtl = torch.stack(taus).sum(0)
    masks = ref.tall_masks(taus, tau_mtl, [0.5] * 3)
    close(ref.consensus(masks, tau_mtl, 2), [0.45, 0.55, 0.0, 0.0, 0.0, -0.45])
    close(ref.consensus(masks, tau_mtl, 0), tau_mtl.tolist())  # k = 0: TA back
    close(ref.consensus(masks, tau_mtl, 4), [0.0] * 6)  # k > T: base model

    out = ref.merge(base, tasks, "consensus", alpha=1.0, lambdas=[0.5] * 3, k=2)
    close(out["model"]["w"], [1.45, -0.45, 0.5, 0.0, 2.0, -0.95])
    assert [m.int().tolist() for m in out["masks"]] == EXPECTED_MASKS
    assert torch.equal(out["model"]["step"], base["step"])


def test_merged_state_dict_casts_back_to_base_dtype():
    base = {"w": f32(THETA0).to(torch.bfloat16)}
    delta = f32(TAUS[0])
    out = ref.merged_state_dict(base, delta, NAMES, 0.3)
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], (base["w"].float() + 0.3 * delta).to(torch.bfloat16))


def test_ties_zero_sign_falls_back_to_majority_sign():
    # Coordinate 0 sums to 0; the majority of elected signs is negative, so only -1 survives there.
    taus = [f32([1.0, -2.0, -3.0]), f32([-1.0, 0.0, 0.0])]
    close(ref.ties_merge(taus, 1.0, "global", "mean", None), [-1.0, -2.0, -3.0])
    close(ref.ties_merge(taus, 1.0, "global", "sum", None), [-1.0, -2.0, -3.0])
