"""The shard hot path without Ray: NaN/Inf are found by reductions the workers compute anyway
(sum of squares, the TIES histograms' top bins) and still reported in one line naming the
checkpoint and tensor; the float32 block norms match a float64 sum of squares."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import config_for
from safetensors.torch import load_file, save_file

from mergeflow.errors import CheckpointError
from mergeflow.workers import kth_value
from mergeflow.workers.kth_value import nonzero_counts
from mergeflow.workers.methods.ties.thresholds import shard_counts
from mergeflow.workers.reading import tau_sq_sums
from mergeflow.workers.shard import merge_shard
from mergeflow.workflows.plan import make_plan

NAME = "model.layers.1.mlp.up_proj.weight"


def poison(path, index: int, value: float) -> None:
    f = path / "model.safetensors"
    sd = load_file(f)
    t = sd[NAME].clone()
    t.view(-1)[index] = value
    sd[NAME] = t
    save_file(sd, f)


def spec_for(base, tasks, tmp_path, method: dict, chunk: int = 64):
    plan = make_plan(config_for(base, tasks, tmp_path / "out", method, shard_size=10**9, chunk_elems=chunk))
    (spec,) = plan.shards
    return spec


@pytest.mark.parametrize(
    "method",
    [
        {"name": "task_arithmetic"},
        {"name": "tall_masks"},
        {"name": "ties", "scope": "tensor"},
    ],
    ids=["ta", "tall", "ties-tensor"],
)
@pytest.mark.parametrize("where", ["task", "base"])
def test_apply_pass_names_the_nonfinite_input(family, tmp_path, method, where):
    base, tasks = family(tasks=3)
    poison(tasks[1][1] if where == "task" else base, 100, float("nan") if where == "task" else float("-inf"))
    who = "task 'task_01'" if where == "task" else "base"
    with pytest.raises(CheckpointError, match=f"{who}: tensor '{NAME}' contains NaN or Inf"):
        merge_shard(spec_for(base, tasks, tmp_path, method))


@pytest.mark.parametrize(
    "count", [kth_value.Count("high"), kth_value.Count("window", 0x3A000000, 1 << 16)], ids=["high", "window"]
)
def test_ties_threshold_pass_names_the_nonfinite_input(family, tmp_path, count):
    base, tasks = family(tasks=3)
    poison(tasks[2][1], 7, float("inf"))
    with pytest.raises(CheckpointError, match=f"task 'task_02': tensor '{NAME}' contains NaN or Inf"):
        shard_counts(spec_for(base, tasks, tmp_path, {"name": "ties"}), (kth_value.SKIP, kth_value.SKIP, count))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_zeros_pass_in_the_stored_dtype_counts_what_float32_subtraction_gives(family, tmp_path, dtype):
    """The zeros-only pass compares stored bit patterns instead of subtracting in float32: the
    counts must be the same, +0.0 against -0.0 included (equal values, tau 0), and x against -x
    (bits that also differ in the sign alone, tau 2x)."""
    base, tasks = family(tasks=3, dtype=dtype)
    sd = load_file(base / "model.safetensors")
    for i, (_, path) in enumerate(tasks):  # sparse task vectors: most entries equal to the base
        td = load_file(path / "model.safetensors")
        for name, t in td.items():
            if t.is_floating_point():
                keep = torch.rand(t.shape, generator=torch.Generator().manual_seed(i)) < 0.8
                td[name] = torch.where(keep, sd[name], t)
        td[NAME].view(-1)[:5] = 0.0
        if i == 2:  # in tensors where the base has no signed zero, so the bit-pattern path counts them
            for name, t in td.items():
                if t.is_floating_point() and name != NAME:
                    t.view(-1)[:4] = -sd[name].view(-1)[:4]
        save_file(td, path / "model.safetensors")
    sd[NAME].view(-1)[:5] = -0.0
    save_file(sd, base / "model.safetensors")

    zeros = kth_value.Count("window", 0, 1)
    got = shard_counts(spec_for(base, tasks, tmp_path, {"name": "ties"}), (zeros, kth_value.SKIP, zeros))
    sd = load_file(base / "model.safetensors")
    for t, (_, path) in enumerate(tasks):
        if t == 1:
            assert got[t][0].size == 0  # skipped: nothing counted
            continue
        td = load_file(path / "model.safetensors")
        want = sum(int(((td[n].float() - sd[n].float()) == 0).sum()) for n in sd if sd[n].is_floating_point())
        total = sum(sd[n].numel() for n in sd if sd[n].is_floating_point())
        assert dict(zip(got[t][0].tolist(), got[t][1].tolist())) == {1: want, 2: total - want}


def test_finite_inputs_whose_difference_overflows_are_not_an_input_error(family, tmp_path):
    """3e38 - (-3e38) is Inf in float32 although both inputs are finite: as before, no error."""
    base, tasks = family(tasks=2, dtype=torch.float32)
    poison(base, 3, -3e38)
    poison(tasks[0][1], 3, 3e38)
    spec = spec_for(base, tasks, tmp_path, {"name": "task_arithmetic"})
    result = merge_shard(spec)
    layer = result.layers["model.layers.1"]
    assert np.isinf(layer.tau_sq[0]) and np.isfinite(layer.tau_sq[1])
    _ = shard_counts(dataclasses.replace(spec, output=str(tmp_path / "out2")), (kth_value.Count("high"),) * 2)


@pytest.mark.parametrize("n", [1, 1000, 1024, 5 * 1024 + 17, 300_000])
def test_tau_sq_sums_match_float64(n):
    gen = torch.Generator().manual_seed(n)
    u = torch.rand(4, n, generator=gen) - 0.5
    taus = -torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.4999)) * 1e-3  # Laplace: heavy tails
    taus[1] *= 1e-9  # tiny and huge magnitudes both stay accurate (squares inside float32 range)
    taus[2] *= 1e15
    want = (taus.double() ** 2).sum(dim=1)
    got = tau_sq_sums(taus)
    assert torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)
    taus[3, n // 2] = float("nan")
    assert tau_sq_sums(taus) is None


def test_nonzero_counts_match_count_nonzero():
    gen = torch.Generator().manual_seed(3)
    taus = torch.randn(3, 5000, generator=gen) * (torch.rand(3, 5000, generator=gen) < 0.2)
    taus[0, :7] = -0.0  # zeros of either sign are zeros
    taus[1, :4] = torch.tensor([1e-45, -1e-45, 3e38, -3e38])  # the smallest and largest magnitudes count
    assert nonzero_counts(taus).tolist() == torch.count_nonzero(taus, dim=1).tolist()
