"""Every kind of bad input exits non-zero with one line naming the culprit, and leaves no manifest."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeflow.workflows.cli import main


def write_config(tmp_path: Path, base, tasks, method=None, **extra) -> Path:
    raw = {
        "base": str(base),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
        "output": str(tmp_path / "out"),
        "method": method or {"name": "tall_masks"},
        **extra,
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fails(capsys, tmp_path, cfg: Path, *needles: str) -> str:
    rc = main(["merge", str(cfg), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mergeflow: error: ")
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()
    return err


def edit_task(path: Path, fn) -> None:
    f = path / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


NAME = "model.layers.1.mlp.up_proj.weight"


def test_mismatched_shape_names_task_and_tensor(capsys, tmp_path, family):
    base, tasks = family()
    edit_task(tasks[1][1], lambda sd: sd.__setitem__(NAME, torch.zeros(3, 3, dtype=torch.bfloat16)))
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "task 'task_01'", NAME, "shape [3, 3]")


def test_missing_tensor_names_task_and_tensor(capsys, tmp_path, family):
    base, tasks = family()
    edit_task(tasks[2][1], lambda sd: sd.pop(NAME))
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "task 'task_02'", NAME, "missing")


def test_extra_tensor_in_task(capsys, tmp_path, family):
    base, tasks = family()
    edit_task(tasks[0][1], lambda sd: sd.__setitem__("extra.bias", torch.zeros(4)))
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "task 'task_00'", "extra.bias", "not in the base")


def test_truncated_file_names_file(capsys, tmp_path, family):
    base, tasks = family()
    f = tasks[1][1] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "task 'task_01'", str(f), "truncated")


def test_corrupt_header_names_file(capsys, tmp_path, family):
    base, tasks = family()
    f = base / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "base", str(f), "corrupt safetensors header")


def test_absurd_header_length(capsys, tmp_path, family):
    base, tasks = family()
    f = tasks[0][1] / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(data))
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "task 'task_00'", "corrupt safetensors header")


def test_missing_path_names_task_and_path(capsys, tmp_path, family):
    base, tasks = family()
    tasks[2] = ("task_02", tmp_path / "nowhere")
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "task 'task_02'", "nowhere", "not found")


def test_pickled_checkpoint_refused(capsys, tmp_path, family):
    base, tasks = family()
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    tasks[0] = ("task_00", d)
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "task 'task_00'", "pickled")


def test_nan_in_weights_names_task_and_tensor(ray_session, capsys, tmp_path, family):
    base, tasks = family()

    def poison(sd):
        t = sd[NAME].clone()
        t.view(-1)[5] = float("nan")
        sd[NAME] = t

    edit_task(tasks[1][1], poison)
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "task 'task_01'", NAME, "NaN or Inf")


def test_inf_in_base_names_tensor(ray_session, capsys, tmp_path, family):
    base, tasks = family()
    edit_task(base, lambda sd: sd[NAME].view(-1).__setitem__(0, float("inf")))
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "base", NAME, "NaN or Inf")


def test_integer_buffer_differs(ray_session, capsys, tmp_path, family):
    base, tasks = family()
    edit_task(tasks[0][1], lambda sd: sd.__setitem__("model.rotary_emb.position_ids", torch.arange(64) + 1))
    fails(
        capsys,
        tmp_path,
        write_config(tmp_path, base, tasks),
        "task 'task_00'",
        "model.rotary_emb.position_ids",
        "identical",
    )


def test_duplicate_task_names(capsys, tmp_path, family):
    base, tasks = family()
    tasks[1] = ("task_00", tasks[1][1])
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "duplicate task name 'task_00'")


@pytest.mark.parametrize(
    "method,needle",
    [
        ({"name": "ties", "density": 1.5}, "method.density"),
        ({"name": "ties", "densty": 0.5}, "method.densty: unknown key"),
        ({"name": "tall_masks", "lambda": "big"}, "method.lambda"),
        ({"name": "tall_masks", "lambda": {"task_00": 0.3, "task_09": 0.2}}, "unknown task 'task_09'"),
        ({"name": "consensus", "k": -1}, "method.k"),
        ({"name": "magic"}, "unknown merge method 'magic'"),
        ({"name": "ties", "scope": "layer"}, "method.scope"),
    ],
)
def test_bad_config_values_name_the_key(capsys, tmp_path, family, method, needle):
    base, tasks = family(tasks=2)
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks, method), needle)


def test_unknown_top_level_key_and_bad_yaml(capsys, tmp_path, family):
    base, tasks = family(tasks=2)
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks, outptu="x"), "outptu: unknown key")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed")
    assert main(["merge", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_json_config_is_accepted_by_dry_run(capsys, tmp_path, family):
    base, tasks = family(tasks=2)
    cfg = tmp_path / "merge.json"
    cfg.write_text(
        json.dumps(
            {
                "base": str(base),
                "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
                "output": str(tmp_path / "out"),
                "method": {"name": "ties"},
            }
        )
    )
    assert main(["merge", str(cfg), "--dry-run"]) == 0
    assert "shards" in capsys.readouterr().out


def test_finished_output_is_not_overwritten_without_flag(ray_session, capsys, tmp_path, family):
    base, tasks = family(tasks=2)
    cfg = write_config(tmp_path, base, tasks, {"name": "task_arithmetic"})
    assert main(["merge", str(cfg), "--quiet"]) == 0
    capsys.readouterr()
    manifest = (tmp_path / "out" / "manifest.json").read_bytes()
    other = write_config(tmp_path, base, tasks, {"name": "ties"})
    assert main(["merge", str(other), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "manifest.json").read_bytes() == manifest
    assert main(["merge", str(other), "--quiet", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["method"]["name"] == "ties"


def test_output_that_is_not_a_run_is_refused(capsys, tmp_path, family):
    base, tasks = family(tasks=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    fails(capsys, tmp_path, write_config(tmp_path, base, tasks), "not a mergeflow run")
    assert (tmp_path / "out" / "precious.txt").exists()
