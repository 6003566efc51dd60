"""The Python API (mergeflow.merge / plan / inspect / reconstruct / remerge): what the CLI does,
for notebooks and pipelines, with the same errors as exceptions."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mergeflow


def test_import_is_light_and_names_the_api():
    probe = "import sys, mergeflow; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
    assert {
        "merge",
        "plan",
        "inspect",
        "reconstruct",
        "remerge",
        "MergeflowError",
        "register_method",
        "register_backend",
    } <= set(mergeflow.__all__)


def test_merge_inspect_reconstruct_from_a_dict(ray_session, family, tmp_path):
    base, tasks = family(tasks=3)
    config = {
        "base": str(base),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
        "output": str(tmp_path / "run"),
        "method": {"name": "consensus", "k": 2},
    }
    plan = mergeflow.plan(config)
    assert plan.method.name == "consensus" and len(plan.tasks) == 3
    result = mergeflow.merge(config, tracking=False)
    assert not result.already_complete and result.mlflow_run_id is None
    assert result.manifest["method"]["k"] == 2 and result.report.shards_run == len(plan.shards)
    assert mergeflow.merge(config, tracking=False).already_complete
    info = mergeflow.inspect(result.output)
    assert "method      consensus" in info.summary and info.manifest == result.manifest and info.layers
    rebuilt = mergeflow.reconstruct(result.output, task=tasks[1][0], output=str(tmp_path / "rebuilt"))
    assert rebuilt["task"] == tasks[1][0] and (tmp_path / "rebuilt" / "model.safetensors.index.json").exists()


def test_errors_are_mergeflow_errors(tmp_path):
    with pytest.raises(mergeflow.ConfigError, match="method.name: unknown merge method 'nope'"):
        mergeflow.plan(
            {
                "base": "/b",
                "tasks": [{"name": "a", "checkpoint": "/a"}],
                "output": str(tmp_path),
                "method": {"name": "nope"},
            }
        )
    with pytest.raises(mergeflow.MergeflowError, match="no manifest.json"):
        mergeflow.inspect(str(tmp_path))
