"""workers/append.py alone (no Ray): the previous run's float32 sum plus appended tasks gives the
files merge_shard writes from scratch, byte for byte, with another shard layout than the parent's,
in every float dtype, on CPU and (when present) CUDA."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import config_for

from mergeflow.workers.append import PreviousSum, append_shard
from mergeflow.workers.safetensors_io import read_header
from mergeflow.workers.shard import merge_shard
from mergeflow.workflows.plan import make_plan

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_append_equals_merge_from_scratch(family, tmp_path, dtype, device):
    base, tasks = family(tasks=4, dtype=dtype)
    method = {"name": "task_arithmetic", "alpha": 0.3}
    # The parent: 2 tasks, large shards, delta kept. The child: 4 tasks, small shards, small chunks.
    parent = make_plan(config_for(base, tasks[:2], tmp_path / "parent", method, shard_size=10**9, keep_delta=True))
    results = [merge_shard(s) for s in parent.shards]
    tensors = {
        n: i
        for r in results
        for rel in r.outputs
        if rel.startswith("delta/")
        for n, i in read_header(str(tmp_path / "parent" / rel)).tensors.items()
    }
    tau_sq = {layer: tuple(s.tau_sq) for r in results for layer, s in r.layers.items()}

    child = make_plan(
        config_for(base, tasks, tmp_path / "scratch", method, shard_size=3000, chunk_elems=40, keep_delta=True)
    )
    assert len(child.shards) > 3
    want = [merge_shard(dataclasses.replace(s, device=device)) for s in child.shards]
    got = [
        append_shard(
            dataclasses.replace(s, device=device, output=str(tmp_path / "appended")), PreviousSum(tensors, tau_sq, 2)
        )
        for s in child.shards
    ]
    assert files(tmp_path / "appended") == files(tmp_path / "scratch")
    assert [g.outputs for g in got] == [w.outputs for w in want]
    for g, w in zip(got, want):
        assert g.layers.keys() == w.layers.keys()
        for layer in w.layers:  # carried norms (parent) and new ones agree with a full pass
            assert np.allclose(g.layers[layer].tau_sq, w.layers[layer].tau_sq, rtol=1e-9), layer
    # Read: the float32 sum, the base and the two new tasks, against the base and four tasks.
    float_numel = sum(i.numel for i in child.base.tensors.values() if i.dtype in ("BF16", "F16", "F32"))
    tensor_bytes = sum(i.nbytes for i in child.base.tensors.values())
    assert sum(g.bytes_read for g in got) == 4 * float_numel + 3 * tensor_bytes
    assert sum(w.bytes_read for w in want) == 5 * tensor_bytes
