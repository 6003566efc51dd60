"""Scheduled re-merging entirely on a real SeaweedFS server: a `tasks_from: s3://` registry, runs and
latest.json under an s3:// root, stamps from ETags, the lock object, and a task landing between
two `watch --once` ticks. Reference: a from-scratch local merge of the same tasks, byte for byte.

Credentials travel through the environment, set at import as in test_s3_end_to_end.py (Ray
workers inherit the environment of whichever module starts Ray first)."""

from __future__ import annotations

import os

os.environ.setdefault("AWS_ACCESS_KEY_ID", "mergeflow")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "mf-e2e-Secret-7Qx2vLp9")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import json  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from conftest import config_for  # noqa: E402

from mergeflow.dev.local_services import s3_client  # noqa: E402
from mergeflow.infra.lock import LOCK_NAME  # noqa: E402
from mergeflow.workflows.cli import main  # noqa: E402
from mergeflow.workflows.merge import run_merge  # noqa: E402

pytestmark = pytest.mark.slow


def test_watch_on_an_s3_registry(ray_session, s3_server, family, tmp_path, capsys):
    client = s3_client(s3_server.endpoint)
    bucket, prefix = s3_server.endpoint.bucket, f"rm-{uuid.uuid4().hex[:10]}"

    def upload(local: Path, *parts: str) -> str:
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            client.put_object(
                Bucket=bucket, Key="/".join([prefix, *parts, f.relative_to(local).as_posix()]), Body=f.read_bytes()
            )
        return "/".join([f"s3://{bucket}", prefix, *parts])

    def objects(*parts: str) -> dict[str, bytes]:
        root = "/".join([prefix, *parts]) + "/"
        keys = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root)
            for o in page.get("Contents", [])
        ]
        return {k[len(root) :]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}

    base, tasks = family(tasks=3)
    base_uri = upload(base, "base")
    for name, path in tasks[:2]:
        upload(path, "registry", name)
    cfg = tmp_path / "watch.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": base_uri,
                "tasks_from": f"s3://{bucket}/{prefix}/registry",
                "output": f"s3://{bucket}/{prefix}/root",
                "method": {"name": "task_arithmetic"},
                "execution": {"shard_size": 3000, "chunk_elems": 64},
                "storage": {"endpoint_url": s3_server.endpoint.url, "region": s3_server.endpoint.region},
            }
        )
    )
    args = ["watch", str(cfg), "--once", "--quiet", "--no-tracking"]

    assert main(args) == 0
    assert "merged 2 tasks" in capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("up to date (run s3://")

    upload(tasks[2][1], "registry", "task_02")
    assert main(args) == 0
    assert "added task_02; reused the sum of 2 task(s)" in capsys.readouterr().out

    root = objects("root")
    run = json.loads(root["latest.json"])["run"]
    assert LOCK_NAME not in root  # released
    manifest = json.loads(root[f"{run}/manifest.json"])
    assert manifest["summary"]["bytes_hashed"] == 0 and manifest["parent"]["run"].startswith("s3://")
    assert all(":" in f["stamp"] for t in manifest["inputs"]["tasks"] for f in t["files"].values())  # size:ETag

    local = tmp_path / "scratch"
    run_merge(
        config_for(base, tasks, local, {"name": "task_arithmetic"}, shard_size=3000, chunk_elems=64, keep_delta=True),
        quiet=True,
    )
    computed = {
        rel[len(run) + 1 :]: data
        for rel, data in root.items()
        if rel.startswith(f"{run}/") and rel.endswith(".safetensors")
    }
    want = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*.safetensors")}
    assert any(r.startswith("delta/") for r in want) and computed == want
