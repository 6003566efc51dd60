"""EMR-Merging and RegMean against independent single-process float64 references written from the
spec (docs/methods.md), through a real local Ray runtime, many shards and one shard, fp32 and bf16.

Tolerance ("float32 tolerance"): a stored value may differ from the float64 reference by half a unit in
the last place of its dtype (the final cast) plus 8 float32 roundings of the largest term it is
computed from (|theta_0| + |delta|): the engine computes in float32, the references in float64.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import config_for
from safetensors.torch import load_file, save_file

from mergeflow.dev.suite.models import LOT_MODEL
from mergeflow.errors import ConfigError
from mergeflow.infra.storage import StorageOptions
from mergeflow.workers.methods.emr import exact_abs_sum, exact_masked_sums
from mergeflow.workers.methods.lot.features import GRAM, ROWS, load_stats
from mergeflow.workers.methods.regmean import regmean_delta
from mergeflow.workflows.config import config_from_dict
from mergeflow.workflows.merge import run_merge
from mergeflow.workflows.reconstruct import reconstruct

MANY, ONE = {"shard_size": 4_000, "chunk_elems": 64}, {"shard_size": 10**9, "chunk_elems": 1 << 20}


# ----------------------------------------------------------------------------------- helpers


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out |= load_file(path / f)
    return out


def bundle_files(run: Path, files: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        out |= load_file(run / f)
    return out


def assert_rounded(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    """got (stored dtype) is want (float64) rounded to that dtype, up to float32 arithmetic on terms of
    size `scale` (see the module docstring)."""
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[got.dtype]
    _, e = torch.frexp(want)
    ulp = torch.ldexp(torch.ones_like(want), e - bits)
    tol = 0.5 * ulp + 8 * 2.0**-24 * scale.double() + 1e-30
    err = (got.double() - want).abs()
    assert bool((err <= tol).all()), (
        f"{what}: max error {float(err.max()):.3g}, worst excess {float((err - tol).max()):.3g}"
    )


def float_names(sd: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n, t in sd.items() if t.is_floating_point())


# ------------------------------------------------------------------------- EMR reference (float64)


def emr_reference(base, tasks, mode: str):
    """Flattened, single-process, float64: per tensor the elected sign, masks, tau_uni; the rescalers."""
    names = float_names(base)
    uni, masks, num, den = {}, {}, np.zeros(len(tasks)), np.zeros(len(tasks))
    for n in names:
        taus = torch.stack([t[n].double().flatten() - base[n].double().flatten() for t in tasks])
        flag = torch.where(taus.sum(0) > 0, 1.0, -1.0).double()
        m = taus * flag > 0
        u = flag * torch.where(m, taus.abs(), 0.0).amax(0)
        uni[n], masks[n] = u, m
        w = 1.0 / u.numel() if mode == "code" else 1.0
        num += w * taus.abs().sum(1).numpy()
        den += w * torch.where(m, u.abs(), 0.0).sum(1).numpy()
    return names, uni, masks, num / den


def check_emr_run(run: Path, base_dir: Path, task_dirs, mode: str, alpha: float, dtype) -> dict:
    base = load_dir(base_dir)
    tasks = [load_dir(p) for _, p in task_dirs]
    names, uni, masks, lambdas = emr_reference(base, tasks, mode)
    manifest = json.loads((run / "manifest.json").read_text())
    index = json.loads((run / "compressed/index.json").read_text())
    assert index["format"] == "mergeflow.emr/1" and index["rescale_mode"] == mode
    assert manifest["emr"]["rescalers"] == index["rescalers"]
    got_l = np.array([index["rescalers"][n] for n, _ in task_dirs])
    np.testing.assert_allclose(got_l, lambdas, rtol=1e-6)  # float32 task vectors against float64 ones

    model = load_dir(run / "model")
    stored_uni = bundle_files(run, index["tau_uni"]["files"])
    for n in names:
        b = base[n].double().flatten()
        assert_rounded(model[n].flatten(), b + alpha * uni[n], b.abs() + uni[n].abs(), f"model {n}")
        assert stored_uni[n].dtype == dtype
        assert_rounded(stored_uni[n].flatten(), uni[n], uni[n].abs(), f"tau_uni {n}")
    for t, (task, _) in enumerate(task_dirs):
        packed = bundle_files(run, index["masks"][task])
        for n in names:
            got = torch.from_numpy(np.unpackbits(packed[n].numpy(), count=base[n].numel()).astype(bool))
            assert torch.equal(got, masks[n][t]), (task, n)
        out = run.parent / f"{run.name}-rebuilt-{task}"
        reconstruct(str(run), task, str(out), StorageOptions(), quiet=True)
        rebuilt = load_dir(out)
        assert rebuilt.keys() == base.keys()
        for n in base:
            if n not in names:
                assert torch.equal(rebuilt[n], base[n])
                continue
            b = base[n].double().flatten()
            # rebuilt from the stored tau_uni (base dtype): the reference applies the same one
            u = stored_uni[n].double().flatten()
            want = b + lambdas[t] * torch.where(masks[n][t], u, 0.0)
            assert_rounded(rebuilt[n].flatten(), want, b.abs() + lambdas[t] * u.abs(), f"rebuild {task} {n}")
    return index


@pytest.mark.parametrize("dtype,mode", [(torch.bfloat16, "code"), (torch.float32, "paper")], ids=["bf16", "fp32"])
def test_emr_sharded_and_one_shard_equal_the_reference(ray_session, family, tmp_path, dtype, mode):
    base_dir, task_dirs = family(tasks=3, hidden=16, dtype=dtype, seed=11, shards=2 if dtype == torch.float32 else 1)
    indexes, outputs = [], []
    for layout, execution in (("many", MANY), ("one", ONE)):
        run = tmp_path / layout
        method = {"name": "emr", "rescale_mode": mode, "alpha": 0.7}
        report = run_merge(config_for(base_dir, task_dirs, run, method, **execution), quiet=True)
        assert len(report.plan.shards) > (3 if layout == "many" else 0)
        indexes.append(check_emr_run(run, base_dir, task_dirs, mode, 0.7, dtype))
        outputs.append(report.manifest["emr"])
        summary = report.manifest["summary"]
        assert set(summary["mask_density"]) == {n for n, _ in task_dirs} and summary["compression_ratio"] > 1
    # exact sums: the rescalers do not depend on the chunk or shard size, to the last bit
    assert indexes[0]["rescalers"] == indexes[1]["rescalers"] and outputs[0] == outputs[1]
    # a resumed run takes every shard's sums from its journal (JSON lists, not arrays): same index
    (tmp_path / "many" / "manifest.json").unlink()
    method = {"name": "emr", "rescale_mode": mode, "alpha": 0.7}
    again = run_merge(config_for(base_dir, task_dirs, tmp_path / "many", method, **MANY), quiet=True)
    assert again.state.value == "resume" and again.shards_run == 0 and again.shards_reused > 3
    assert json.loads((tmp_path / "many" / "compressed/index.json").read_text()) == indexes[0]
    # and the two modes really differ on this family (the test could not tell them apart otherwise)
    base = load_dir(base_dir)
    other = emr_reference(base, [load_dir(p) for _, p in task_dirs], "paper" if mode == "code" else "code")[3]
    got = np.array([indexes[0]["rescalers"][n] for n, _ in task_dirs])
    assert np.abs(other / got - 1).max() > 1e-3


def test_emr_one_task_is_the_task_itself(ray_session, family, tmp_path):
    base_dir, task_dirs = family(tasks=1, hidden=16, dtype=torch.bfloat16, seed=3)
    method = {"name": "emr", "store_dtype": "float32"}  # alpha default 1.0: model/ = base + tau_uni
    report = run_merge(config_for(base_dir, task_dirs, tmp_path / "run", method, **MANY), quiet=True)
    assert report.manifest["emr"]["rescalers"] == {task_dirs[0][0]: 1.0}
    assert report.manifest["method"]["alpha"] == 1.0 and report.manifest["method"]["rescale_mode"] == "code"
    want = load_dir(task_dirs[0][1])
    reconstruct(str(tmp_path / "run"), task_dirs[0][0], str(tmp_path / "rebuilt"), StorageOptions(), quiet=True)
    for got in (load_dir(tmp_path / "run" / "model"), load_dir(tmp_path / "rebuilt")):
        assert got.keys() == want.keys()
        for n in want:
            assert torch.equal(got[n], want[n]), n


def test_emr_kernel_reference_case_and_zero_mean_elects_minus():
    from kernels import kernel

    taus = torch.tensor(
        [
            [0.5, 0.45, 0.1, 0.8, 0.0, -0.3, 0.5, 0.0],
            [-0.5, 0.4, 0.1, -0.15, 0.0, -0.35, -0.5, -0.0],
            [0.45, -0.3, 0.5, -0.05, 0.0, 0.2, 0.0, 0.0],
        ]
    )
    _, out = kernel("emr", taus, alpha=1.0)
    # sums 0.45 0.55 0.7 0.6 0 -0.45 0 0: columns 4, 6, 7 have mean exactly 0 and elect -1
    assert out.masks.tolist() == [
        [True, True, True, True, False, True, False, False],
        [False, True, True, False, False, True, True, False],
        [True, False, True, False, False, False, False, False],
    ]
    assert out.delta.tolist() == pytest.approx([0.5, 0.45, 0.5, 0.8, 0.0, -0.35, -0.5, 0.0])
    assert torch.equal(out.tau_mtl, out.delta)  # the bundle's tau_uni is model/'s delta
    assert not bool(torch.signbit(out.delta[[4, 7]]).any())  # no -0.0 where no task agrees


def test_exact_sums_are_exact():
    from fractions import Fraction

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=gen) * 1e-3
    x[::7] = 0.0
    x[1], x[2], x[3], x[4] = 1e-45, -3e38, -0.0, 7e-39  # smallest subnormal, near the largest, -0, subnormal
    masks = torch.rand(3, 5000, generator=gen) > 0.5
    exact = [Fraction(float(v)) for v in x.abs()]
    assert Fraction(exact_abs_sum(x), 2**150) == sum(exact)
    for t, got in enumerate(exact_masked_sums(x, masks)):
        assert Fraction(got, 2**150) == sum(v for v, keep in zip(exact, masks[t].tolist()) if keep)


def test_emr_alpha_auto_selects_on_the_suite(ray_session, tiny_suite, tmp_path):
    root, names = tiny_suite
    raw = {
        "base": str(root / "base"),
        "tasks": [{"name": n, "checkpoint": str(root / n)} for n in names],
        "output": str(tmp_path / "auto"),
        "method": {"name": "emr", "alpha": "auto", "store_dtype": "float32"},
        "selection": {"evaluator": "mergeflow.dev.suite.models:evaluate", "alphas": [0.5, 1.0]},
    }
    report = run_merge(config_from_dict(raw), quiet=True)
    chosen = report.manifest["selection"]["alpha"]["chosen"]
    assert chosen in (0.5, 1.0) and report.manifest["method"]["alpha"] == chosen
    index = json.loads((tmp_path / "auto" / "compressed/index.json").read_text())
    uni = bundle_files(tmp_path / "auto", index["tau_uni"]["files"])
    base, model = load_dir(root / "base"), load_dir(tmp_path / "auto" / "model")
    for n in base:  # the engine's formula: theta_0 + alpha * tau_uni in float32
        assert torch.equal(model[n], torch.mul(uni[n], chosen).add_(base[n].float()).to(base[n].dtype)), n
    assert set(index["rescalers"]) == set(names) and all(v > 0 for v in index["rescalers"].values())


# -------------------------------------------------------------------- RegMean reference (float64)


def regmean_reference(base, tasks, stats, ratio: float) -> dict[str, torch.Tensor]:
    """theta_0 + Delta* per tensor in float64, from the statistics files by hand: mean Grams, shrunk
    off-diagonals, W* = W_0 + [(sum G~)^-1 sum G~_t tau_t^T]^T (inputs no task reaches: the mean)."""
    out = {}
    for n in float_names(base):
        b = base[n].double()
        taus = [t[n].double() - b for t in tasks]
        if GRAM + n not in stats[0]:
            out[n] = b + sum(taus) / len(taus)
            continue
        grams = []
        for s in stats:
            g = s[GRAM + n].double() / float(s[ROWS + n])
            grams.append(ratio * g + (1 - ratio) * torch.diag(torch.diagonal(g)))
        total = sum(grams)
        live = torch.diagonal(total) != 0
        rhs = sum(g @ tau.T for g, tau in zip(grams, taus))  # (in, out)
        delta = torch.empty_like(b)
        delta[:, live] = torch.linalg.solve(total[live][:, live], rhs[live]).T
        delta[:, ~live] = (sum(taus) / len(taus))[:, ~live]
        out[n] = b + delta
    return out


@pytest.fixture(scope="module")
def suites(tiny_suite, tmp_path_factory):
    """The tiny suite as it is (fp32) and a bf16 copy of its checkpoints (same tasks, own statistics)."""
    root, names = tiny_suite
    bf16 = tmp_path_factory.mktemp("suite_bf16") / "suite"
    for d in ["base", *names]:
        (bf16 / d).mkdir(parents=True)
        sd = load_file(root / d / "model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, bf16 / d / "model.safetensors")
        shutil.copy(root / d / "config.json", bf16 / d / "config.json")
    shutil.copy(root / "suite.json", bf16 / "suite.json")
    return {torch.float32: root, torch.bfloat16: bf16}, names, tmp_path_factory.mktemp("regmean_cache")


def regmean_run(suite_dir, names, out, cache, execution, **method):
    doc = {"name": "regmean", "model": LOT_MODEL, "exemplars": 48, "stats_cache": str(cache), **method}
    tasks = [(n, suite_dir / n) for n in names]
    return run_merge(config_for(suite_dir / "base", tasks, out, doc, **execution), quiet=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_regmean_sharded_and_one_shard_equal_the_reference(ray_session, suites, tmp_path, dtype):
    dirs, names, cache = suites
    suite_dir = dirs[dtype]
    base = load_dir(suite_dir / "base")
    tasks = [load_dir(suite_dir / n) for n in names]
    for layout, execution in (("many", MANY), ("one", ONE)):
        report = regmean_run(suite_dir, names, tmp_path / layout, cache, execution)
        m = report.manifest
        assert len(report.plan.shards) > (2 if layout == "many" else 0)
        assert m["method"]["alpha"] == 0.95 and m["method"]["scale"] == 1.0
        assert m["regmean"]["linear_weights"] == 3 and m["regmean"]["pinv_fallback"] == []
        stats = [load_stats(m["lot"]["stats"][n]) for n in names]
        want = regmean_reference(base, tasks, stats, 0.95)
        got = load_dir(tmp_path / layout / "model")
        assert got.keys() == base.keys()
        for n, w in want.items():
            assert got[n].dtype == dtype
            assert_rounded(got[n], w, base[n].double().abs() + (w - base[n].double()).abs(), f"{layout} {n}")
        # and it is not the plain mean (the Grams matter on the suite's linear weights)
        mean = sum(t["backbone.2.weight"].double() for t in tasks) / 3
        assert (got["backbone.2.weight"].double() - mean).abs().max() > 1e-3


def test_regmean_ratio_zero_is_a_per_input_weighted_mean(ray_session, suites, tmp_path):
    """alpha 0: diagonal Grams, so column j of Delta* is sum_t d_t[j] tau_t[:, j] / sum_t d_t[j] with
    d_t the diagonal of task t's mean Gram (the input's mean energy)."""
    dirs, names, cache = suites
    suite_dir = dirs[torch.float32]
    report = regmean_run(suite_dir, names, tmp_path / "run", cache, ONE, alpha=0.0)
    assert report.manifest["method"]["alpha"] == 0.0
    stats = [load_stats(report.manifest["lot"]["stats"][n]) for n in names]
    base = load_dir(suite_dir / "base")
    tasks = [load_dir(suite_dir / n) for n in names]
    got = load_dir(tmp_path / "run" / "model")
    for n in ("backbone.0.weight", "backbone.2.weight", "backbone.4.weight"):
        d = torch.stack([torch.diagonal(s[GRAM + n].double()) / float(s[ROWS + n]) for s in stats])  # (T, in)
        taus = torch.stack([t[n].double() - base[n].double() for t in tasks])  # (T, out, in)
        total = d.sum(0)
        weighted = (d[:, None, :] * taus).sum(0) / torch.where(total > 0, total, 1.0)
        delta = torch.where(total > 0, weighted, taus.mean(0))
        want = base[n].double() + delta
        assert_rounded(got[n], want, base[n].double().abs() + delta.abs(), n)


def test_regmean_formulas_equal_grams_one_task_and_dead_inputs():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    x[:, 4] = 0.0  # an input no exemplar reaches
    gram = x.T @ x / 40
    taus = [torch.randn(3, 6, generator=gen, dtype=torch.float64) for _ in range(4)]
    mean = sum(taus) / 4
    for ratio in (0.0, 0.5, 0.95, 1.0):
        torch.testing.assert_close(regmean_delta(taus, [gram] * 4, ratio), mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(regmean_delta(taus[:1], [gram], ratio), taus[0], rtol=1e-10, atol=1e-12)
    # different Grams: the least-squares solution, not the mean; the dead column is still the mean
    grams = [
        gram * (1 + t) + torch.diag(torch.rand(6, generator=gen, dtype=torch.float64)) * (t != 4) for t in range(4)
    ]
    for g in grams:
        g[4, :] = 0.0
        g[:, 4] = 0.0
    got = regmean_delta(taus, grams, 1.0)
    live = [0, 1, 2, 3, 5]
    want = torch.linalg.solve(
        sum(g[live][:, live] for g in grams), sum(g[live][:, live] @ t[:, live].T for g, t in zip(grams, taus))
    ).T
    torch.testing.assert_close(got[:, live], want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[:, 4], mean[:, 4], rtol=1e-12, atol=0)
    assert (got[:, live] - mean[:, live]).abs().max() > 1e-3


def test_regmean_equal_grams_through_the_shard_worker_give_the_mean(family, tmp_path):
    """Hand-written statistics files (no model run): every task's mean Gram the same, with different
    row counts, so every linear weight comes out as the mean task vector; biases too."""
    from mergeflow.workers.shard import merge_shard
    from mergeflow.workflows.plan import make_plan

    base_dir, task_dirs = family(tasks=3, hidden=16, dtype=torch.float32, seed=2)
    base = load_dir(base_dir)
    linear = [n for n in float_names(base) if n.endswith("proj.weight")]
    stats = []
    for t in range(3):
        doc = {}
        for n in linear:
            width = base[n].shape[1]
            x = torch.randn(2 * width, width, generator=torch.Generator().manual_seed(len(n)), dtype=torch.float64)
            rows = 10.0 * (t + 1)
            doc[GRAM + n] = x.T @ x / (2 * width) * rows  # sums: the mean Gram is the same for every task
            doc[ROWS + n] = torch.tensor([rows], dtype=torch.float64)
        path = tmp_path / f"stats{t}.safetensors"
        save_file(doc, path)
        stats.append(str(path))
    cfg = config_for(base_dir, task_dirs, tmp_path / "run", {"name": "regmean", "model": LOT_MODEL, "alpha": 0.6})
    plan = make_plan(cfg)
    for spec in plan.shards:
        merge_shard(spec.with_globals(lot_stats=tuple(stats)))
    got = {}
    for f in sorted((tmp_path / "run" / "model").glob("model-*.safetensors")):  # no index: no commit here
        got |= load_file(f)
    tasks = [load_dir(p) for _, p in task_dirs]
    for n in float_names(base):
        b = base[n].double()
        delta = sum(t[n].double() - b for t in tasks) / 3
        assert_rounded(got[n], b + delta, b.abs() + delta.abs(), n)


def test_regmean_reuses_lot_statistics(ray_session, tiny_suite, tmp_path):
    root, names = tiny_suite
    tasks = [(n, root / n) for n in names]
    cache = tmp_path / "cache"
    lot = {"name": "lot", "model": LOT_MODEL, "exemplars": 32, "stats_cache": str(cache)}
    first = run_merge(config_for(root / "base", tasks, tmp_path / "lot", lot), quiet=True)
    assert first.manifest["lot"]["features_computed"] == 3
    reg = dict(lot, name="regmean")
    second = run_merge(config_for(root / "base", tasks, tmp_path / "regmean", reg), quiet=True)
    doc = second.manifest["lot"]
    assert (doc["features_computed"], doc["features_reused"]) == (0, 3)
    assert doc["stats"] == first.manifest["lot"]["stats"] and len(list(cache.iterdir())) == 3
    from mergeflow.workflows.inspect_run import describe

    text = describe(str(tmp_path / "regmean"), StorageOptions())
    assert "RegMean     3 linear weight(s)" in text and "0 computed, 3 reused" in text


@pytest.mark.parametrize(
    "method,key",
    [
        ({"name": "emr", "rescale_mode": "mean"}, "method.rescale_mode"),
        ({"name": "emr", "alpha": "sometimes"}, "method.alpha"),
        ({"name": "regmean", "model": LOT_MODEL, "alpha": 1.5}, "method.alpha"),
        ({"name": "regmean", "model": LOT_MODEL, "lambda": 1.0}, "method.lambda"),
        ({"name": "regmean"}, "method.model"),
    ],
)
def test_bad_parameters_fail_in_one_line_naming_the_key(method, key, tmp_path):
    raw = {
        "base": str(tmp_path),
        "tasks": [{"name": "a", "checkpoint": str(tmp_path)}],
        "output": "o",
        "method": method,
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"{key}:" in msg, msg
