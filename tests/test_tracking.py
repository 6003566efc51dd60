"""infra/tracking.py against real MLflow backends: a sqlite store, and `mlflow server` with SeaweedFS S3
artifacts. Reference: what MlflowClient reads back must equal what the manifest says (values computed
here independently), and a dead server must fail fast with one line naming it."""

from __future__ import annotations

import hashlib
import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mergeflow.dev.local_services import MlflowServer, S3Endpoint, SeaweedS3Server, free_port, s3_client
from mergeflow.infra.tracking import TrackingError, TrackingOptions, log_merge

TASKS = ("math", "code", "chat")
CONFIG_TEXT = "base: base\ntasks:\n  - {name: math, checkpoint: task_00}\noutput: run\nmethod: {name: tall_masks}\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _png(width: int = 4, height: int = 3) -> bytes:
    """A small valid RGB PNG, built by hand so the test does not pay for importing matplotlib."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(
        b"\x00" + bytes(c for x in range(width) for c in ((x * 60) % 256, (y * 80) % 256, 128)) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _files_of(prefix: str, parts: int) -> dict:
    blobs = [f"{prefix}-part{i}".encode() * 100 for i in range(parts)]
    return {
        f"model-{i + 1:05d}-of-{parts:05d}.safetensors": {"sha256": _sha(b), "size": len(b)}
        for i, b in enumerate(blobs)
    }


def make_manifest() -> dict:
    """The shape commit.write_manifest writes, with merge.run_merge's `extra` (summary, timings)."""
    return {
        "format": "mergeflow.run/1",
        "mergeflow_version": "0.1.0",
        "created": "2026-11-23T12:00:00Z",
        "fingerprint": "f" * 64,
        "method": {
            "name": "tall_masks",
            "alpha": 0.3,
            "density": 0.2,
            "scope": "global",
            "merge": "mean",
            "lambdas": {"math": 0.4, "code": 0.5, "chat": 0.6},
            "base_merge": "task_arithmetic",
            "k": 2,
            "store_dtype": "base",
        },
        "inputs": {
            "base": {"uri": "/data/base", "files": _files_of("base", 2)},
            "tasks": [{"name": t, "uri": f"/data/{t}", "files": _files_of(t, 2)} for t in TASKS],
        },
        "shards": 4,
        "outputs": {
            "model/model-00001-of-00002.safetensors": {"sha256": "a" * 64, "size": 1000},
            "model/model-00002-of-00002.safetensors": {"sha256": "b" * 64, "size": 500},
            "compressed/index.json": {"sha256": "c" * 64, "size": 120},
            "stats/summary.json": {"sha256": "d" * 64, "size": 30},
        },
        "summary": {
            "parameters": 123456,
            "mask_density": {"math": 0.21, "code": 0.19, "chat": 0.25},
            "tasks_keeping": [10, 20, 30, 40],
            "selfish_share": 0.162,
            "catastrophic_share": 0.081,
            "input_bytes": 987654,
            "model_bytes": 1500,
            "compressed_bytes": 120,
            "checkpoints_bytes": 740000,
            "compression_ratio": 2.5,
            "bytes_read": 987000,
        },
        "timings": {"plan": 0.12, "ray_start": 4.5, "ties_thresholds": 0.0, "merge": 12.25, "commit": 1.5},
    }


FILES = {
    "stats/layers.json": json.dumps({"layers.0": {"numel": 10}}).encode(),
    "stats/summary.json": json.dumps({"parameters": 123456}).encode(),
    "stats/task_overlap.png": _png(),
}


def _digest(checkpoint: dict) -> str:
    return _sha("\n".join(sorted(f["sha256"] for f in checkpoint["files"].values())).encode())


def check_run(uri: str, run_id: str, manifest: dict, tmp_path: Path) -> None:
    """Read the run back through MlflowClient and compare with the manifest."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "mergeflow-test"

    params = run.data.params
    assert params["method"] == "tall_masks"
    assert {k: params[k] for k in ("alpha", "density", "scope", "merge", "base_merge", "k", "store_dtype")} == {
        "alpha": "0.3",
        "density": "0.2",
        "scope": "global",
        "merge": "mean",
        "base_merge": "task_arithmetic",
        "k": "2",
        "store_dtype": "base",
    }
    assert [params[f"lambda.{t}"] for t in TASKS] == ["0.4", "0.5", "0.6"]
    assert (params["num_tasks"], params["tasks"], params["shards"]) == ("3", "math,code,chat", "4")
    assert params["input.base.sha256"] == _digest(manifest["inputs"]["base"])
    for t in manifest["inputs"]["tasks"]:
        assert params[f"input.task.{t['name']}.sha256"] == _digest(t)
    assert len({params[f"input.task.{t}.sha256"] for t in TASKS}) == 3

    metrics = run.data.metrics
    assert metrics["time.plan_s"] == 0.12 and metrics["time.merge_s"] == 12.25 and metrics["time.commit_s"] == 1.5
    assert metrics["bytes_written"] == 1000 + 500 + 120 + 30
    assert metrics["bytes_read"] == 987000
    assert (
        metrics["compression_ratio"],
        metrics["input_bytes"],
        metrics["model_bytes"],
        metrics["compressed_bytes"],
    ) == (2.5, 987654, 1500, 120)
    assert {t: metrics[f"mask_density.{t}"] for t in TASKS} == {"math": 0.21, "code": 0.19, "chat": 0.25}
    assert (metrics["selfish_share"], metrics["catastrophic_share"]) == (0.162, 0.081)

    tags = run.data.tags
    assert tags["mlflow.runName"] == "tall_masks-3tasks"
    assert tags["mergeflow.output"] == "s3://bucket/runs/merged"
    assert tags["mergeflow.version"] == "0.1.0"
    assert tags["mergeflow.fingerprint"] == "f" * 64

    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["config.yaml", "manifest.json", "stats"]
    assert sorted(a.path for a in client.list_artifacts(run_id, "stats")) == [
        "stats/layers.json",
        "stats/summary.json",
        "stats/task_overlap.png",
    ]
    dst = tmp_path / f"download-{run_id}"
    dst.mkdir()
    png = Path(client.download_artifacts(run_id, "stats/task_overlap.png", str(dst)))
    assert png.read_bytes() == FILES["stats/task_overlap.png"]
    assert Path(client.download_artifacts(run_id, "config.yaml", str(dst))).read_text() == CONFIG_TEXT
    assert json.loads(Path(client.download_artifacts(run_id, "manifest.json", str(dst))).read_text()) == manifest


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One store for the module: creating a sqlite store costs seconds.
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


def test_sqlite_run_reads_back(sqlite_uri: str, tmp_path: Path) -> None:
    manifest = make_manifest()
    options = TrackingOptions(uri=sqlite_uri, experiment="mergeflow-test")
    run_id = log_merge(
        manifest, output="s3://bucket/runs/merged", config_text=CONFIG_TEXT, files=FILES, options=options
    )
    assert run_id is not None
    check_run(sqlite_uri, run_id, manifest, tmp_path)
    # Artifacts of a local store sit next to the database, not in the working directory.
    db_dir = Path(sqlite_uri.removeprefix("sqlite:///")).parent
    assert (db_dir / "mlruns").is_dir()

    # A child run of the first: nested in the UI, and found again through our own tag.
    child = log_merge(
        manifest, output="s3://bucket/runs/merged", config_text=None, files={}, options=options, parent_run_id=run_id
    )
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    tags = client.get_run(child).data.tags
    assert tags["mlflow.parentRunId"] == tags["mergeflow.parent_run"] == run_id
    assert [a.path for a in client.list_artifacts(child)] == ["manifest.json"]


def test_failure_midway_marks_run_failed(sqlite_uri: str) -> None:
    import mlflow

    # "stats" as a file and as a folder: the artifact upload fails after the run was created.
    files = {"stats": b"x", "stats/summary.json": b"{}"}
    options = TrackingOptions(uri=sqlite_uri, experiment="mergeflow-test")
    with pytest.raises(TrackingError, match="failed while uploading artifacts") as exc:
        log_merge(make_manifest(), output="/runs/out", config_text=None, files=files, options=options)
    assert "the merge itself is committed at /runs/out" in str(exc.value)
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    experiment = client.get_experiment_by_name("mergeflow-test")
    last = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert last.info.status == "FAILED"


@pytest.fixture()
def mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, S3Endpoint]]:
    """A real `mlflow server` (sqlite) whose proxied artifacts live in a real SeaweedFS bucket."""
    s3 = SeaweedS3Server(tmp_path / "seaweed")
    server: MlflowServer | None = None
    try:
        endpoint = s3.start()
        server = MlflowServer(tmp_path / "mlflow-server", endpoint)
        uri = server.start()
        # The client gets no S3 credentials: artifacts can reach the bucket only through the server.
        for var in (*endpoint.env(), "AWS_PROFILE"):
            monkeypatch.delenv(var, raising=False)
        yield uri, endpoint
    finally:
        if server is not None:
            server.stop()
        s3.stop()


@pytest.mark.slow
def test_mlflow_server_with_s3_artifacts(mlflow_server: tuple[str, S3Endpoint], tmp_path: Path) -> None:
    uri, endpoint = mlflow_server
    manifest = make_manifest()
    run_id = log_merge(
        manifest,
        output="s3://bucket/runs/merged",
        config_text=CONFIG_TEXT,
        files=FILES,
        options=TrackingOptions(uri=uri, experiment="mergeflow-test"),
    )
    assert run_id is not None
    check_run(uri, run_id, manifest, tmp_path)
    keys = [o["Key"] for o in s3_client(endpoint).list_objects_v2(Bucket=endpoint.bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith(f"{run_id}/artifacts/stats/task_overlap.png") for k in keys), keys


def test_dead_server_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # free a moment ago: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as exc:
        log_merge(
            make_manifest(), output="/runs/out", config_text=CONFIG_TEXT, files=FILES, options=TrackingOptions(uri=uri)
        )
    assert time.monotonic() - t0 < 20
    message = str(exc.value)
    assert message.startswith(f"MLflow tracking at {uri} failed while ")
    assert "connection refused" in message and message.endswith("the merge itself is committed at /runs/out")
    assert "\n" not in message
    # The fast-fail HTTP settings were ours for the call only.
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_password_in_uri_is_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://user:hunter2@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError) as exc:
        log_merge(make_manifest(), output="/runs/out", config_text=None, files={}, options=TrackingOptions(uri=uri))
    assert "hunter2" not in str(exc.value) and "user:***@127.0.0.1" in str(exc.value)


def test_disabled_logs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert (
        log_merge(
            make_manifest(),
            output="/runs/out",
            config_text=CONFIG_TEXT,
            files=FILES,
            options=TrackingOptions(enabled=False),
        )
        is None
    )
    assert list(tmp_path.iterdir()) == []


def test_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert TrackingOptions().tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert TrackingOptions().tracking_uri() == "http://tracking.example:5000"
    assert TrackingOptions(uri="sqlite:///x.db").tracking_uri() == "sqlite:///x.db"
    assert not (tmp_path / "mlflow.db").exists()
