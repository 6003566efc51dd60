"""LOT end to end on a tiny digits suite (3 tasks, hidden 64): `mergeflow merge` with `name: lot`
through a real local Ray runtime, the statistics cache, the drift LOT minimises against TA and
TIES on the suite's real layers, and one-line errors for bad model sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import config_for
from safetensors.torch import load_file

from mergeflow.dev.suite.models import LOT_MODEL, backbone_module, load_backbone, lot_exemplars
from mergeflow.workers.methods.lot import solve
from mergeflow.workers.methods.lot.features import ENERGY, GRAM, ROWS, collect, load_stats
from mergeflow.workers.methods.lot.rules import merge_state_dicts
from mergeflow.workflows.cli import main
from mergeflow.workflows.merge import run_merge

LINEARS = [f"backbone.{i}.weight" for i in (0, 2, 4)]


@pytest.fixture
def suite(tiny_suite):
    return tiny_suite


def write_config(path, suite_dir, names, output, method: dict) -> str:
    doc = {
        "base": str(suite_dir / "base"),
        "tasks": [{"name": n, "checkpoint": str(suite_dir / n)} for n in names],
        "output": str(output),
        "method": method,
    }
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def merged(run) -> dict[str, torch.Tensor]:
    return load_backbone(run / "model")


def test_cli_merge_lot_matches_the_solve_and_reuses_cached_statistics(ray_session, suite, tmp_path, capsys):
    suite_dir, names = suite
    cache = tmp_path / "cache"
    cfg = write_config(
        tmp_path / "lot.yaml",
        suite_dir,
        names,
        tmp_path / "run1",
        {"name": "lot", "model": LOT_MODEL, "exemplars": 32, "stats_cache": str(cache)},
    )
    assert main(["merge", cfg, "--quiet", "--no-tracking"]) == 0
    out = capsys.readouterr().out
    assert "merged 3 tasks with lot" in out and "3 computed, 0 reused" in out
    m1 = json.loads((tmp_path / "run1" / "manifest.json").read_text())
    lot = m1["lot"]
    assert (lot["features_computed"], lot["features_reused"]) == (3, 0)
    assert lot["rules"] == {"linear": 3, "norm_scale": 0, "additive": 3, "mean": 0}
    # 3 tasks x 32 exemplars = 96 feature rows for 64 inputs per layer: flagged as thin
    assert lot["thin_layers"] == {name: [96, 64] for name in LINEARS}
    assert m1["method"]["lambda"] == 1.0 and m1["method"]["model"] == LOT_MODEL and m1["method"]["exemplars"] == 32
    assert {"method_passes", "merge"} <= set(m1["timings"])
    files = sorted(cache.iterdir())
    assert len(files) == 3 and sorted(str(f) for f in files) == sorted(lot["stats"].values())
    stamps = {f: f.stat().st_mtime_ns for f in files}

    # the merged model is base + Delta* from the statistics, rule by rule (brute-force, whole tensors)
    base = load_backbone(suite_dir / "base")
    tasks = [load_backbone(suite_dir / n) for n in names]
    stats = [load_stats(lot["stats"][n]) for n in names]
    assert all(s[ROWS + "backbone.0.bias"].item() == 32 for s in stats)  # 32 exemplars, one row each
    assert not any(k.startswith(ENERGY) for k in stats[0])  # the suite MLP has no norm layers
    got = merged(tmp_path / "run1")
    for name in LINEARS:
        delta = solve.linear_delta([t[name] - base[name] for t in tasks], [s[GRAM + name] for s in stats])
        torch.testing.assert_close(got[name], base[name] + delta.float(), rtol=0, atol=2e-6)
    bias = "backbone.2.bias"
    torch.testing.assert_close(
        got[bias], base[bias] + torch.stack([t[bias] - base[bias] for t in tasks]).mean(0), rtol=0, atol=2e-6
    )  # equal rows per task: the row-weighted mean is the mean

    # a new output, same checkpoints and exemplars: the statistics come from the cache, untouched
    assert main(["merge", cfg, "--output", str(tmp_path / "run2"), "--quiet", "--no-tracking"]) == 0
    m2 = json.loads((tmp_path / "run2" / "manifest.json").read_text())
    assert (m2["lot"]["features_computed"], m2["lot"]["features_reused"]) == (0, 3)
    assert m2["lot"]["stats"] == lot["stats"]
    assert {f: f.stat().st_mtime_ns for f in sorted(cache.iterdir())} == stamps
    a = (tmp_path / "run1" / "model" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "run2" / "model" / "model.safetensors").read_bytes()

    # other exemplars: a different key, so computed again
    cfg64 = write_config(
        tmp_path / "lot64.yaml",
        suite_dir,
        names,
        tmp_path / "run3",
        {"name": "lot", "model": LOT_MODEL, "exemplars": 64, "lambda": 0.5, "stats_cache": str(cache)},
    )
    assert main(["merge", cfg64, "--quiet", "--no-tracking"]) == 0
    m3 = json.loads((tmp_path / "run3" / "manifest.json").read_text())
    assert m3["lot"]["features_computed"] == 3 and len(list(cache.iterdir())) == 6
    assert m3["method"]["lambda"] == 0.5 and m3["lot"]["thin_layers"] == {}  # 192 rows for 64 inputs


def test_lot_drift_is_at_most_task_arithmetic_and_ties(ray_session, suite, tmp_path):
    """LOT's linear solution minimises sum_t ||X_t (W - W_t)^T||^2 on each layer, so any other merge
    (TA, TIES, at their default scales) drifts at least as much on the same features."""
    suite_dir, names = suite
    tasks = [(n, suite_dir / n) for n in names]
    runs = {}
    for method in ({"name": "lot", "model": LOT_MODEL}, {"name": "task_arithmetic"}, {"name": "ties"}):
        report = run_merge(config_for(suite_dir / "base", tasks, tmp_path / method["name"], method), quiet=True)
        runs[method["name"]] = merged(tmp_path / method["name"])
        if method["name"] == "lot":
            stats = [load_stats(report.manifest["lot"]["stats"][n]) for n in names]
    finetuned = [load_backbone(p) for _, p in tasks]
    for name in LINEARS:
        grams = [s[GRAM + name] for s in stats]
        drift = {k: solve.feature_drift(w[name], [f[name] for f in finetuned], grams) for k, w in runs.items()}
        assert drift["lot"] <= drift["task_arithmetic"] * (1 + 1e-6), (name, drift)
        assert drift["lot"] <= drift["ties"] * (1 + 1e-6), (name, drift)
        assert drift["lot"] < drift["task_arithmetic"]  # and strictly better on real, interfering tasks

    # the single-process reference: statistics and the whole merge in memory (workers/lot/rules.py)
    reference = merge_state_dicts(
        load_backbone(suite_dir / "base"),
        finetuned,
        [collect(backbone_module(f), [lot_exemplars(n, 0)]) for f, n in zip(finetuned, names)],
    )
    for name, w in reference.items():
        torch.testing.assert_close(runs["lot"][name], w, rtol=0, atol=2e-6)


def test_bad_model_sources_fail_in_one_line(ray_session, suite, tmp_path, capsys):
    suite_dir, names = suite

    def run(method: dict, where=suite_dir) -> str:
        cfg = write_config(tmp_path / "bad.yaml", where, names, tmp_path / "bad", method)
        assert main(["merge", cfg, "--quiet", "--no-tracking", "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "method.model" in run({"name": "lot"})  # no model source at all
    assert "cannot import module 'no_such_pkg.mod'" in run({"name": "lot", "model": "no_such_pkg.mod:build"})
    assert "no function 'nope'" in run({"name": "lot", "model": "mergeflow.dev.suite.models:nope"})
    assert "not hf or a hook" in run({"name": "lot", "model": "suite_please"})
    assert "exemplar_files: no token-id file for task 'identity'" in run({"name": "lot", "model": "hf"})
    assert "method.lambda: " in run({"name": "lot", "model": LOT_MODEL, "lambda": {n: 1.0 for n in names}})
    assert "method.alpha: unknown key for method lot" in run({"name": "lot", "model": LOT_MODEL, "alpha": 0.5})
    # checkpoints outside a suite: no suite.json next to them
    lone = tmp_path / "lone"
    for d in ["base", *names]:
        shutil.copytree(suite_dir / d, lone / d)
    err = run({"name": "lot", "model": LOT_MODEL}, where=lone)
    assert f"suite.json at {lone / 'suite.json'}" in err and err.split("task '")[1].split("'")[0] in names


class Backbone(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x)


def hook_build(checkpoint: str, task: str, exemplars: int, seed: int):
    """A user hook: the suite's backbone under the checkpoint's names, and the first exemplars."""
    from mergeflow.dev.suite.models import SuiteMLP, task_data

    state = load_file(f"{checkpoint}/model.safetensors")
    model = SuiteMLP(hidden=state["backbone.0.weight"].shape[0])
    model.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()})
    x, _ = task_data(task, 0, "train")
    return Backbone(model.backbone), (x[i : i + 8] for i in range(0, exemplars, 8))


def test_user_hook_statistics_and_cache(suite, tmp_path):
    """The hook path in the worker itself (no Ray: a hook must be importable wherever workers run)."""
    from mergeflow.dev.suite.models import task_data
    from mergeflow.infra.storage import sha256_of
    from mergeflow.workers.checkpoint import open_checkpoint
    from mergeflow.workers.methods.lot.features import FeatureJob, task_features
    from mergeflow.workers.methods.lot.models import TaskModelSpec

    suite_dir, _ = suite
    cp = open_checkpoint(str(suite_dir / "rot90"))
    job = FeatureJob(
        TaskModelSpec("test_lot_pipeline:hook_build", cp.uri, "rot90", 20, 0),
        tuple(cp.tensors),
        str(tmp_path / "cache"),
    )
    hashes = [sha256_of(f) for f in cp.files]
    first = task_features(job, *hashes)
    assert not first.reused and first.task == "rot90"
    stats = load_stats(first.uri)
    assert stats[ROWS + "backbone.0.bias"].item() == 24  # three batches of 8: the hook decides, not `exemplars`
    x, _ = task_data("rot90", 0, "train")
    torch.testing.assert_close(stats[GRAM + "backbone.0.weight"], x[:24].double().T @ x[:24].double())
    again = task_features(job, *hashes)
    assert again.reused and again.uri == first.uri and set(again.keys) == set(stats)
    assert again.linear_rows == first.linear_rows == {name: 24 for name in LINEARS}


def test_lambda_auto_selects_on_validation_and_equals_a_direct_merge(ray_session, suite, tmp_path):
    """`lambda: auto` is alpha selection for LOT: the map writes Delta* unscaled (delta/), the
    chosen lambda is applied afterwards; the model equals a direct LOT merge with that lambda."""
    from mergeflow.workflows.config import config_from_dict

    suite_dir, names = suite
    raw = {
        "base": str(suite_dir / "base"),
        "tasks": [{"name": n, "checkpoint": str(suite_dir / n)} for n in names],
        "method": {"name": "lot", "model": LOT_MODEL, "lambda": "auto", "stats_cache": str(tmp_path / "cache")},
        "selection": {"evaluator": "mergeflow.dev.suite.models:evaluate", "alphas": [0.5, 1.0, 1.5]},
    }
    auto = run_merge(config_from_dict(raw | {"output": str(tmp_path / "auto")}), quiet=True)
    chosen = auto.manifest["selection"]["alpha"]["chosen"]
    assert chosen in (0.5, 1.0, 1.5) and auto.manifest["method"]["lambda"] == chosen
    assert len(auto.manifest["selection"]["alpha"]["trials"]) == 3
    direct = dict(raw, method=raw["method"] | {"lambda": chosen})
    direct.pop("selection")
    again = run_merge(config_from_dict(direct | {"output": str(tmp_path / "direct")}), quiet=True)
    assert again.manifest["lot"]["features_reused"] == 3
    part = "model/model.safetensors"
    assert (tmp_path / "auto" / part).read_bytes() == (tmp_path / "direct" / part).read_bytes()


def test_remerge_adding_a_task_runs_only_the_new_task_model(ray_session, suite, tmp_path):
    """`mergeflow remerge` keeps one statistics cache under its root: adding a task computes that
    task's features only, and the result equals a from-scratch LOT merge of all tasks."""
    from mergeflow.workflows.remerge import remerge

    suite_dir, names = suite
    tasks = [(n, suite_dir / n) for n in names]
    method = {"name": "lot", "model": LOT_MODEL}
    root = tmp_path / "root"
    first = remerge(config_for(suite_dir / "base", tasks[:2], root, method), quiet=True)
    assert first.report.manifest["lot"]["features_computed"] == 2
    added = remerge(config_for(suite_dir / "base", tasks, root, method), quiet=True)
    lot_doc = added.report.manifest["lot"]
    assert (lot_doc["features_computed"], lot_doc["features_reused"]) == (1, 2)
    assert lot_doc["stats_cache"] == str(root / ".lot_stats")
    scratch = run_merge(config_for(suite_dir / "base", tasks, tmp_path / "scratch", method), quiet=True)
    assert scratch.manifest["lot"]["features_computed"] == 3  # its own cache: computed again, same statistics
    part = "model/model.safetensors"
    assert (tmp_path / "scratch" / part).read_bytes() == (Path(added.run) / part).read_bytes()
