"""model/ as one model.safetensors when it fits execution.max_file_size, an indexed set of parts
otherwise: the same tensors either way, bundles rebuilt the same, nothing stale left behind."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import config_for
from safetensors.torch import load_file

from mergeflow.infra.storage import StorageOptions
from mergeflow.workflows.merge import run_merge
from mergeflow.workflows.reconstruct import reconstruct


def merge(family_dirs, out, method, **execution):
    base, tasks = family_dirs
    return run_merge(config_for(base, tasks, out, method, shard_size=3000, **execution), quiet=True)


def part_files(folder):
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


def test_small_model_is_one_file_with_the_parts_tensors(ray_session, family, tmp_path):
    fam = family(tasks=3, shards=2)
    one = merge(fam, tmp_path / "one", {"name": "ties", "density": 0.4})
    parts = merge(fam, tmp_path / "parts", {"name": "ties", "density": 0.4}, max_file_size=0)
    assert len(parts.plan.shards) > 2  # several shards, joined into one file
    assert part_files(tmp_path / "one" / "model") == [] and (tmp_path / "one" / "model" / "model.safetensors").exists()
    assert len(part_files(tmp_path / "parts" / "model")) == len(parts.plan.shards)
    assert not (tmp_path / "parts" / "model" / "model.safetensors").exists()

    single = load_file(tmp_path / "one" / "model" / "model.safetensors")
    joined = {}
    for name in part_files(tmp_path / "parts" / "model"):
        joined |= load_file(tmp_path / "parts" / "model" / name)
    assert single.keys() == joined.keys()
    for name, t in joined.items():
        assert torch.equal(single[name], t), name
    # the manifest's sha256 is the file's, the index points every tensor at it, the layout is recorded
    entry = one.manifest["outputs"]["model/model.safetensors"]
    data = (tmp_path / "one" / "model" / "model.safetensors").read_bytes()
    assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert not [rel for rel in one.manifest["outputs"] if rel.startswith("model/model-")]
    index = json.loads((tmp_path / "one" / "model" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert one.manifest["model_parts"] == {s.part: [j.name for j in s.tensors] for s in one.plan.shards}


def test_a_limit_below_the_model_keeps_parts(ray_session, family, tmp_path):
    fam = family(tasks=2, shards=2)
    report = merge(fam, tmp_path / "run", {"name": "task_arithmetic"}, max_file_size=1000)
    assert len(part_files(tmp_path / "run" / "model")) == len(report.plan.shards)
    assert "model_parts" not in report.manifest


def test_bundles_rebuild_the_same_from_one_file_or_parts(ray_session, family, tmp_path):
    fam = family(tasks=3, shards=2)
    task = fam[1][1][0]
    rebuilt = {}
    for layout, execution in (("one", {}), ("parts", {"max_file_size": 0})):
        merge(fam, tmp_path / layout, {"name": "tall_masks", "lambda": 0.4}, **execution)
        out = tmp_path / f"rebuilt-{layout}"
        reconstruct(str(tmp_path / layout), task, str(out), StorageOptions(), quiet=True)
        rebuilt[layout] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert rebuilt["one"] == rebuilt["parts"]


def test_changing_the_layout_leaves_no_stale_file(ray_session, family, tmp_path):
    fam = family(tasks=2, shards=2)
    merge(fam, tmp_path / "run", {"name": "task_arithmetic"})
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    base, tasks = fam
    cfg = config_for(base, tasks, tmp_path / "run", {"name": "task_arithmetic", "alpha": 0.5}, max_file_size=0)
    run_merge(cfg, overwrite=True, quiet=True)
    assert not (tmp_path / "run" / "model" / "model.safetensors").exists()  # transformers would load it first
    assert part_files(tmp_path / "run" / "model")


@pytest.mark.parametrize("value,needle", [(-1, "must be a size"), ("lots", "not a size")])
def test_bad_max_file_size_is_one_line(tmp_path, value, needle):
    from mergeflow.errors import ConfigError
    from mergeflow.workflows.config import config_from_dict

    raw = {"base": "b", "tasks": [{"name": "t", "checkpoint": "c"}], "output": "o", "method": {"name": "ties"}}
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(raw | {"execution": {"max_file_size": value}}, root=tmp_path)


@pytest.mark.parametrize("tamper", ["escape", "missing"])
def test_reconstruct_refuses_a_crafted_shard_layout(ray_session, family, tmp_path, tamper):
    from mergeflow.errors import CheckpointError

    fam = family(tasks=2, shards=2)
    merge(fam, tmp_path / "run", {"name": "tall_masks"})
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    part, names = next(iter(manifest["model_parts"].items()))
    if tamper == "escape":
        manifest["model_parts"]["../../../escaped"] = manifest["model_parts"].pop(part)
    else:
        manifest["model_parts"][part] = names[1:]
    path.write_text(json.dumps(manifest))
    needle = "names a model part '../../../escaped'" if tamper == "escape" else "no model_parts covering model/"
    with pytest.raises(CheckpointError, match=needle):
        reconstruct(str(tmp_path / "run"), fam[1][0][0], str(tmp_path / "out"), StorageOptions(), quiet=True)
    assert not list(tmp_path.rglob("escaped*"))
