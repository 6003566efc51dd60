"""TSV-M, TSV-C, Iso-C and Iso-CTS (workers/methods/tsv.py, iso.py, _svd.py).

Each method's sharded Ray merge equals an independent reference written here from the spec
(/work/shared/METHODS-NEXT.md sections 4 and 5, the official code's steps: zero-padded stacks, P Q^T
polar factors), flattened over the whole model in one process, in float64 with numpy's SVD. The
reference's task vectors are the spec's tau_t = float32(theta_t) - float32(theta_0).

Tolerances: delta/ (the unscaled float32 delta) within 1e-6 x the tensor's largest |delta| of the
float64 reference (float32 rounding alone is 6e-8 of it; the SVDs agree to ~1e-13); model/ within one
unit in the last place of the stored dtype of theta_0 + alpha * float32(reference delta) computed as
the engine does, plus alpha x that delta tolerance (a weight near zero has a smaller ulp than the
delta's error).
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from conftest import config_for
from safetensors import safe_open
from safetensors.torch import load_file

from mergeflow.errors import ConfigError
from mergeflow.infra.storage import StorageOptions
from mergeflow.workers.methods import get_method, iso, tsv
from mergeflow.workers.methods._svd import DEFAULT_EXCLUDE, LM_VOCAB, polar
from mergeflow.workflows.config import config_from_dict
from mergeflow.workflows.merge import run_merge
from mergeflow.workflows.reconstruct import reconstruct

# ------------------------------------------------------------------------------- the reference


def ref_tsv_m(taus: np.ndarray) -> np.ndarray:
    """compute_and_sum_svd_mem_reduction, one tensor: (T, m, n) float64 -> (m, n)."""
    t, m, n = taus.shape
    r = min(m, n)
    k = r // t
    u_hat, s_hat, v_hat = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i in range(t):
        u, s, vh = np.linalg.svd(taus[i], full_matrices=False)
        u_hat[:, i * k : (i + 1) * k] = u[:, :k]
        s_hat[i * k : (i + 1) * k] = s[:k]
        v_hat[i * k : (i + 1) * k, :] = vh[:k, :]
    pu, _, qu = np.linalg.svd(u_hat, full_matrices=False)
    pv, _, qv = np.linalg.svd(v_hat, full_matrices=False)
    return (pu @ qu) @ np.diag(s_hat) @ (pv @ qv)


def ref_iso_c(taus: np.ndarray) -> np.ndarray:
    u, s, vh = np.linalg.svd(taus.sum(axis=0), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vh


def ref_iso_cts(taus: np.ndarray, fraction: float) -> np.ndarray:
    t, m, n = taus.shape
    r = min(m, n)
    common = int(r * fraction)
    common = r - round((r - common) / t) * t
    per = (r - common) // t
    u, s, vh = np.linalg.svd(taus.sum(axis=0), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], vh[:common]
    big_u, big_s, big_v = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i in range(t):
        w = taus[i] - cu @ cu.T @ taus[i]
        uu, ss, vv = np.linalg.svd(w, full_matrices=False)
        big_u[:, i * per : (i + 1) * per] = uu[:, :per]
        big_s[i * per : (i + 1) * per] = ss[:per]
        big_v[i * per : (i + 1) * per] = vv[:per]
    big_u[:, t * per :], big_s[t * per :], big_v[t * per :] = cu, cs, cv
    pu, _, qu = np.linalg.svd(big_u, full_matrices=False)
    pv, _, qv = np.linalg.svd(big_v, full_matrices=False)
    return (pu @ qu) @ np.diag(np.full(r, big_s.mean())) @ (pv @ qv)


def ref_truncation(tau: np.ndarray, tasks: int) -> np.ndarray:
    """TSV-C's rank-k reconstruction of one task's tensor, k = int(r / T)."""
    k = min(tau.shape) // tasks
    u, s, vh = np.linalg.svd(tau, full_matrices=False)
    return u[:, :k] @ np.diag(s[:k]) @ vh[:k]


def ref_deltas(base: dict, tasks: list[dict], method: str, params: dict) -> dict[str, np.ndarray]:
    """Every float tensor's delta: the method's formula on 2-D tensors the pattern does not match,
    the float64 mean of the task vectors elsewhere."""
    default = LM_VOCAB if method == "tsv_compress" else DEFAULT_EXCLUDE
    pattern = params.get("svd_exclude", default)
    out = {}
    for name in sorted(n for n, t in base.items() if t.is_floating_point()):
        taus = np.stack([(t[name].float() - base[name].float()).double().numpy() for t in tasks])
        if taus.ndim == 3 and not (pattern and re.search(pattern, name)):
            if method in ("tsv_merge", "tsv_compress"):
                out[name] = ref_tsv_m(taus)
            elif method == "iso_c":
                out[name] = ref_iso_c(taus)
            else:
                out[name] = ref_iso_cts(taus, params.get("common_space_fraction", 0.8))
        else:
            out[name] = taus.mean(axis=0)
    return out


def flatten(sd: dict, names: list[str]) -> np.ndarray:
    """The whole model as one vector, sorted names (the reference is flattened)."""
    return np.concatenate([np.asarray(sd[n], dtype=np.float64).reshape(-1) for n in names])


# ------------------------------------------------------------------------------- helpers


def load_dir(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    return load_dir(path)


def ulp_close(got: torch.Tensor, want: torch.Tensor, slack: float = 0.0) -> bool:
    """Equal up to one unit in the last place of their dtype, plus `slack` (what a delta within its
    tolerance can move a weight by)."""
    eps = torch.finfo(got.dtype).eps
    g, w = got.double(), want.double()
    return bool(((g - w).abs() <= eps * torch.maximum(g.abs(), w.abs()) + slack + 1e-30).all())


DELTA_RTOL = 1e-6


def assert_delta_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    err = np.abs(got - want).max()
    assert err <= DELTA_RTOL * np.abs(want).max() + 1e-12, f"{what}: max error {err:.3g} of {np.abs(want).max():.3g}"


# ------------------------------------------------------------------------------- (1) = reference through Ray

CASES = [  # (method, params, tasks): T = 3 leaves r = 16 with a zero column (k = 5); embed/lm_head SVD'd once
    ("tsv_merge", {"alpha": 0.7}, 3),
    ("tsv_merge", {"alpha": 1.0, "svd_exclude": ""}, 4),
    ("tsv_compress", {"alpha": 0.5}, 3),
    ("iso_c", {"alpha": 0.9}, 3),
    ("iso_cts", {"alpha": 1.1}, 4),
    ("iso_cts", {"alpha": 1.0, "common_space_fraction": 0.5, "svd_exclude": "lm_head"}, 3),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shard_size,chunk", [(4_000, 64), (10**9, 1 << 20)], ids=["many-shards", "one-shard"])
@pytest.mark.parametrize("method,params,n_tasks", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_merge_equals_reference(ray_session, family, tmp_path, method, params, n_tasks, dtype, shard_size, chunk):
    seed = abs(hash((method, json.dumps(params, sort_keys=True), str(dtype)))) % 1000
    base_dir, task_dirs = family(tasks=n_tasks, dtype=dtype, seed=seed, shards=2 if dtype == torch.float32 else 1)
    run = tmp_path / "run"
    cfg = config_for(
        base_dir,
        task_dirs,
        run,
        {"name": method, **params},
        shard_size=shard_size,
        chunk_elems=chunk,
        keep_delta=True,
    )
    report = run_merge(cfg, quiet=True)
    assert len(report.plan.shards) > (3 if shard_size == 4_000 else 0)

    base = load_checkpoint(base_dir)
    tasks = [load_checkpoint(p) for _, p in task_dirs]
    want = ref_deltas(base, tasks, method, params)
    names = sorted(want)
    delta = load_dir(run / "delta")
    got = load_dir(run / "model")
    assert_delta_close(flatten({n: delta[n].numpy() for n in names}, names), flatten(want, names), method)
    alpha = params["alpha"]
    for name in names:
        assert_delta_close(delta[name].double().numpy(), want[name], name)
        expected = (torch.from_numpy(want[name]).float() * alpha + base[name].float()).to(dtype)
        slack = abs(alpha) * DELTA_RTOL * np.abs(want[name]).max()
        assert got[name].dtype == dtype and ulp_close(got[name], expected, slack), name
    assert torch.equal(got["model.rotary_emb.position_ids"], base["model.rotary_emb.position_ids"])

    svd = report.manifest["svd"]
    two_d = [n for n in names if base[n].ndim == 2]
    pattern = params.get("svd_exclude")
    svd_names = [n for n in two_d if not (pattern and re.search(pattern, n))]
    if pattern is None:
        excluded = ["lm_head.weight", "model.embed_tokens.weight"]  # the LLM default
        svd_names = [n for n in two_d if n not in excluded]
        assert svd["excluded_2d"] == excluded
    assert svd["tensors"] == len(svd_names) and svd["weights"] == sum(base[n].numel() for n in svd_names)
    lines = get_method(method).describe(report.manifest)
    assert lines[0].startswith(f"SVD         {len(svd_names)} 2-D tensor(s)")
    line = get_method(method).describe_params(report.manifest["method"])
    assert ("svd_exclude default" in line) == ("svd_exclude" not in params), line
    # the SVD formulas are not the mean on these tensors (the comparison above is not vacuous)
    mean = np.mean([(t[svd_names[0]].float() - base[svd_names[0]].float()).double().numpy() for t in tasks], axis=0)
    assert np.abs(want[svd_names[0]] - mean).max() > 0.05 * np.abs(mean).max()

    if method == "tsv_compress":
        check_bundle(run, base, tasks, task_dirs, report, dtype, tmp_path)


def check_bundle(run, base, tasks, task_dirs, report, dtype, tmp_path) -> None:
    """TSV-C: the stored factors, their bytes in the manifest, and reconstruct of one task."""
    index = json.loads((run / "compressed/index.json").read_text())
    t = len(tasks)
    assert index["format"] == "mergeflow.tsv_c/1" and index["tasks"] == [n for n, _ in task_dirs]
    on_disk = sum(p.stat().st_size for p in (run / "compressed").rglob("*") if p.is_file())
    summary = report.manifest["summary"]
    assert summary["compressed_bytes"] == on_disk
    assert summary["compression_ratio"] == round(
        (summary["checkpoints_bytes"] + report.plan.base.nbytes) / (on_disk + report.plan.base.nbytes), 3
    )
    numbers = 0
    for name, info in index["tensors"].items():
        m_n = base[name].shape
        if info["factored"]:
            k = min(m_n) // t
            assert info["rank"] == k
            numbers += k * (m_n[0] + m_n[1] + 1)
        else:
            numbers += base[name].numel()
    payload = 0
    for files in index["files"].values():
        for f in files:
            with safe_open(run / f, "pt") as fh:
                payload += sum(int(np.prod(fh.get_slice(n).get_shape())) for n in fh.keys())
    assert payload == t * numbers  # float32 numbers: k (m + n + 1) per factored tensor per task
    assert not index["tensors"]["lm_head.weight"]["factored"]  # the LLM default keeps them dense

    task_name = task_dirs[1][0]
    reconstruct(str(run), task_name, str(tmp_path / "rebuilt"), StorageOptions(), quiet=True)
    rebuilt = load_dir(tmp_path / "rebuilt")
    assert rebuilt.keys() == base.keys()
    for name, info in index["tensors"].items():
        tau = (tasks[1][name].float() - base[name].float()).double().numpy()
        want = ref_truncation(tau, t) if info["factored"] else tau
        expected = (torch.from_numpy(want).float() + base[name].float()).to(dtype)
        slack = DELTA_RTOL * np.abs(want).max()
        assert rebuilt[name].dtype == dtype and ulp_close(rebuilt[name], expected, slack), name
    assert torch.equal(rebuilt["model.rotary_emb.position_ids"], base["model.rotary_emb.position_ids"])
    # the rank-k truncation really loses something on the factored tensors (k = r / T < rank)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(rebuilt[q], tasks[1][q])


# ------------------------------------------------------------------------------- (2) bad parameters


@pytest.mark.parametrize(
    "method,key",
    [
        ({"name": "tsv_merge", "svd_exclude": "(lm_head"}, "method.svd_exclude"),
        ({"name": "tsv_compress", "store_dtype": "float16"}, "method.store_dtype"),
        ({"name": "iso_c", "alpha": float("inf")}, "method.alpha"),
        ({"name": "iso_cts", "common_space_fraction": 1.5}, "method.common_space_fraction"),
    ],
)
def test_bad_parameter_is_one_line_naming_the_key(tmp_path, method, key):
    raw = {"base": str(tmp_path), "tasks": [{"name": "a", "checkpoint": str(tmp_path)}], "output": str(tmp_path / "o")}
    with pytest.raises(ConfigError) as err:
        config_from_dict({**raw, "method": method})
    assert key in str(err.value) and "\n" not in str(err.value).strip()


def test_defaults_are_documented():
    for name, defaults in {
        "tsv_merge": {"alpha": 1.0, "svd_exclude": DEFAULT_EXCLUDE},
        "tsv_compress": {"alpha": 1.0, "svd_exclude": LM_VOCAB, "store_dtype": "float32"},
        "iso_c": {"alpha": 1.0, "svd_exclude": DEFAULT_EXCLUDE},
        "iso_cts": {"alpha": 1.0, "svd_exclude": DEFAULT_EXCLUDE, "common_space_fraction": 0.8},
    }.items():
        params = get_method(name).Params()
        assert dataclasses.asdict(params) == defaults, name
        assert all(f.metadata.get("doc") for f in dataclasses.fields(params)), name


# ------------------------------------------------------------------------------- (3) what is specific


def test_the_default_rule():
    from mergeflow.workers.methods._svd import takes_svd

    for name in ["model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "shared.weight"]:
        assert not takes_svd(name, (100, 8), DEFAULT_EXCLUDE), name
    assert not takes_svd("text_projection", (8, 8), DEFAULT_EXCLUDE)
    assert takes_svd("text_projection", (8, 8), LM_VOCAB)  # the official TSV-C factors it
    for name in ["model.layers.0.mlp.up_proj.weight", "visual.positional_embedding", "transformer.wpe.weight"]:
        assert takes_svd(name, (100, 8), DEFAULT_EXCLUDE), name
    assert not takes_svd("model.norm.weight", (8,), "") and not takes_svd("conv.weight", (2, 2, 3, 3), "")
    assert takes_svd("model.embed_tokens.weight", (100, 8), "")


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _low_rank(m: int, n: int, spectrum: list[float], gen: torch.Generator) -> torch.Tensor:
    u, v = _orthogonal(m, gen)[:, : len(spectrum)], _orthogonal(n, gen)[:, : len(spectrum)]
    return u @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ v.T


def _methods():
    return {
        "tsv_merge": tsv.tsv_merge,
        "iso_c": iso.iso_c,
        "iso_cts": lambda x: iso.iso_cts(x, 0.8),
        "iso_cts_0.5": lambda x: iso.iso_cts(x, 0.5),
    }


@pytest.mark.parametrize("name", ["tsv_merge", "iso_c", "iso_cts", "iso_cts_0.5"])
def test_degenerate_spectra_give_a_unique_product(name):
    """Rank-deficient task vectors (zero singular values), repeated singular values inside the top k and
    two identical tasks: the SVD may pick any basis of those subspaces, so the product must be
    equivariant, f(A tau_t B^T) = A f(tau_t) B^T for orthogonal A, B (which rotate every basis)."""
    f = _methods()[name]
    gen = torch.Generator().manual_seed(3)
    m, n = 16, 14  # r = 14, k = 4
    low = _low_rank(m, n, [2.0, 1.0], gen)  # rank 2 < k
    tied = _low_rank(
        m, n, [3.0, 3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01], gen
    )  # ties in the top 4
    taus = torch.stack([low, tied, low.clone()])  # tasks 1 and 3 identical
    a, b = _orthogonal(m, gen), _orthogonal(n, gen)
    delta = f(taus)
    rotated = f(torch.stack([a @ t @ b.T for t in taus]))
    torch.testing.assert_close(rotated, a @ delta @ b.T, rtol=0, atol=1e-10)
    assert torch.linalg.matrix_norm(delta) > 0.1


def test_tsv_merge_special_cases():
    gen = torch.Generator().manual_seed(5)
    tau = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(tsv.tsv_merge(tau[None]), tau, rtol=0, atol=1e-12)  # T = 1: tau itself
    # identical tasks: the official P Q^T of [U_k, U_k] is not unique; the canonical polar factor
    # U_k [I, I] / sqrt(2) gives back the task's own rank-k truncation U_k diag(s_k) V_k^T
    twice = tsv.tsv_merge(torch.stack([tau, tau]))
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    torch.testing.assert_close(twice, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], rtol=0, atol=1e-12)
    # r < T: k = 0, the official code keeps nothing of the tensor
    assert torch.count_nonzero(tsv.tsv_merge(torch.randn(4, 3, 5, generator=gen, dtype=torch.float64))) == 0
    # all-zero task vectors merge to zero (no NaN from an empty polar factor)
    assert torch.count_nonzero(tsv.tsv_merge(torch.zeros(2, 6, 4, dtype=torch.float64))) == 0
    # the block structure: with orthogonal task supports TSV-M is the sum of the truncations
    x = torch.zeros(2, 8, 8, dtype=torch.float64)
    x[0, :4, :4] = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    x[1, 4:, 4:] = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    trunc = sum(torch.from_numpy(ref_truncation(x[i].numpy(), 2)) for i in range(2))
    torch.testing.assert_close(tsv.tsv_merge(x), trunc, rtol=0, atol=1e-12)


def test_iso_spectrum_and_special_cases():
    gen = torch.Generator().manual_seed(6)
    taus = torch.randn(3, 10, 8, generator=gen, dtype=torch.float64)
    delta = iso.iso_c(taus)
    s_sum = torch.linalg.svdvals(taus.sum(dim=0))
    torch.testing.assert_close(torch.linalg.svdvals(delta), torch.full((8,), float(s_sum.mean()), dtype=torch.float64))
    # Iso-CTS with one task, or with a common space of all r directions, is Iso-C
    torch.testing.assert_close(iso.iso_cts(taus[:1], 0.8), iso.iso_c(taus[:1]), rtol=0, atol=1e-12)
    torch.testing.assert_close(iso.iso_cts(taus, 1.0), iso.iso_c(taus), rtol=0, atol=1e-12)
    four = torch.randn(4, 10, 8, generator=gen, dtype=torch.float64)  # r = 8, T = 4: round(0.5) = 0, s = 0
    torch.testing.assert_close(iso.iso_cts(four, 0.8), iso.iso_c(four), rtol=0, atol=1e-12)
    assert torch.count_nonzero(iso.iso_c(torch.zeros(2, 5, 4, dtype=torch.float64))) == 0
    assert torch.count_nonzero(iso.iso_cts(torch.zeros(2, 5, 4, dtype=torch.float64), 0.5)) == 0
    # Iso-CTS is isotropic too, over the r stacked directions
    cts = iso.iso_cts(taus, 0.5)
    sv = torch.linalg.svdvals(cts)
    torch.testing.assert_close(sv, torch.full_like(sv, float(sv.mean())))
    assert not torch.allclose(cts, delta, atol=1e-3)


def test_cts_split_follows_the_official_rounding():
    assert iso.cts_split(16, 3, 0.8) == (13, 1)  # int(12.8) = 12; round(4 / 3) * 3 = 3
    assert iso.cts_split(16, 4, 0.8) == (12, 1)
    assert iso.cts_split(8, 4, 0.8) == (8, 0)  # round(0.5) = 0 (half to even): Iso-C
    assert iso.cts_split(768, 8, 0.8) == (616, 19)  # ViT-B: 614 -> 152 task-specific directions
    assert iso.cts_split(10, 4, 0.0) == (2, 2)  # round(2.5) = 2
    assert iso.cts_split(6, 4, 0.0) == (2, 1)  # official: round(1.5) * 4 = 8 > 6 (negative common size)
    for r in range(1, 60):
        for t in range(1, 9):
            for f in (0.0, 0.3, 0.8, 1.0):
                k, s = iso.cts_split(r, t, f)
                assert k >= 0 and s >= 0 and k + t * s == r


def test_polar_factor_is_the_orthogonal_one_when_full_rank():
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    p = polar(a)
    torch.testing.assert_close(p.T @ p, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(p @ (p.T @ a), a)  # same column space
    sym = p.T @ a  # a = p h with h symmetric positive definite
    torch.testing.assert_close(sym, sym.T)
    assert bool((torch.linalg.eigvalsh(sym) > 0).all())
    torch.testing.assert_close(polar(a.T), p.T)


def test_tsv_compress_model_is_tsv_merge_and_only_svd_tensors_are_read_whole(family, tmp_path, monkeypatch):
    """In one process (merge_shard per shard): tsv_compress's model/ is tsv_merge's with the same rule, and
    only SVD tensors are read whole (the others are merged chunk by chunk, memory O(T x chunk))."""
    from mergeflow.workers.reading import TensorAccess
    from mergeflow.workers.shard import merge_shard
    from mergeflow.workflows.plan import make_plan

    whole = []
    real = TensorAccess.whole

    def spy(self):
        whole.append(self.job.name)
        return real(self)

    monkeypatch.setattr(TensorAccess, "whole", spy)
    base_dir, task_dirs = family(tasks=3, dtype=torch.bfloat16, seed=11)
    models = {}
    for method in ("tsv_merge", "tsv_compress"):
        cfg = config_for(base_dir, task_dirs, tmp_path / method, {"name": method, "svd_exclude": LM_VOCAB})
        whole.clear()
        for spec in make_plan(cfg).shards:
            merge_shard(spec)
        models[method] = load_dir(tmp_path / method / "model")
        base = load_checkpoint(base_dir)
        assert sorted(whole) == sorted(
            n for n, t in base.items() if t.ndim == 2 and n not in ("lm_head.weight", "model.embed_tokens.weight")
        )
    assert models["tsv_merge"].keys() == models["tsv_compress"].keys()
    for name, t in models["tsv_merge"].items():
        assert torch.equal(t, models["tsv_compress"][name]), name


SELECTION = {"evaluator": "mergeflow.dev.suite.models:evaluate", "alphas": [0.5, 1.0]}


def test_alpha_auto_through_the_engine(tiny_suite, ray_session, tmp_path):
    """alpha: auto picks from the grid on validation data and writes exactly the model of that alpha."""
    root, names = tiny_suite

    def cfg(out, alpha):
        return config_from_dict(
            {
                "base": str(root / "base"),
                "tasks": [{"name": n, "checkpoint": str(root / n)} for n in names],
                "output": str(out),
                "method": {"name": "iso_cts", "alpha": alpha},
                "selection": SELECTION,
            }
        )

    auto = run_merge(cfg(tmp_path / "auto", "auto"), quiet=True)
    chosen = auto.manifest["method"]["alpha"]
    assert chosen in SELECTION["alphas"] and auto.manifest["selection"]["alpha"]["chosen"] == chosen
    assert auto.manifest["svd"]["tensors"] > 0
    fixed = run_merge(cfg(tmp_path / "fixed", chosen), quiet=True)
    assert fixed.manifest["method"]["alpha"] == chosen
    a, b = load_dir(tmp_path / "auto" / "model"), load_dir(tmp_path / "fixed" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
