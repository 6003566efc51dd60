"""bench/gpu_stages.py runs with the GPU machine's packages alone (torch, safetensors, numpy:
no ray, mlflow, boto3 or pydantic) and covers every stage over the whole model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu_stages.py"
sys.path.insert(0, str(BENCH.parent))
import families  # noqa: E402


def test_stages_without_ray_mlflow_boto3_pydantic(tmp_path):
    out = tmp_path / "report.json"
    argv = [
        str(BENCH),
        str(tmp_path / "fam"),
        "--preset",
        "tiny",
        "--tasks",
        "3",
        "--device",
        "cpu",
        "--limit-mb",
        "4",
        "--repeats",
        "1",
        "--shard-mb",
        "0",
        "--json",
        str(out),
    ]
    script = textwrap.dedent(f"""
        import runpy, sys
        for name in ("ray", "mlflow", "boto3", "botocore", "pydantic"):
            sys.modules[name] = None  # any import of these now raises ImportError
        sys.argv = {argv!r}
        runpy.run_path(sys.argv[0], run_name="__main__")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert set(stages) == {
        "kernels/task_arithmetic",
        "merge/task_arithmetic",
        "kernels/consensus",
        "merge/consensus",
        "kernels/ties",
        "ties-global",
    }
    tensor_bytes = families.parameters(families.PRESETS["tiny"]) * 2 * 4  # bf16, base + 3 tasks
    assert tensor_bytes < report["input_bytes"]  # the files also hold headers
    for name in ("merge/task_arithmetic", "merge/consensus", "ties-global"):
        s = stages[name]
        assert s["bytes"] == tensor_bytes and s["shards"] > 1 and s["seconds"] > 0, name
        assert s["bytes_read"] == tensor_bytes, name  # the apply pass reads every tensor byte once
    # one shard per layer (--shard-mb 0): the kernels stage covers the biggest one only
    assert 0 < stages["kernels/task_arithmetic"]["bytes"] < tensor_bytes
    ties = stages["ties-global"]
    assert ties["passes"] >= 1 or ties["zero_guess"]
    assert set(report["limits"]) == {"copy", "read warm"}  # no host-to-device figures without CUDA
    assert "ties-global" in run.stdout and "GB/s" in run.stdout
