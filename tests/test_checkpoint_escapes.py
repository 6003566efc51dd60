"""An index's weight_map decides which files a merge reads: every name in it must be a plain
`.safetensors` file in the checkpoint's own folder, or the checkpoint is refused at plan time with
one line naming the index and the entry. tasks_from discovery judges folders by the same rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mergeflow.errors import CheckpointError
from mergeflow.workers.checkpoint import INDEX_NAME, SINGLE_NAME, open_checkpoint
from mergeflow.workflows.cli import main
from mergeflow.workflows.config import config_from_dict
from mergeflow.workflows.registry import resolve


def index_to(folder: Path, entry: str, keep_single: bool = False) -> Path:
    """Make `folder` a sharded checkpoint whose index maps every tensor to `entry`."""
    from safetensors import safe_open

    single = folder / SINGLE_NAME
    with safe_open(str(single), "pt") as f:
        names = list(f.keys())
    if not keep_single:
        single.unlink()
    index = folder / INDEX_NAME
    index.write_text(json.dumps({"metadata": {}, "weight_map": {n: entry for n in names}}))
    return index


BAD = [
    "../task_01/model.safetensors",
    "ABSOLUTE",
    "/etc/passwd",
    "sub/x.safetensors",
    "..\\task_01\\model.safetensors",
    "..",
    "",
    "model.bin",
    "./model-00001.safetensors",
]


def bad_entry(tmp_path: Path, tasks, which: str) -> str:
    """`which` as an entry of task_00's index; the files it names exist, so following it would work."""
    foreign = tasks[1][1] / SINGLE_NAME
    sub = tasks[0][1] / "sub"
    sub.mkdir(exist_ok=True)
    shutil.copy(foreign, sub / "x.safetensors")
    shutil.copy(foreign, tasks[0][1] / "model-00001.safetensors")
    return str(foreign) if which == "ABSOLUTE" else which


@pytest.mark.parametrize("which", BAD)
def test_open_checkpoint_refuses_entries_outside_the_folder(tmp_path, family, which):
    base, tasks = family(tasks=2)
    entry = bad_entry(tmp_path, tasks, which)
    index = index_to(tasks[0][1], entry)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(tasks[0][1]))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith(f"{index}: weight_map entry {entry!r} is not a .safetensors file name in the checkpoint")


def write_config(tmp_path: Path, raw: dict) -> Path:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "method": {"name": "task_arithmetic"}, **raw}))
    return cfg


def refused(capsys, tmp_path: Path, cfg: Path, *needles: str) -> str:
    rc = main(["merge", str(cfg), "--quiet", "--no-tracking"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in captured.out + captured.err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()
    return err


@pytest.mark.parametrize("which", ["../task_01/model.safetensors", "ABSOLUTE", "/etc/passwd", "sub/x.safetensors"])
def test_merge_refuses_an_escaping_index(capsys, tmp_path, family, which):
    base, tasks = family(tasks=2)
    entry = bad_entry(tmp_path, tasks, which)
    index = index_to(tasks[0][1], entry, keep_single=True)  # a model.safetensors beside it changes nothing
    cfg = write_config(tmp_path, {"base": str(base), "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks]})
    refused(capsys, tmp_path, cfg, "task 'task_00'", str(index), repr(entry), "bare file name")


def registry_of(tmp_path: Path, tasks) -> Path:
    registry = tmp_path / "registry"
    registry.mkdir()
    for name, path in tasks:
        shutil.copytree(path, registry / name)
    return registry


def discovered(tmp_path: Path, base: Path, registry: Path) -> list[str]:
    cfg = config_from_dict(
        {
            "base": str(base),
            "tasks_from": str(registry),
            "output": str(tmp_path / "out"),
            "method": {"name": "task_arithmetic"},
        }
    )
    return [t.name for t in resolve(cfg).tasks]


@pytest.mark.parametrize("which", ["../task_01/model.safetensors", "ABSOLUTE", "/etc/passwd", "sub/x.safetensors"])
def test_discovery_fails_on_an_escaping_index(capsys, tmp_path, family, which):
    """Not skipped as 'still uploading': the folder is complete and wrong, and the user must hear of it."""
    base, tasks = family(tasks=2)
    registry = registry_of(tmp_path, tasks)
    (registry / "task_00" / "sub").mkdir()
    shutil.copy(registry / "task_01" / SINGLE_NAME, registry / "task_00" / "sub" / "x.safetensors")
    entry = str(registry / "task_01" / SINGLE_NAME) if which == "ABSOLUTE" else which
    index = index_to(registry / "task_00", entry, keep_single=True)
    cfg = write_config(tmp_path, {"base": str(base), "tasks_from": str(registry)})
    refused(capsys, tmp_path, cfg, str(index), repr(entry), "bare file name")


def test_discovery_skips_an_index_whose_shards_are_still_uploading(tmp_path, family):
    """The index wins over a model.safetensors beside it (as when the merge reads the folder), so the
    folder is complete only once the shards it lists have landed."""
    base, tasks = family(tasks=3)
    registry = registry_of(tmp_path, tasks)
    index_to(registry / "task_01", "model-00001-of-00002.safetensors", keep_single=True)
    (registry / "task_02" / INDEX_NAME).write_text('{"weight_map": {"w": "model-00')  # caught mid-write
    assert discovered(tmp_path, base, registry) == ["task_00"]
    shutil.copy(registry / "task_01" / SINGLE_NAME, registry / "task_01" / "model-00001-of-00002.safetensors")
    assert discovered(tmp_path, base, registry) == ["task_00", "task_01"]


def test_plain_shard_names_still_work(capsys, tmp_path, family):
    base, tasks = family(tasks=2, shards=2)
    cfg = write_config(tmp_path, {"base": str(base), "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks]})
    assert main(["merge", str(cfg), "--dry-run"]) == 0
    assert len(open_checkpoint(str(tasks[0][1])).files) == 2


@pytest.mark.parametrize(
    "index",
    [
        '{"weight_map": []}',
        '{"weight_map": {}}',
        '{"weight_map": {"a": 1}}',
        '{"weight_map": {"a": ["x.safetensors"]}}',
        "[]",
        '{"weight_map": {"a": "x.sa',
    ],
)
def test_malformed_index_is_one_line(tmp_path, family, index):
    base, tasks = family(tasks=1)
    (tasks[0][1] / INDEX_NAME).write_text(index)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(tasks[0][1]))
    assert str(e.value).startswith(f"{tasks[0][1] / INDEX_NAME}: ") and len(str(e.value).splitlines()) == 1
