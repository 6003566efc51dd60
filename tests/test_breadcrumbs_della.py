"""Model Breadcrumbs (`breadcrumbs`, `breadcrumbs_ties`) and DELLA (`della`, `della_linear`): the
sharded Ray merge against independent float64 references written from the spec, for fp32 and bf16,
many shards and one (identical bytes between the two), and what is specific to each: the kept rank
window and its tie order, mergekit's empty-slice bug avoided, scalars and short tensors, DELLA's
rank-based keep probabilities and its rescale, statistically.

Tolerance as in test_dare.py: masks exact, values within (T + 3) * 2^-24 * sum_t |x_t| per element
(either sign where the election is a tie within float32 rounding), the model the engine's formula
on the written delta bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_dare import check_against_reference, float_tensors, merge_layout, ref_merge, ref_uniform, task_vectors

from mergeflow.errors import ConfigError
from mergeflow.workers.methods import _sparsify as sp
from mergeflow.workers.methods import get_method
from mergeflow.workers.methods.breadcrumbs import breadcrumbs_rows
from mergeflow.workers.methods.della import della_rows, keep_probabilities
from mergeflow.workflows.config import config_from_dict

# ----------------------------------------------------------------------------- references


def desc_order(mag: np.ndarray) -> np.ndarray:
    """Indices by decreasing magnitude, ties by index (lower first)."""
    return np.lexsort((np.arange(mag.size), -mag))


def ref_breadcrumbs(density: float, gamma: float, scope: str, shapes: dict):
    def sparsify(name, t, tau):
        shape = shapes[name]
        if len(shape) == 0:
            return tau.copy()
        out = np.zeros_like(tau)
        if scope == "tensor":  # mergekit's magnitude_outliers, without its n_top = 0 slice
            n = tau.size
            target, n_top = int(density * n), int(gamma * n)
            n_bot = n - target - n_top
            if n_bot < 0:
                n_top, n_bot = n_top + n_bot, 0
            ascending = desc_order(np.abs(tau))[::-1]
            kept = ascending[n_bot : n - n_top]
            out[kept] = tau[kept]
            return out
        c = shape[-1]  # official TaskVectorMiddleKeep: remove the top int(c gamma), keep the next int(c beta)
        n_rm, n_keep = int(c * gamma), int(c * density)
        for lo in range(0, tau.size, c):
            row = tau[lo : lo + c]
            kept = desc_order(np.abs(row))[n_rm : n_rm + n_keep]
            out[lo + kept] = row[kept]
        return out

    return sparsify


def ref_della(density: float, epsilon: float, rescale: str, seed: int, shapes: dict):
    def sparsify(name, t, tau):
        if density >= 1.0:
            return tau.copy()
        c = shapes[name][-1] if shapes[name] else 1
        u = ref_uniform(seed, t, name, tau.size)
        p = np.empty_like(tau)
        for lo in range(0, tau.size, c):
            ascending_rank = np.empty(c)
            ascending_rank[desc_order(np.abs(tau[lo : lo + c]))[::-1]] = np.arange(c)
            rel = ascending_rank / (c - 1) if c > 1 else np.full(c, 0.5)
            p[lo : lo + c] = (density - epsilon) + rel * (2 * epsilon)
        keep = u < p
        x = np.where(keep, tau, 0.0)
        if rescale == "inverse":
            return np.where(keep, tau / p, 0.0)
        if rescale == "l1":
            before, after = np.abs(tau).sum(), np.abs(x).sum()
            if before >= 1e-7 and after >= 1e-7:
                x = x * (before / after)
        return x

    return sparsify


def shapes_of(base_dir) -> dict:
    return {n: tuple(t.shape) for n, t in float_tensors(base_dir).items()}


def reference_for(method: dict, shapes: dict):
    p = get_method(method["name"]).Params(**{k: v for k, v in method.items() if k != "name"})
    if method["name"].startswith("breadcrumbs"):
        return ref_breadcrumbs(p.density, p.gamma, p.scope, shapes)
    return ref_della(p.density, p.epsilon, p.rescale, p.seed, shapes)


# ----------------------------------------------------------------------------- the sharded merge

CASES = [
    {"name": "breadcrumbs", "alpha": 0.5, "density": 0.3, "gamma": 0.1},
    {"name": "breadcrumbs", "density": 0.2, "gamma": 0.05, "scope": "tensor"},
    {"name": "breadcrumbs_ties", "density": 0.4, "gamma": 0.1},
    {"name": "breadcrumbs_ties", "density": 0.3, "gamma": 0.02, "scope": "tensor", "merge": "mean"},
    {"name": "della", "density": 0.6, "epsilon": 0.2, "seed": 4},
    {"name": "della", "density": 0.5, "rescale": "l1", "merge": "sum"},
    {"name": "della_linear", "density": 0.5, "epsilon": 0.1},
    {"name": "della_linear", "rescale": "none", "seed": 9},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", CASES, ids=[f"{c['name']}-{i}" for i, c in enumerate(CASES)])
def test_equals_reference(ray_session, family, tmp_path, method, dtype):
    n_tasks = 4
    base_dir, task_dirs = family(tasks=n_tasks, dtype=dtype, seed=7, shards=2 if dtype == torch.float32 else 1)
    base, taus = task_vectors(base_dir, task_dirs)
    consensus = method["name"] in ("breadcrumbs_ties", "della")
    merge = method.get("merge", "mean" if method["name"] == "della" else "sum")
    reference = ref_merge(taus, reference_for(method, shapes_of(base_dir)), consensus, merge)
    runs = {}
    for layout in ("many", "one"):
        cfg, model, delta = merge_layout(base_dir, task_dirs, tmp_path / layout, method, layout)
        check_against_reference(cfg, base, model, delta, reference, n_tasks)
        runs[layout] = delta
    assert all(torch.equal(runs["many"][n], runs["one"][n]) for n in reference[0])


def test_defaults():
    def params(name, **kw):
        return get_method(name).Params(**kw)

    b = params("breadcrumbs")
    assert (b.alpha, b.density, b.gamma, b.scope) == (0.2, 0.15, 0.006, "row")  # the official search's start
    assert params("breadcrumbs_ties").alpha == 0.2 and params("breadcrumbs_ties", merge="mean").alpha == 1.0
    d = params("della")
    assert (d.alpha, d.density, d.epsilon, d.rescale, d.merge) == (1.0, 0.7, 0.15, "inverse", "mean")
    assert params("della", merge="sum").alpha == 0.3 and params("della_linear").alpha == 0.3


def write_checkpoint(path, tensors: dict) -> None:
    path.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, path / "model.safetensors")


def test_scalars_and_short_tensors(ray_session, tmp_path):
    """A 0-D tensor (Breadcrumbs keeps it, DELLA treats it as a row of one), a 1-D tensor of 7 (one
    row; at tensor scope fewer than 1/gamma entries, which mergekit zeroes) and a 2-D one."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (6, 8), "b.bias": (7,), "c.scale": ()}
    base = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    write_checkpoint(tmp_path / "base", base)
    tasks = []
    for k in range(3):
        write_checkpoint(
            tmp_path / f"t{k}", {n: b + 0.1 * torch.randn(b.shape, generator=gen) for n, b in base.items()}
        )
        tasks.append((f"t{k}", tmp_path / f"t{k}"))
    _, taus = task_vectors(tmp_path / "base", tasks)
    for i, method in enumerate(
        [
            {"name": "breadcrumbs", "density": 0.5, "gamma": 0.01, "scope": "tensor"},
            {"name": "breadcrumbs_ties", "density": 0.5, "gamma": 0.2},
            {"name": "della", "density": 0.5, "epsilon": 0.2, "seed": 1},
            {"name": "della_linear", "density": 0.4, "epsilon": 0.1, "rescale": "l1"},
        ]
    ):
        consensus = method["name"] in ("breadcrumbs_ties", "della")
        merge = "mean" if method["name"] == "della" else "sum"
        reference = ref_merge(taus, reference_for(method, shapes), consensus, merge)
        cfg, model, delta = merge_layout(tmp_path / "base", tasks, tmp_path / f"run{i}", method, "one")
        check_against_reference(cfg, base, model, delta, reference, 3)
        if method["name"] == "breadcrumbs":  # at tensor scope too: int(7 * 0.5) = 3 kept per task, not 0
            assert 0 < torch.count_nonzero(delta["b.bias"]) <= 3 * 3
            assert delta["c.scale"].shape == () and float(delta["c.scale"]) != 0.0  # kept as it is


# ----------------------------------------------------------------------------- Breadcrumbs specifics


def bc(taus, width, **kw):
    return breadcrumbs_rows(taus, width, get_method("breadcrumbs").Params(**kw))


def test_breadcrumbs_keeps_the_window_below_the_top():
    row = torch.tensor([[0.5, -9.0, 3.0, -0.1, 7.0, 2.0, -4.0, 0.0, 1.0, 6.0]])
    # c = 10: remove int(10 * 0.1) = 1 (the -9), keep the next int(10 * 0.3) = 3 (7, 6, -4)
    want = torch.tensor([[0.0, 0.0, 0.0, 0.0, 7.0, 0.0, -4.0, 0.0, 0.0, 6.0]])
    assert torch.equal(bc(row, 10, density=0.3, gamma=0.1), want)
    # rows are ranked one by one: two rows of 5 keep int(5 * 0.4) = 2 each, none removed
    two = torch.tensor([[1.0, 5.0, 2.0, 4.0, 3.0, 10.0, 50.0, 20.0, 40.0, 30.0]])
    want = torch.tensor([[0.0, 5.0, 0.0, 4.0, 0.0, 0.0, 50.0, 0.0, 40.0, 0.0]])
    assert torch.equal(bc(two, 5, density=0.4, gamma=0.1), want)


def test_breadcrumbs_ties_go_by_index():
    row = torch.tensor([[2.0, -2.0, 2.0, 2.0, -2.0, 2.0]])
    # all equal magnitudes: rank = index; remove int(6 * 0.2) = 1, keep int(6 * 0.5) = 3
    assert torch.equal(bc(row, 6, density=0.5, gamma=0.2), torch.tensor([[0.0, -2.0, 2.0, 2.0, 0.0, 0.0]]))


def test_breadcrumbs_tensor_scope_never_zeroes_a_small_tensor():
    """mergekit keeps indices[n_bot:-n_top]: with n_top = int(gamma N) = 0 that slice is empty."""
    x = torch.arange(1.0, 51.0).unsqueeze(0)  # N = 50 < 1 / 0.01
    got = bc(x, 50, density=0.2, gamma=0.01, scope="tensor")
    assert torch.equal(got.nonzero()[:, 1], torch.arange(40, 50))  # the top int(50 * 0.2) = 10, none removed
    # N gamma >= 1: the top int(N gamma) go, and mergekit lowers the removal to keep int(N density)
    assert torch.equal(bc(x, 50, density=0.2, gamma=0.1, scope="tensor").nonzero()[:, 1], torch.arange(35, 45))
    assert torch.equal(bc(x, 50, density=0.9, gamma=0.2, scope="tensor").nonzero()[:, 1], torch.arange(0, 45))
    assert torch.equal(bc(x, 50, density=1.0, gamma=0.2, scope="tensor"), x)  # density 1: unchanged


# ----------------------------------------------------------------------------- DELLA specifics


def della_params(**kw):
    return get_method("della").Params(**kw)


def test_della_keep_probabilities_rise_with_rank():
    p = della_params(density=0.5, epsilon=0.2)
    row = torch.tensor([[3.0, -1.0, 2.0, 0.0, 5.0]])  # increasing |x|: 0, -1, 2, 3, 5

    def expected(ascending_ranks, n):
        return torch.tensor([ascending_ranks], dtype=torch.float64) / (n - 1) * (2 * 0.2) + (0.5 - 0.2)

    assert torch.equal(keep_probabilities(row, 5, p), expected([3, 1, 2, 0, 4], 5))
    assert torch.allclose(keep_probabilities(row, 5, p), torch.tensor([[0.6, 0.4, 0.5, 0.3, 0.7]], dtype=torch.float64))
    ties = keep_probabilities(torch.tensor([[1.0, 1.0, 1.0]]), 3, p)  # equal: the lower index ranks higher
    assert torch.equal(ties, expected([2, 1, 0], 3))
    assert torch.equal(keep_probabilities(torch.tensor([[4.0]]), 1, p), torch.tensor([[0.5]], dtype=torch.float64))


class _Ctx:
    tensor = "w"


def test_della_drop_rate_and_rescale_hold_statistically():
    p = della_params(density=0.5, epsilon=0.3, seed=3)
    width, rows = 4, 50_000
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0]).repeat(rows).unsqueeze(0)
    out = della_rows(tau, width, p, _Ctx, 0).view(rows, width)
    probs = [0.2, 0.4, 0.6, 0.8]  # ascending |x| ranks 0..3: (0.5 - 0.3) + r / 3 * 0.6
    for j, (value, pj) in enumerate(zip([1.0, -2.0, 3.0, -4.0], probs)):
        col = out[:, j].double()
        frac = float((col != 0).double().mean())
        assert abs(frac - pj) < 5 * math.sqrt(pj * (1 - pj) / rows), (j, frac)
        assert set(col.unique().tolist()) == {0.0, float(np.float32(value / pj))}  # survivors / p_i
        assert abs(float(col.mean()) - value) < 5 * abs(value) * math.sqrt((1 - pj) / pj / rows)  # E = tau
    none = della_rows(tau, width, della_params(density=0.5, epsilon=0.3, seed=3, rescale="none"), _Ctx, 0)
    assert torch.equal(none != 0, out.view(1, -1) != 0) and torch.equal(none[none != 0], tau[none != 0])
    assert torch.equal(della_rows(tau, width, della_params(density=1.0), _Ctx, 0), tau)  # density 1: as is


@pytest.mark.parametrize(
    "method,key",
    [
        ({"name": "della", "density": 0.9, "epsilon": 0.15}, "method.epsilon"),
        ({"name": "della_linear", "epsilon": -0.1}, "method.epsilon"),
        ({"name": "della_linear", "density": 1.5}, "method.density"),
        ({"name": "breadcrumbs", "gamma": 1.0}, "method.gamma"),
        ({"name": "breadcrumbs_ties", "scope": "layer"}, "method.scope"),
        ({"name": "della", "lambda": 1.1}, "method.lambda"),  # mergekit's lambda is alpha here
    ],
)
def test_bad_parameter_is_one_line_naming_the_key(tmp_path, method, key):
    raw = {"base": str(tmp_path), "tasks": [{"name": "a", "checkpoint": str(tmp_path)}], "output": str(tmp_path / "o")}
    with pytest.raises(ConfigError) as err:
        config_from_dict({**raw, "method": method})
    assert key in str(err.value) and "\n" not in str(err.value).strip()


def test_rank_window_equals_the_sorted_ranks_with_ties():
    """The selection path of scope tensor against the sort: many ties (a few distinct values, zeros)."""
    gen = torch.Generator().manual_seed(3)
    for n, values in [(1, 3), (17, 2), (500, 5), (4096, 40), (4096, 100000)]:
        mag = torch.randint(0, values, (n,), generator=gen).float().abs()
        ranks = sp.descending_ranks(mag[None])[0]
        for lo, hi in [(0, 0), (0, 1), (0, n), (1, n), (n // 3, n // 2), (n // 2, n // 2), (n - 1, n), (2, n + 5)]:
            want = (ranks >= lo) & (ranks < hi)
            assert torch.equal(sp.rank_window(mag, lo, hi), want), (n, values, lo, hi)
