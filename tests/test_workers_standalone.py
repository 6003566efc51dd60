"""workers/ is usable without Ray, MLflow or boto3 (a notebook, a GPU box with torch alone),
and its CUDA path gives the CPU path's bytes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import config_for

from mergeflow.workers.shard import merge_shard
from mergeflow.workflows.plan import make_plan


def test_workers_import_and_merge_without_ray_mlflow_boto3(family, tmp_path):
    base, tasks = family(tasks=3)
    script = textwrap.dedent(f"""
        import sys
        for name in ("ray", "mlflow", "boto3", "botocore"):
            sys.modules[name] = None  # any import of these now raises ImportError
        from pathlib import Path
        from mergeflow.workers.checkpoint import open_checkpoint
        from mergeflow.workers.methods import get_method, methods
        from mergeflow.workers.shard import ShardSpec, TensorJob, merge_shard
        assert {{"task_arithmetic", "ties", "tall_masks", "consensus", "lot"}} <= set(methods())  # LOT too
        tall = get_method("tall_masks")
        base = open_checkpoint({str(base)!r})
        tasks = [open_checkpoint(p) for p in {[str(p) for _, p in tasks]!r}]
        jobs = tuple(TensorJob(n, base.tensors[n], tuple(t.tensors[n] for t in tasks)) for n in sorted(base.tensors))
        params = tall.Params(alpha=0.3, lambda_=0.4)
        spec = ShardSpec(0, 1, jobs, ("a", "b", "c"), tall, params, {str(tmp_path / "out")!r})
        result = merge_shard(spec)
        print(sorted(result.outputs))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model/model-00001-of-00001.safetensors" in out.stdout
    assert "compressed/masks/c/masks-00001-of-00001.safetensors" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tall_masks", "consensus"])
def test_cuda_path_matches_cpu(family, tmp_path, method):
    base, tasks = family(tasks=4, hidden=64)
    plan = make_plan(
        config_for(base, tasks, tmp_path / "cpu", {"name": method} | ({"scope": "tensor"} if method == "ties" else {}))
    )
    spec = plan.shards[0]
    cpu = merge_shard(spec)
    gpu = merge_shard(dataclasses.replace(spec, device="cuda", output=str(tmp_path / "gpu")))
    assert gpu.outputs == cpu.outputs  # the same files with the same sha256
    for rel in cpu.outputs:
        assert (tmp_path / "cpu" / rel).read_bytes() == (tmp_path / "gpu" / rel).read_bytes(), rel
