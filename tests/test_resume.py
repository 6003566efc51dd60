"""Kill a merge midway (SIGKILL, no chance to clean up), check it left no manifest, and
check that re-running resumes: journaled shards are verified and reused, and the
result equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import config_for

from mergeflow.workflows.merge import run_merge


def model_bytes(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*.safetensors"))}


@pytest.mark.slow
def test_kill_and_resume(ray_session, family, tmp_path):
    base, tasks = family(tasks=4, layers=12, hidden=32, vocab=64)
    method = {"name": "tall_masks", "base_merge": "ties", "density": 0.3}
    execution = {"shard_size": 2000, "chunk_elems": 32}  # tiny chunks: slow enough to kill midway
    out = tmp_path / "run"
    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
                "output": str(out),
                "method": method,
                "execution": execution,
            }
        )
    )

    env = dict(
        os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS="", RAY_TMPDIR=tempfile.mkdtemp(prefix="mfkill", dir="/tmp")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergeflow.workflows.cli", "merge", str(cfg_path), "--quiet"],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    journal = out / ".mergeflow" / "shards"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.is_dir() and len(list(journal.glob("*.json"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the merge ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    time.sleep(1.0)  # let any orphaned writer finish before we look

    done = len(list(journal.glob("*.json")))
    assert done >= 2
    assert not (out / "manifest.json").exists()

    # Chunking does not change results (nor the plan's fingerprint): finish with big chunks.
    execution = {"shard_size": 2000, "chunk_elems": 1 << 20}
    cfg = config_for(base, tasks, out, method, **execution)
    report = run_merge(cfg, quiet=True)
    total = len(report.plan.shards)
    assert report.state.value == "resume"
    assert report.shards_reused >= 2 and report.shards_reused + report.shards_run >= total
    assert (out / "manifest.json").exists()
    assert not list(out.rglob(".*.tmp"))

    clean = run_merge(config_for(base, tasks, tmp_path / "clean", method, **execution), quiet=True)
    assert clean.state.value == "fresh"
    assert model_bytes(out) == model_bytes(tmp_path / "clean")


@pytest.mark.parametrize("layout", ["parts", "one-file"])
def test_corrupted_shard_is_redone_on_resume(ray_session, family, tmp_path, layout):
    """A journaled shard whose file no longer hashes to the record is recomputed, not trusted; with
    model/ joined into one file, the shard whose bytes there were damaged."""
    base, tasks = family(tasks=2, layers=4)
    size = {"max_file_size": 0} if layout == "parts" else {}
    cfg = config_for(base, tasks, tmp_path / "run", {"name": "task_arithmetic"}, shard_size=3000, **size)
    first = run_merge(cfg, quiet=True)
    n = len(first.plan.shards)
    assert n >= 3
    expected = model_bytes(tmp_path / "run")
    (tmp_path / "run" / "manifest.json").unlink()  # as if killed just before the manifest
    if layout == "parts":
        victim = tmp_path / "run" / first.plan.shards[1].model_file()
        victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    else:  # the last bytes of the joined file: the last shard's last tensor
        victim = tmp_path / "run" / "model" / "model.safetensors"
        data = bytearray(victim.read_bytes())
        data[-8:] = b"\0" * 8 if data[-8:] != b"\0" * 8 else b"\1" * 8
        victim.write_bytes(bytes(data))
    again = run_merge(cfg, quiet=True)
    assert again.state.value == "resume"
    assert (again.shards_reused, again.shards_run) == (n - 1, 1)
    assert model_bytes(tmp_path / "run") == expected
