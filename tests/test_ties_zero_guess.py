"""Global TIES thresholds of 0 guessed from the sample and checked by the apply pass: the result
is the exact merge whether the guess holds or not, and a resumed run never mixes shards merged
with different thresholds."""

from __future__ import annotations

import json

import reference_impl as ref
import torch
from conftest import config_for
from safetensors.torch import load_file, save_file
from test_sharded_equals_reference import load_checkpoint, load_dir

from mergeflow.infra.storage import StorageOptions
from mergeflow.workers import kth_value
from mergeflow.workers.methods.ties.thresholds import _phase
from mergeflow.workflows.inspect_run import describe
from mergeflow.workflows.merge import run_merge


def _rewrite_tasks(base_dir, task_dirs, equal_to_base):
    """Set each task's float values to the base's where equal_to_base(task index, name, flat tensor) is True."""
    base = load_file(base_dir / "model.safetensors")
    for i, (_, path) in enumerate(task_dirs):
        sd = load_file(path / "model.safetensors")
        for name, t in sd.items():
            if t.is_floating_point():
                flat = t.reshape(-1)
                keep = equal_to_base(i, name, flat)
                sd[name] = torch.where(keep, base[name].reshape(-1), flat).reshape(t.shape)
        save_file(sd, path / "model.safetensors")


def _sampled(name, flat):
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    for lo, hi in kth_value.sample_ranges(flat.numel(), _phase(name)):
        mask[lo:hi] = True
    return mask


def _assert_reference(cfg, base_dir, task_dirs, out):
    p = cfg.method.params
    want = ref.merge(
        load_checkpoint(base_dir),
        [load_checkpoint(d) for _, d in task_dirs],
        "ties",
        alpha=p.alpha,
        density=p.density,
        scope="global",
        merge=p.merge,
    )
    got = load_dir(out / "model")
    assert got.keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got[name], tensor), name


def _globals(out):
    return json.loads((out / ".mergeflow" / "globals.json").read_text())


def test_sparse_task_vectors_take_no_threshold_pass(ray_session, family, tmp_path):
    base_dir, task_dirs = family(tasks=3, layers=3, hidden=32, vocab=64)
    # most values keep the base's, as in bf16 fine-tunes: each task's k-th |tau| is 0 at density 0.5
    _rewrite_tasks(
        base_dir,
        task_dirs,
        lambda i, name, flat: torch.rand(flat.numel(), generator=torch.Generator().manual_seed(i)) < 0.8,
    )
    out = tmp_path / "run"
    cfg = config_for(base_dir, task_dirs, out, {"name": "ties", "density": 0.5}, shard_size=5_000, chunk_elems=256)
    report = run_merge(cfg, quiet=True)
    assert report.manifest["ties"]["zero_guess"] == "confirmed"
    assert report.manifest["ties"]["thresholds"] == [0.0, 0.0, 0.0]
    assert "zeros_to_check" not in _globals(out)
    _assert_reference(cfg, base_dir, task_dirs, out)
    assert "0 from the sample, confirmed" in describe(str(out), StorageOptions())


def test_a_misleading_sample_costs_a_second_merge_not_exactness(ray_session, family, tmp_path):
    base_dir, task_dirs = family(tasks=3, layers=3, hidden=32, vocab=64)
    # tau is 0 exactly where the sample looks and dense everywhere else
    _rewrite_tasks(base_dir, task_dirs, lambda i, name, flat: _sampled(name, flat))
    out = tmp_path / "run"
    cfg = config_for(base_dir, task_dirs, out, {"name": "ties", "density": 0.5}, shard_size=5_000, chunk_elems=256)
    report = run_merge(cfg, quiet=True)
    assert report.manifest["ties"]["zero_guess"] == "refuted"
    assert all(t > 0 for t in report.manifest["ties"]["thresholds"])
    assert report.shards_run >= 2 * len(report.plan.shards)  # merged with 0, then with the exact ones
    _assert_reference(cfg, base_dir, task_dirs, out)

    # Resume: journaled shards merged with other thresholds than the run's are never reused
    exact = _globals(out)
    records = sorted((out / ".mergeflow" / "shards").glob("*.json"))
    assert {tuple(json.loads(r.read_text())["globals_used"]["thresholds"]) for r in records} == {
        tuple(exact["thresholds"])
    }
    numel = sum(t.numel() for t in load_checkpoint(base_dir).values() if t.is_floating_point())
    k = kth_value.kth_rank(numel, 0.5)
    (out / "manifest.json").unlink()  # as if killed after the guess, before its check
    (out / ".mergeflow" / "globals.json").write_text(json.dumps({"thresholds": [0.0] * 3, "zeros_to_check": [k] * 3}))
    resumed = run_merge(cfg, quiet=True)
    assert resumed.shards_reused == 0 and resumed.manifest["ties"]["zero_guess"] == "refuted"
    _assert_reference(cfg, base_dir, task_dirs, out)
    # Shards merged with thresholds of 0 (here from a check forged to hold) are not reused once the
    # run's thresholds are the exact ones again
    (out / "manifest.json").unlink()
    (out / ".mergeflow" / "globals.json").write_text(json.dumps({"thresholds": [0.0] * 3, "zeros_to_check": [1] * 3}))
    assert run_merge(cfg, quiet=True).manifest["ties"]["zero_guess"] == "confirmed"
    (out / "manifest.json").unlink()
    (out / ".mergeflow" / "globals.json").write_text(json.dumps(exact))
    assert run_merge(cfg, quiet=True).shards_reused == 0
    _assert_reference(cfg, base_dir, task_dirs, out)
    (out / "manifest.json").unlink()
    assert run_merge(cfg, quiet=True).shards_reused == len(report.plan.shards)  # same thresholds: all reused
