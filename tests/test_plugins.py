"""Methods and storage backends are plug-ins: one file each, registered through mergeflow's public
interface, run by the engine without any other file knowing them (tests/plugins/). And gs://, a
built-in backend that is one file over the S3 one, against a real S3-compatible server."""

from __future__ import annotations

import os

os.environ.setdefault("AWS_ACCESS_KEY_ID", "mergeflow")  # the module's SeaweedFS server is started with these
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "mf-e2e-Secret-7Qx2vLp9")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import json  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import plugins.memory_backend as memory  # noqa: E402  (registers mem://)
import plugins.scaled_mean  # noqa: E402, F401  (registers the method scaled_mean)
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import same_place_free  # noqa: E402
from safetensors.torch import load as load_bytes  # noqa: E402

from mergeflow.dev.local_services import s3_client  # noqa: E402
from mergeflow.errors import ConfigError  # noqa: E402
from mergeflow.infra.lock import LockHeld, RunLock  # noqa: E402
from mergeflow.workers.shard import merge_shard  # noqa: E402
from mergeflow.workflows.commit import OutputState  # noqa: E402
from mergeflow.workflows.config import config_from_dict  # noqa: E402
from mergeflow.workflows.merge import run_merge  # noqa: E402
from mergeflow.workflows.plan import make_plan  # noqa: E402

EXECUTION = {"shard_size": 4000, "chunk_elems": 64}


def raw_config(base, tasks, output, method, endpoint=None) -> dict:
    raw = {
        "base": str(base),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
        "output": str(output),
        "method": method,
        "execution": EXECUTION,
    }
    if endpoint is not None:
        raw["storage"] = {"endpoint_url": endpoint.url, "region": endpoint.region}
    return raw


def upload(client, bucket: str, prefix: str, local: Path) -> None:
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(local).as_posix()}", Body=f.read_bytes())


def objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1 :]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def scaled_mean_reference(base_dir: Path, task_dirs, gain: float, alpha: float) -> dict[str, torch.Tensor]:
    """theta_0 + alpha * gain * mean_t(theta_t - theta_0), whole tensors, in float32 as the engine does."""

    def load(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out |= load_bytes(f.read_bytes())
        return out

    base, tasks = load(base_dir), [load(d) for _, d in task_dirs]
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        taus = torch.stack([t[name].float() - b.float() for t in tasks])
        out[name] = torch.mul(taus.mean(dim=0) * gain, alpha).add_(b.float()).to(b.dtype)
    return out


def test_a_plugin_method_runs_through_ray_s3_and_resume(ray_session, s3_server, family, tmp_path):
    endpoint = s3_server.endpoint
    client, prefix = s3_client(endpoint), f"plugin-{uuid.uuid4().hex[:8]}"
    base_dir, task_dirs = family(tasks=3, layers=2, hidden=16, vocab=32, shards=2)
    upload(client, endpoint.bucket, f"{prefix}/base", base_dir)
    for n, d in task_dirs:
        upload(client, endpoint.bucket, f"{prefix}/{n}", d)
    s3 = f"s3://{endpoint.bucket}/{prefix}"
    method = {"name": "scaled_mean", "gain": 0.25, "alpha": 0.8}
    cfg = config_from_dict(
        raw_config(f"{s3}/base", [(n, f"{s3}/{n}") for n, _ in task_dirs], f"{s3}/run", method, endpoint)
    )
    report = run_merge(cfg, quiet=True)
    assert report.manifest["method"] == {"name": "scaled_mean", "alpha": 0.8, "gain": 0.25}
    run = objects(client, endpoint.bucket, f"{prefix}/run")
    model = {}
    for rel, data in run.items():
        if rel.startswith("model/") and rel.endswith(".safetensors"):
            model |= load_bytes(data)
    want = scaled_mean_reference(base_dir, task_dirs, 0.25, 0.8)
    assert model.keys() == want.keys() and all(torch.equal(model[n], want[n]) for n in want)

    # resume: the manifest and one shard's record gone, as if killed before the commit
    client.delete_object(Bucket=endpoint.bucket, Key=f"{prefix}/run/manifest.json")
    client.delete_object(Bucket=endpoint.bucket, Key=f"{prefix}/run/.mergeflow/shards/00002.json")
    again = run_merge(cfg, quiet=True)
    assert again.state is OutputState.RESUME and again.shards_reused == len(again.plan.shards) - 1
    assert again.shards_run == 1 and again.manifest["outputs"] == report.manifest["outputs"]

    with pytest.raises(
        ConfigError,
        match=r"method\.gian: unknown key for method scaled_mean \(its parameters: "
        r"alpha, gain\)",
    ):
        config_from_dict(raw_config(base_dir, task_dirs, tmp_path / "x", {"name": "scaled_mean", "gian": 2}))
    with pytest.raises(ConfigError, match=r"method\.gain: must be > 0"):
        config_from_dict(raw_config(base_dir, task_dirs, tmp_path / "x", {"name": "scaled_mean", "gain": -1}))


def test_a_plugin_backend_serves_plan_merge_and_lock(family, tmp_path):
    """mem://, registered from one file: headers, ranged reads, streamed writes, the lock's
    compare-and-swap; the shards it writes equal the same shards merged on local files."""
    base_dir, task_dirs = family(tasks=2, layers=2, hidden=16, vocab=32, shards=2)
    for d in [base_dir, *(p for _, p in task_dirs)]:
        for f in d.iterdir():
            memory.OBJECTS[f"mem://fam/{d.name}/{f.name}"] = f.read_bytes()
    method = {"name": "tall_masks", "lambda": 0.4}
    mem = make_plan(
        config_from_dict(
            raw_config("mem://fam/base", [(n, f"mem://fam/{p.name}") for n, p in task_dirs], "mem://out", method)
        )
    )
    local = make_plan(config_from_dict(raw_config(base_dir, task_dirs, tmp_path / "out", method)))
    assert len(mem.shards) == len(local.shards) > 1
    for a, b in zip(mem.shards, local.shards):
        ra, rb = merge_shard(a), merge_shard(b)
        assert ra.outputs == rb.outputs  # same files, same sha256
        for rel in ra.outputs:
            assert memory.OBJECTS[f"mem://out/{rel}"] == (tmp_path / "out" / rel).read_bytes()
    with RunLock("mem://out", mem.config.storage.options()) as lock:
        with pytest.raises(LockHeld):
            RunLock("mem://out", mem.config.storage.options()).acquire()
        assert lock.holder() is not None
    assert "mem://out/.mergeflow.lock" not in memory.OBJECTS


def test_gs_uris_merge_through_an_s3_compatible_endpoint(ray_session, s3_server, family, tmp_path):
    """gs:// is the S3 backend with GCS's endpoint; pointed at SeaweedFS, it merges like local files."""
    endpoint = s3_server.endpoint
    client, prefix = s3_client(endpoint), f"gs-{uuid.uuid4().hex[:8]}"
    base_dir, task_dirs = family(tasks=2, layers=2, hidden=16, vocab=32, shards=2)
    upload(client, endpoint.bucket, f"{prefix}/base", base_dir)
    for n, d in task_dirs:
        upload(client, endpoint.bucket, f"{prefix}/{n}", d)
    gs = f"gs://{endpoint.bucket}/{prefix}"
    method = {"name": "ties", "density": 0.5}
    remote = run_merge(
        config_from_dict(
            raw_config(f"{gs}/base", [(n, f"{gs}/{n}") for n, _ in task_dirs], f"{gs}/run", method, endpoint)
        ),
        quiet=True,
    )
    local = run_merge(config_from_dict(raw_config(base_dir, task_dirs, tmp_path / "run", method)), quiet=True)
    assert same_place_free(remote.manifest["outputs"]) == same_place_free(local.manifest["outputs"])
    assert remote.manifest["inputs"]["base"]["uri"] == f"{gs}/base"
    stored = objects(client, endpoint.bucket, f"{prefix}/run")
    assert same_place_free(json.loads(stored["manifest.json"])["outputs"]) == same_place_free(local.manifest["outputs"])
