"""Property test: the sharded Ray path equals the single-process flattened reference
(tests/reference_impl.py) bit for bit, for every method, dtype and shard size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference_impl as ref
import torch
from conftest import config_for, reference_args
from safetensors.torch import load_file

from mergeflow.infra.storage import StorageOptions
from mergeflow.workflows.merge import run_merge
from mergeflow.workflows.reconstruct import reconstruct


def load_dir(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out |= load_file(path / f)
    return out


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    return load_dir(path)


def load_bundle(run, names) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """tau_MTL (as stored) and each task's unpacked masks, flattened in sorted-name order."""
    index = json.loads((run / "compressed/index.json").read_text())
    tau = {}
    for f in index["tau_mtl"]["files"]:
        tau |= load_file(run / f)
    masks = {}
    for task, files in index["masks"].items():
        packed = {}
        for f in files:
            packed |= load_file(run / f)
        masks[task] = torch.cat(
            [torch.from_numpy(np.unpackbits(packed[n].numpy(), count=tau[n].numel()).astype(bool)) for n in names]
        )
    return torch.cat([tau[n].float().flatten() for n in names]), masks


CASES = [  # (method, params, number of tasks)
    ("task_arithmetic", {"alpha": 0.3}, 8),
    ("ties", {"alpha": 1.0, "density": 0.3}, 5),
    ("ties", {"alpha": 0.7, "density": 0.2, "scope": "tensor", "merge": "sum"}, 4),
    ("tall_masks", {"alpha": 0.3, "lambda": 0.4}, 6),
    (
        "tall_masks",
        {"alpha": 0.5, "base_merge": "ties", "density": 0.4, "lambda": {"t0": 0.2, "t1": 0.6, "t2": 0.3}},
        3,
    ),
    ("consensus", {"alpha": 0.4, "k": 2}, 8),
    ("consensus", {"alpha": 1.0, "k": 3, "base_merge": "ties", "density": 0.2, "lambda": 0.5}, 5),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
@pytest.mark.parametrize("shard_size,chunk", [(4_000, 64), (10**9, 1 << 20)], ids=["many-shards", "one-shard"])
@pytest.mark.parametrize("method,params,n_tasks", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_sharded_merge_equals_reference(
    ray_session, family, tmp_path, method, params, n_tasks, dtype, shard_size, chunk
):
    if dtype == torch.float16 and shard_size > 4_000:
        pytest.skip("fp16 is covered with many shards")
    seed = abs(hash((method, json.dumps(params, sort_keys=True), str(dtype)))) % 1000
    base_dir, task_dirs = family(tasks=n_tasks, dtype=dtype, seed=seed, shards=2 if dtype == torch.float32 else 1)
    if "t0" in json.dumps(params):
        task_dirs = [(f"t{i}", p) for i, (_, p) in enumerate(task_dirs)]
    cfg = config_for(
        base_dir, task_dirs, tmp_path / "run", {"name": method, **params}, shard_size=shard_size, chunk_elems=chunk
    )
    report = run_merge(cfg, quiet=True)
    assert len(report.plan.shards) > (3 if shard_size == 4_000 else 0)

    base = load_checkpoint(base_dir)
    tasks = [load_checkpoint(p) for _, p in task_dirs]
    want = ref.merge(base, tasks, method, **reference_args(cfg))
    got = load_dir(tmp_path / "run" / "model")
    assert got.keys() == want["model"].keys()
    for name in want["model"]:
        assert got[name].dtype == base[name].dtype, name
        assert torch.equal(got[name], want["model"][name]), f"{method} {name}"

    if method in ("tall_masks", "consensus"):
        names = ref.float_names(base)
        tau_stored, masks = load_bundle(tmp_path / "run", names)
        assert torch.equal(tau_stored, want["tau_mtl"].to(dtype).float())  # stored in the base dtype
        for t, (task_name, _) in enumerate(task_dirs):
            assert torch.equal(masks[task_name], want["masks"][t]), task_name
        # reconstruct rebuilds theta_0 + m_t * tau_MTL from the bundle, for one task
        task_name = task_dirs[-1][0]
        reconstruct(str(tmp_path / "run"), task_name, str(tmp_path / "rebuilt"), StorageOptions(), quiet=True)
        rebuilt = load_dir(tmp_path / "rebuilt")
        expected = ref.rebuild(base, want["tau_mtl"].to(dtype).float(), want["masks"][-1], names)
        for name in expected:
            assert torch.equal(rebuilt[name], expected[name]), name


def test_rerun_of_finished_run_is_a_no_op(ray_session, family, tmp_path):
    base_dir, task_dirs = family(tasks=2)
    cfg = config_for(base_dir, task_dirs, tmp_path / "run", {"name": "task_arithmetic"})
    first = run_merge(cfg, quiet=True)
    stamp = (tmp_path / "run" / "manifest.json").stat().st_mtime_ns
    again = run_merge(cfg, quiet=True)
    assert again.state.value == "complete" and first.state.value == "fresh"
    assert (tmp_path / "run" / "manifest.json").stat().st_mtime_ns == stamp


def test_single_safetensors_files_as_inputs(ray_session, family, tmp_path):
    """A checkpoint may be one .safetensors file instead of a directory."""
    base_dir, task_dirs = family(tasks=3)
    cfg = config_for(
        base_dir / "model.safetensors",
        [(n, p / "model.safetensors") for n, p in task_dirs],
        tmp_path / "run",
        {"name": "task_arithmetic", "alpha": 0.5},
    )
    run_merge(cfg, quiet=True)
    base = load_checkpoint(base_dir)
    want = ref.merge(base, [load_checkpoint(p) for _, p in task_dirs], "task_arithmetic", alpha=0.5)["model"]
    got = load_dir(tmp_path / "run" / "model")
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert not (tmp_path / "run" / "model" / "config.json").exists()  # no directory, no sidecars
