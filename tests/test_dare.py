"""DARE (`dare_linear`, `dare_ties`): the sharded Ray merge against an independent float64 reference
written from the spec (docs/methods.md, DARE), identical bytes across shard/chunk layouts, the drop
rate and rescale statistically, and the counter-based generator's properties.

The reference takes the task vectors as the engine defines them (tau = float32(theta_t) -
float32(theta_0), held in float64) and does everything after that in float64: its own numpy
implementation of the generator (uint32 arithmetic), masks, rescale, trim, sign consensus. Masks
are compared exactly (through the merged vector); values within float32 rounding: per element
|got - ref| <= (T + 3) * 2^-24 * sum_t |x_t| (x_t the reference's sparsified entries), which bounds
a float32 sum of T once-rounded terms. The written model must equal the engine's formula on the
written float32 delta, bit for bit.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import config_for
from safetensors.torch import load_file

from mergeflow.errors import ConfigError
from mergeflow.workers.methods import ChunkContext, get_method
from mergeflow.workers.methods import _sparsify as sp
from mergeflow.workflows.config import config_from_dict
from mergeflow.workflows.merge import run_merge

LAYOUTS = {
    "many": {"shard_size": 4_000, "chunk_elems": 64},
    "one": {"shard_size": 10**9, "chunk_elems": 1 << 20},
    "mid": {"shard_size": 9_000, "chunk_elems": 200},
}

# ----------------------------------------------------------------------------- the generator, in numpy

_M = np.uint32(0xFFFFFFFF)


def _fmix(h):
    h = np.asarray(h, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))


def ref_key(seed: int, task: int, name: str) -> tuple[np.uint32, np.uint32]:
    h = _fmix(np.uint32(seed & 0xFFFFFFFF) ^ np.uint32(0x6A09E667))
    h = _fmix(h ^ np.uint32(seed >> 32) ^ np.uint32(0xBB67AE85))
    h = _fmix(h ^ np.uint32(task))
    h = _fmix(h ^ np.uint32(zlib.crc32(name.encode())))
    return h, _fmix(h ^ np.uint32(0x5BE0CD19))


def ref_uniform(seed: int, task: int, name: str, n: int, offset: int = 0) -> np.ndarray:
    """u(i) = bits(i) / 2^32 for i = offset .. offset + n - 1 (float64)."""
    k1, k2 = ref_key(seed, task, name)
    i = np.arange(offset, offset + n, dtype=np.uint64)
    lo = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (i >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        x = _fmix(lo * np.uint32(0x9E3779B1) + k1)
        x = _fmix(x ^ k2 ^ (hi * np.uint32(0x27D4EB2F)))
    return x.astype(np.float64) / 2.0**32


# ----------------------------------------------------------------------------- reference merges


def float_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out |= load_file(f)
    return {n: t for n, t in out.items() if t.is_floating_point()}


def task_vectors(base_dir, task_dirs) -> tuple[dict, dict]:
    """{name: base tensor}, {name: [tau_t flattened, float64]} as the engine defines tau."""
    base = float_tensors(base_dir)
    tasks = [float_tensors(p) for _, p in task_dirs]
    taus = {n: [(t[n].float() - base[n].float()).double().flatten().numpy() for t in tasks] for n in base}
    return base, taus


def ref_consensus(xs: list[np.ndarray], merge: str, majority: np.ndarray | None = None) -> np.ndarray:
    """mergekit: majority +1 where sum_t x_t >= 0, else -1; agreeing nonzero entries summed / averaged."""
    if majority is None:
        majority = np.where(np.sum(xs, axis=0) >= 0, 1.0, -1.0)
    agree = [np.sign(x) == majority for x in xs]
    total = np.sum([np.where(a, x, 0.0) for a, x in zip(agree, xs)], axis=0)
    if merge == "mean":
        total = total / np.maximum(np.sum(agree, axis=0), 1)
    return total


def ref_merge(taus: dict, sparsify, consensus: bool, merge: str = "sum") -> tuple[dict, dict, dict]:
    """{name: merged delta}, {name: the same with the other sign where the election is a tie within
    float32 rounding (either is right there)}, {name: sum_t |x_t|}, in float64; sparsify(name, t, tau)
    -> x_t. A tie within rounding: |sum_t x_t| <= (T + 3) 2^-24 sum_t |x_t|, e.g. bf16 task vectors
    that cancel exactly, whose rescaled float32 sum is a rounding error of either sign."""
    delta, other, mags = {}, {}, {}
    for name, rows in taus.items():
        xs = [sparsify(name, t, tau) for t, tau in enumerate(rows)]
        mags[name] = np.sum(np.abs(xs), axis=0)
        if not consensus:
            delta[name] = other[name] = np.sum(xs, axis=0)
            continue
        summed = np.sum(xs, axis=0)
        majority = np.where(summed >= 0, 1.0, -1.0)
        tie = np.abs(summed) <= (len(xs) + 3) * 2.0**-24 * mags[name]
        delta[name] = ref_consensus(xs, merge, majority)
        other[name] = ref_consensus(xs, merge, np.where(tie, -majority, majority))
    return delta, other, mags


def ref_dare(seed: int, density: float, rescale: str, trim_density: float | None = None):
    def sparsify(name, t, tau):
        if density >= 1.0:
            x = tau.copy()
        else:
            keep = ref_uniform(seed, t, name, tau.size) < density
            x = np.where(keep, tau, 0.0)
            if rescale == "inverse":
                x = x / density
            elif rescale == "l1":
                before, after = np.abs(tau).sum(), np.abs(x).sum()
                if before >= 1e-7 and after >= 1e-7:
                    x = x * (before / after)
        if trim_density is not None:
            k = x.size - int(x.size * trim_density)  # the k-th smallest |x|, 1-indexed; 0: keep all
            if k > 0:
                x = np.where(np.abs(x) >= np.sort(np.abs(x))[k - 1], x, 0.0)
        return x

    return sparsify


# ----------------------------------------------------------------------------- running merges


def merge_layout(base_dir, task_dirs, out: Path, method: dict, layout: str):
    cfg = config_for(base_dir, task_dirs, out, method, keep_delta=True, **LAYOUTS[layout])
    report = run_merge(cfg, quiet=True)
    if layout == "many":
        assert len(report.plan.shards) > 3
    return cfg, float_tensors(out / "model"), float_tensors(out / "delta")


def check_against_reference(cfg, base, model, delta, reference, tasks: int) -> None:
    want, other, mags = reference
    alpha = cfg.method.params.alpha
    assert delta.keys() == want.keys() == model.keys()
    for name, ref in want.items():
        got = delta[name].flatten().double().numpy()
        bound = (tasks + 3) * 2.0**-24 * mags[name]
        bad = (np.abs(got - ref) > bound) & (np.abs(got - other[name]) > bound)
        assert not bad.any(), f"{name}: {int(bad.sum())} entries off, first at {np.flatnonzero(bad)[:5]}"
        engine = torch.mul(delta[name], alpha).add_(base[name].float()).to(base[name].dtype)
        assert torch.equal(model[name], engine), name


# ----------------------------------------------------------------------------- the sharded merge


CASES = [  # (method params, reference factory args, consensus)
    ({"name": "dare_linear", "alpha": 0.5, "density": 0.6, "seed": 3}, (3, 0.6, "inverse"), False),
    ({"name": "dare_linear", "density": 0.5, "rescale": "l1"}, (0, 0.5, "l1"), False),
    ({"name": "dare_ties", "density": 0.7}, (0, 0.7, "inverse"), True),
    (
        {"name": "dare_ties", "density": 0.6, "merge": "mean", "trim_density": 0.5, "rescale": "none", "seed": 11},
        (11, 0.6, "none", 0.5),
        True,
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method,ref_args,consensus", CASES, ids=[f"{c[0]['name']}-{i}" for i, c in enumerate(CASES)])
def test_dare_equals_reference(ray_session, family, tmp_path, method, ref_args, consensus, dtype):
    n_tasks = 4
    base_dir, task_dirs = family(
        tasks=n_tasks, dtype=dtype, seed=len(ref_args), shards=2 if dtype == torch.float32 else 1
    )
    base, taus = task_vectors(base_dir, task_dirs)
    reference = ref_merge(taus, ref_dare(*ref_args), consensus, method.get("merge", "sum"))
    runs = {}
    for layout in ("many", "one"):
        cfg, model, delta = merge_layout(base_dir, task_dirs, tmp_path / layout, method, layout)
        check_against_reference(cfg, base, model, delta, reference, n_tasks)
        runs[layout] = delta
    assert all(torch.equal(runs["many"][n], runs["one"][n]) for n in reference[0])
    if method["name"] == "dare_ties":  # the defaults: merge sum, alpha 0.3; mean: alpha 1.0
        assert cfg.method.params.alpha == (1.0 if method.get("merge") == "mean" else 0.3)


@pytest.mark.parametrize(
    "method",
    [
        {"name": "dare_ties", "density": 0.5, "rescale": "l1", "trim_density": 0.4, "seed": 5},
        {"name": "dare_linear", "density": 0.3, "seed": 2**40 + 7},
    ],
    ids=["ties-l1-trim", "linear"],
)
def test_dare_bytes_identical_across_layouts(ray_session, family, tmp_path, method):
    base_dir, task_dirs = family(tasks=3, hidden=24, seed=9)
    outs = {}
    for layout in LAYOUTS:
        _, model, delta = merge_layout(base_dir, task_dirs, tmp_path / layout, method, layout)
        outs[layout] = (model, delta)
    first = outs["many"]
    for layout, (model, delta) in outs.items():
        for name in first[0]:
            assert torch.equal(model[name], first[0][name]), (layout, name)
            assert torch.equal(delta[name], first[1][name]), (layout, name)
    manifest = json.loads((tmp_path / "many" / "manifest.json").read_text())
    assert manifest["method"]["seed"] == method["seed"]
    assert manifest["rng"] == {"generator": sp.RNG, "seed": method["seed"], "key": manifest["rng"]["key"]}


def test_dare_l1_rescale_keeps_each_tensor_norm(ray_session, family, tmp_path):
    """One task: the merged vector is dare(tau) itself, whose L1 norm per tensor is tau's."""
    base_dir, task_dirs = family(tasks=1, dtype=torch.float32, seed=4)
    _, taus = task_vectors(base_dir, task_dirs)
    _, _, delta = merge_layout(
        base_dir, task_dirs, tmp_path / "run", {"name": "dare_linear", "density": 0.3, "rescale": "l1"}, "many"
    )
    for name, (tau,) in taus.items():
        got = delta[name].double().abs().sum().item()
        assert got == pytest.approx(np.abs(tau).sum(), rel=1e-6), name
        assert (delta[name].flatten().numpy() == 0).mean() > 0.5, name  # about 70% dropped


# ----------------------------------------------------------------------------- the kernel: statistics


def dare_kernel(name: str, taus: torch.Tensor, offset: int = 0, tensor: str = "w", **params) -> torch.Tensor:
    method = get_method(name)
    p = method.Params(**params)
    names = tuple(f"t{i}" for i in range(taus.shape[0]))
    ctx = ChunkContext(tensor, (taus.shape[1],), "F32", names, {"majority": 1}, offset=offset)
    return method.kernel(taus.clone(), p, ctx).delta


def test_drop_rate_and_rescale_hold_statistically():
    n, d = 200_000, 0.3
    # delta = dare(task t's row) alone where only task t is nonzero (all ones)
    rows = torch.stack(
        [
            dare_kernel("dare_linear", torch.eye(3)[t].unsqueeze(1).expand(3, n).contiguous(), density=d, seed=1)
            for t in range(3)
        ]
    )
    scale = float(np.float32(1 / d))
    sigma = math.sqrt(d * (1 - d) / n)
    for t in range(3):
        frac = float((rows[t] != 0).double().mean())
        assert abs(frac - d) < 5 * sigma, (t, frac)
        assert set(torch.unique(rows[t]).tolist()) == {0.0, scale}  # survivors times 1/density, exactly
        assert abs(float(rows[t].double().mean()) - 1.0) < 5 * math.sqrt((1 - d) / d / n)  # E[dare(tau)] = tau
    both = float(((rows[0] != 0) & (rows[1] != 0)).double().mean())
    assert abs(both - d * d) < 5 * math.sqrt(d * d * (1 - d * d) / n)  # tasks draw independent masks
    doubled = dare_kernel("dare_linear", 2 * torch.eye(3)[0].unsqueeze(1).expand(3, n).contiguous(), density=d, seed=1)
    assert torch.equal(doubled == 0, rows[0] == 0)  # the mask depends on (seed, task, tensor, element) only

    tau = torch.from_numpy(np.random.default_rng(0).laplace(size=(1, n))).float()
    out = dare_kernel("dare_linear", tau, density=0.5, seed=2).double()
    spread = math.sqrt(float((tau.double() ** 2).sum()) * (1 - 0.5) / 0.5)
    assert abs(float(out.sum()) - float(tau.double().sum())) < 5 * spread
    drop_only = dare_kernel("dare_linear", tau, density=0.5, seed=2, rescale="none")
    assert torch.equal(drop_only[out != 0], tau[0][out != 0]) and torch.equal(drop_only == 0, out == 0)
    assert torch.equal(dare_kernel("dare_linear", tau, density=1.0), tau[0])  # density 1: nothing dropped


def test_consensus_sign_and_disjoint_merge():
    """density 1 keeps everything: dare_ties is then mergekit's consensus merge of the task vectors."""
    taus = torch.tensor([[2.0, -3.0, 1.0, 0.0, 0.5], [-2.0, 1.0, 1.0, 0.0, -0.25], [0.0, 1.0, -4.0, 0.0, 0.0]])
    # sums: 0 (a tie: +1), -1, -2, 0 (nothing to keep), 0.25
    assert torch.equal(dare_kernel("dare_ties", taus, density=1.0), torch.tensor([2.0, -3.0, -4.0, 0.0, 0.5]))
    mean = dare_kernel("dare_ties", taus, density=1.0, merge="mean")
    assert torch.equal(mean, torch.tensor([2.0, -3.0, -4.0, 0.0, 0.5]))
    taus[1, 1] = -1.0  # two agreeing entries: the mean halves their sum
    assert torch.equal(dare_kernel("dare_ties", taus, density=1.0, merge="mean")[1], torch.tensor(-2.0))
    assert torch.equal(dare_kernel("dare_linear", taus, density=1.0), taus[0] + taus[1] + taus[2])


def test_masks_do_not_depend_on_the_chunking():
    tau = torch.randn(4, 5_000)
    whole = dare_kernel("dare_ties", tau, density=0.4, seed=8, tensor="layers.0.w")
    cuts = [0, 7, 64, 1_000, 1_001, 4_096, 5_000]
    pieces = [
        dare_kernel("dare_ties", tau[:, lo:hi], offset=lo, density=0.4, seed=8, tensor="layers.0.w")
        for lo, hi in zip(cuts, cuts[1:])
    ]
    assert torch.equal(torch.cat(pieces), whole)
    other = dare_kernel("dare_ties", tau, density=0.4, seed=8, tensor="layers.1.w")
    assert not torch.equal(other, whole)  # the tensor's name is part of the key


def test_generator_matches_its_spec_and_known_values():
    for seed, task, name, offset in [
        (0, 0, "w", 0),
        (7, 3, "model.layers.1.mlp.up_proj.weight", 123),
        (2**63 + 5, 1, "x", 2**32 - 40),
    ]:
        got = sp.uniform(sp.stream_key(seed, task, name), offset, 100, "cpu").numpy()
        assert np.array_equal(got, ref_uniform(seed, task, name, 100, offset)), (seed, task, name)
    # pinned: a change to the generator changes every DARE/DELLA merge (bump sp.RNG with it)
    assert sp.random_bits(sp.stream_key(0, 0, "w"), 0, 4, "cpu").tolist() == [
        2352163310,
        586035522,
        1429631224,
        3173411583,
    ]
    u = sp.uniform(sp.stream_key(1, 0, "w"), 0, 1 << 18, "cpu").numpy()
    counts = np.histogram(u, bins=64, range=(0, 1))[0]
    expected = u.size / 64
    assert ((counts - expected) ** 2 / expected).sum() < 130  # chi-square, 63 degrees of freedom (p ~ 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_bits_on_cuda():
    key = sp.stream_key(3, 2, "model.embed_tokens.weight")
    cpu = sp.random_bits(key, 2**32 - 1000, 5_000, "cpu")
    assert torch.equal(sp.random_bits(key, 2**32 - 1000, 5_000, "cuda").cpu(), cpu)
    tau = torch.randn(3, 4_000)
    want = dare_kernel("dare_ties", tau, density=0.5, seed=4)
    method = get_method("dare_ties")
    ctx = ChunkContext("w", (4_000,), "F32", ("a", "b", "c"), {}, device="cuda")
    got = method.kernel(tau.cuda(), method.Params(density=0.5, seed=4), ctx).delta.cpu()
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "method,key",
    [
        ({"name": "dare_linear", "density": 0.0}, "method.density"),
        ({"name": "dare_linear", "seed": -1}, "method.seed"),
        ({"name": "dare_ties", "trim_density": 1.5}, "method.trim_density"),
        ({"name": "dare_ties", "rescale": "l2"}, "method.rescale"),
    ],
)
def test_bad_parameter_is_one_line_naming_the_key(tmp_path, method, key):
    raw = {"base": str(tmp_path), "tasks": [{"name": "a", "checkpoint": str(tmp_path)}], "output": str(tmp_path / "o")}
    with pytest.raises(ConfigError) as err:
        config_from_dict({**raw, "method": method})
    assert key in str(err.value) and "\n" not in str(err.value).strip()


def test_numpy_and_torch_generators_give_the_same_bits():
    """The CPU's uint32 path and the int64 torch path (what CUDA runs) agree, past 2^32 too."""
    for seed, task, name, offset, n in [
        (0, 0, "w", 0, 5000),
        (9, 4, "a.b", 2**32 - 3000, 6000),
        (2**64 - 1, 7, "", 2**40, 64),
    ]:
        key = sp.stream_key(seed, task, name)
        assert torch.equal(sp.random_bits(key, offset, n, "cpu"), sp._bits_torch(key, offset, n, "cpu"))
