"""`output.format: lora` on a synthetic family: what the adapter holds, checked against numpy's SVD
of model/ - base, for a fixed rank and for an energy fraction; and the config's one-line errors.
(tests/test_lora_minilm.py loads such an adapter with PEFT on a real model.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from mergeflow.errors import ConfigError
from mergeflow.workflows.config import config_from_dict
from mergeflow.workflows.merge import run_merge


def folder_tensors(folder) -> dict[str, np.ndarray]:
    import torch
    from safetensors.torch import load_file as load_torch

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= {k: v.to(torch.float64).numpy() for k, v in load_torch(f).items() if v.is_floating_point()}
    return out


def merge_to_lora(family, tmp_path, **lora):
    base_dir, tasks = family(tasks=3, layers=2, hidden=16, vocab=32, shards=2)
    raw = {
        "base": str(base_dir),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
        "output": {"path": str(tmp_path / "run"), "format": "lora", **lora},
        "method": {"name": "ties", "density": 0.5},
    }
    run_merge(config_from_dict(raw), quiet=True)
    out = tmp_path / "run"
    adapter = load_file(out / "lora" / "adapter_model.safetensors")
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    return folder_tensors(base_dir), folder_tensors(out / "model"), adapter, config, manifest


def numpy_rank(s: np.ndarray, rank: int | None, energy: float | None) -> int:
    k = len(s) if rank is None else min(rank, len(s))
    if energy is not None:
        power = np.cumsum(s**2)
        k = min(k, int(np.searchsorted(power, energy * power[-1])) + 1)
    return max(k, 1)


@pytest.mark.parametrize("lora", [{"rank": 3}, {"energy": 0.8}], ids=["rank3", "energy0.8"])
def test_adapter_is_the_truncated_svd_of_the_merged_delta(ray_session, family, tmp_path, lora):
    base, model, adapter, config, manifest = merge_to_lora(family, tmp_path, **lora)
    section = manifest["lora"]
    targets = [n for n, v in base.items() if v.ndim == 2 and "embed" not in n and not np.array_equal(v, model[n])]
    assert len(targets) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    assert sorted(config["target_modules"]) == sorted(n.removesuffix(".weight") for n in targets)
    ranks = {}
    for name in targets:
        module = name.removesuffix(".weight")
        delta = model[name] - base[name]
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        k = numpy_rank(s, lora.get("rank"), lora.get("energy"))
        a = adapter[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b = adapter[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        assert a.shape == (k, delta.shape[1]) and b.shape == (delta.shape[0], k), name
        best = (u[:, :k] * s[:k]) @ vh[:k]
        np.testing.assert_allclose(b @ a, best, atol=1e-6 * np.abs(delta).max(), err_msg=name)
        stated = np.sqrt((s[k:] ** 2).sum() / (s**2).sum())
        assert section["relative_error"][module] == pytest.approx(stated, abs=1e-7), name
        ranks[module] = k
    assert section["ranks"] == ranks
    r = config["r"]
    assert config["lora_alpha"] == r  # scaling 1
    for module, k in ranks.items():  # modules of another rank are named exactly, as regexes
        if k != r:
            assert config["rank_pattern"][module.replace(".", "\\.")] == k
            assert config["alpha_pattern"][module.replace(".", "\\.")] == k
    # The embedding and the norms the merge changed travel whole, under their modules' names.
    saved = set(config["modules_to_save"])
    assert "model.embed_tokens" in saved and "model.norm" in saved
    for module in saved:
        name = f"{module}.weight"
        np.testing.assert_array_equal(adapter[f"base_model.model.{name}"].astype(np.float64), model[name])
    assert section["max_relative_error"] == pytest.approx(max(section["relative_error"].values()), abs=1e-7)
    assert manifest["summary"]["lora_bytes"] == sum(f.stat().st_size for f in (tmp_path / "run" / "lora").iterdir())


def test_full_rank_adapter_rebuilds_model_exactly(ray_session, family, tmp_path):
    base, model, adapter, config, manifest = merge_to_lora(family, tmp_path, rank=1000)
    assert manifest["lora"]["max_relative_error"] < 1e-12
    for module in config["target_modules"]:
        a = adapter[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b = adapter[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        name = f"{module}.weight"
        np.testing.assert_allclose(base[name] + b @ a, model[name], atol=1e-6)


RAW = {"base": "b", "tasks": [{"name": "t", "checkpoint": "c"}], "method": {"name": "task_arithmetic"}}


@pytest.mark.parametrize(
    "output,needle",
    [
        ({"path": "out", "format": "bogus"}, "output.format: must be one of model, lora, got 'bogus'"),
        ({"path": "out", "format": "lora"}, "format lora needs a rank"),
        ({"path": "out", "format": "lora", "rank": 0}, "must be a positive integer"),
        ({"path": "out", "format": "lora", "energy": 1.5}, "must be in (0, 1]"),
        ({"path": "out", "format": "lora", "rank": 4, "size": 2}, "size"),
        ({"path": "out", "rank": 4}, "output.rank: unknown key for format model"),
        ({"path": "out", "format": "lora", "concat": True, "rank": 4}, "concat: the concatenated adapter keeps"),
    ],
)
def test_bad_output_spec_is_one_line(tmp_path, output, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**RAW, "output": output}, root=tmp_path)
    message = str(err.value)
    assert needle in message and "\n" not in message, message


def test_output_mapping_means_the_same_folder(tmp_path):
    cfg = config_from_dict({**RAW, "output": {"path": "out", "format": "lora", "rank": 8}}, root=tmp_path)
    assert cfg.output == str(tmp_path / "out") and cfg.lora_out.rank == 8 and cfg.lora_out.energy is None
    plain = config_from_dict({**RAW, "output": "out"}, root=tmp_path)
    assert plain.output == cfg.output and plain.lora_out is None
