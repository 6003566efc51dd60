"""bench/families.py: Llama-shaped, index-sharded, deterministic families whose task vectors
are sparse and heavy-tailed, and which mergeflow plans like any HF checkpoint."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import families  # noqa: E402
from conftest import config_for  # noqa: E402

from mergeflow.workflows.plan import make_plan  # noqa: E402


def load(ckpt: Path) -> dict[str, torch.Tensor]:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        part = load_file(ckpt / f)
        assert all(index["weight_map"][n] == f for n in part)
        out |= part
    assert out.keys() == index["weight_map"].keys()
    return out


def digest(ckpt: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(ckpt.glob("*.safetensors")))).hexdigest()


def test_llama_shapes_sharded_with_index(tmp_path):
    base, tasks = families.generate(tmp_path / "f", "tiny", tasks=2, max_shard_bytes=64 * 1024)
    p = families.PRESETS["tiny"]
    assert len(list(base.glob("*.safetensors"))) > 1  # really sharded
    sd = load(base)
    assert {n: tuple(t.shape) for n, t in sd.items()} == families.tensor_shapes(p)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (p.kv_heads * p.head_dim, p.hidden)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert sum(t.numel() for t in sd.values()) == families.parameters(p)
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == p.kv_heads


def test_deterministic_by_seed_and_independent_of_task_count(tmp_path):
    _, two = families.generate(tmp_path / "a", "tiny", tasks=2, seed=5)
    _, three = families.generate(tmp_path / "b", "tiny", tasks=3, seed=5)
    _, other = families.generate(tmp_path / "c", "tiny", tasks=2, seed=6)
    assert digest(two[1][1]) == digest(three[1][1])
    assert digest(tmp_path / "a" / "base") == digest(tmp_path / "b" / "base")
    assert digest(two[1][1]) != digest(other[1][1])
    assert digest(two[0][1]) != digest(two[1][1])


def test_task_vectors_sparse_heavy_tailed_and_overlapping(tmp_path):
    base, tasks = families.generate(tmp_path / "f", "tiny", tasks=3)
    b = load(base)
    taus = [{n: load(p)[n].float() - b[n].float() for n in b} for _, p in tasks]
    name = "model.layers.0.mlp.gate_proj.weight"
    changed = [(tau[name] != 0) for tau in taus]
    for c in changed:
        assert 0.05 < c.float().mean() < 0.4  # a minority of weights moves
    both = (changed[0] & changed[1]).float().mean()
    assert both > changed[0].float().mean() * changed[1].float().mean() * 1.5  # more overlap than chance
    x = torch.cat([t[name][t[name] != 0] for t in taus])
    z = (x - x.mean()) / x.std()
    assert (z**4).mean() > 6  # kurtosis well above a Gaussian's 3


def test_dense_families_move_nearly_every_weight_and_keep_the_sparse_ones_bytes(tmp_path):
    base, tasks = families.generate(tmp_path / "d", "tiny", tasks=2, dense=True)
    b = load(base)
    name = "model.layers.0.mlp.gate_proj.weight"
    for _, p in tasks:
        moved = (load(p)[name].float() != b[name].float()).float().mean()
        assert moved > 0.9  # all but the updates bf16 rounds away
    sparse_base, _ = families.generate(tmp_path / "s", "tiny", tasks=2)
    assert digest(base) == digest(sparse_base)  # the same base model under both
    assert json.loads((tmp_path / "d" / "family.json").read_text())["dense"] is True


def test_mergeflow_plans_a_generated_family(tmp_path):
    base, tasks = families.generate(tmp_path / "f", "tiny", tasks=2, max_shard_bytes=64 * 1024)
    plan = make_plan(config_for(base, tasks, tmp_path / "out", {"name": "task_arithmetic"}))
    assert plan.parameters == families.parameters(families.PRESETS["tiny"])
