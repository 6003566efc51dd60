"""Scale-out on a real multi-node Ray cluster on 127.0.0.1: a driver-only head and two
worker nodes with one CPU each (ray.cluster_utils.Cluster) run `mergeflow merge
--ray-address ADDR` from s3:// to s3:// against a real SeaweedFS server. The shards must
spread over more than one node (the manifest records where each shard ran) and every output
byte must equal a single-node merge of the same checkpoints from local files.

Why the head has no CPU and shards are made slow (small read chunks): Ray hands a warm
worker the next queued task, so on a head whose worker is already up, short shards can all
finish there before another node's first worker has started and imported torch. Two cold
worker nodes race evenly, and ~0.5 s shards leave time for both to join.

The driver is a subprocess: a test process can drive one Ray runtime at a time and this
session already drives the shared local one. The cluster lives in a child process of
mergeflow.dev.local_cluster and is torn down with Cluster.shutdown(), never `ray stop`.
Credentials reach the cluster the way they do in production: in the nodes' environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import config_for, same_place_free

from mergeflow.dev.local_cluster import LocalRayCluster
from mergeflow.dev.local_services import SeaweedS3Server, s3_client
from mergeflow.workers.shard import LayerStats, ShardResult
from mergeflow.workflows.journal import result_from_json, result_to_json
from mergeflow.workflows.merge import run_merge

METHOD = {"name": "tall_masks", "alpha": 0.3, "lambda": 0.4}
EXECUTION = {"shard_size": 4000, "chunk_elems": 64}  # ~10 shards of whole layers, each many ranged reads
COMPARED = ("model/", "compressed/", "stats/layers.json")


def upload(client, bucket: str, local: Path, prefix: str) -> str:
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(local).as_posix()}", Body=f.read_bytes())
    return f"s3://{bucket}/{prefix}"


@pytest.mark.slow
def test_merge_spreads_over_nodes_and_equals_single_node(ray_session, family, tmp_path):
    server = SeaweedS3Server(tmp_path / "s3", access_key="mf-cluster", secret_key="mf-cluster-Secret-3kQz")
    cluster = None
    try:
        endpoint = server.start()
        cluster = LocalRayCluster(nodes=3, cpus=1, head_cpus=0, env=endpoint.env())
        cluster.launch()  # its ~10-25 s start overlaps the reference merge and the uploads
        base_dir, task_dirs = family(tasks=3, layers=8, hidden=16, vocab=32, shards=2)
        # The reference: the same merge on the session's single-node runtime, from local files.
        local = run_merge(config_for(base_dir, task_dirs, tmp_path / "local", METHOD, **EXECUTION), quiet=True)
        shards = len(local.plan.shards)
        assert shards >= 6
        assert list(local.manifest["nodes"]) == [ray_session.get_runtime_context().get_node_id()]

        client = s3_client(endpoint)
        raw = {
            "base": upload(client, endpoint.bucket, base_dir, "in/base"),
            "tasks": [{"name": n, "checkpoint": upload(client, endpoint.bucket, p, f"in/{n}")} for n, p in task_dirs],
            "output": f"s3://{endpoint.bucket}/run",
            "method": METHOD,
            "execution": EXECUTION,
            "storage": {"endpoint_url": endpoint.url, "region": endpoint.region},
        }
        config = tmp_path / "merge.yaml"
        config.write_text(yaml.safe_dump(raw))

        info = cluster.wait()
        assert len(info.node_ids) == 3
        env = os.environ | endpoint.env() | cluster.driver_env()
        env.pop("RAY_ADDRESS")  # the address travels on the command line, as a user would give it
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "mergeflow.workflows.cli",
                "merge",
                str(config),
                "--ray-address",
                info.address,
                "--quiet",
                "--no-tracking",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr[-3000:]

        manifest = json.loads(client.get_object(Bucket=endpoint.bucket, Key="run/manifest.json")["Body"].read())
        nodes = manifest["nodes"]
        # Every shard ran exactly once, on a node of this cluster, and more than one node took part.
        assert sorted(s for n in nodes.values() for s in n["shards"]) == list(range(1, shards + 1))
        assert set(nodes) <= set(info.node_ids[1:]) and len(nodes) == 2, nodes  # the two worker nodes
        assert {n["ip"] for n in nodes.values()} == {"127.0.0.1"}
        assert sum(n["bytes_read"] for n in nodes.values()) == manifest["summary"]["bytes_read"] > 0
        assert f"ray nodes   {len(nodes)} computed the shards" in done.stdout

        # Byte-identical outputs: the recorded hashes and the bytes themselves (the model card names
        # where the inputs were read from, so it differs by design).
        assert same_place_free(manifest["outputs"]) == same_place_free(local.manifest["outputs"])
        compared = [rel for rel in same_place_free(manifest["outputs"]) if rel.startswith(COMPARED)]
        assert any(r.startswith("model/model") and r.endswith(".safetensors") for r in compared)
        assert any(r.startswith("compressed/masks/") for r in compared)
        for rel in compared:
            remote = client.get_object(Bucket=endpoint.bucket, Key=f"run/{rel}")["Body"].read()
            assert remote == (tmp_path / "local" / rel).read_bytes(), rel
    finally:
        # Both take seconds to stop: in parallel.
        with ThreadPoolExecutor(2) as pool:
            s3_stopped = pool.submit(server.stop)
            code = cluster.stop() if cluster is not None else None
            s3_stopped.result()
    assert code == 0, "Cluster.shutdown() did not finish cleanly; its log ends:\n" + cluster.log_tail()


def test_journal_keeps_where_a_shard_ran():
    """A resumed run reports reused shards on the node that computed them; records
    written before nodes were recorded still load."""
    r = ShardResult(
        4,
        {"model/x.safetensors": ("ab" * 32, 10)},
        {"layer": LayerStats(3, np.ones(2))},
        node="f" * 56,
        node_ip="10.0.0.7",
    )
    back = result_from_json(json.loads(json.dumps(result_to_json(r))))
    assert (back.node, back.node_ip, back.index) == ("f" * 56, "10.0.0.7", 4)
    old = result_to_json(r)
    del old["node"], old["node_ip"]
    assert (result_from_json(old).node, result_from_json(old).node_ip) == ("", "")
