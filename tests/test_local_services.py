"""Real SeaweedFS and MLflow servers on 127.0.0.1: S3 semantics we rely on, restart, proxied artifacts."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from mergeflow.dev.local_services import MlflowServer, S3Endpoint, SeaweedS3Server, free_port, main, s3_client

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3Server]:
    server = SeaweedS3Server(tmp_path_factory.mktemp("seaweed"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture()
def endpoint(seaweed: SeaweedS3Server) -> S3Endpoint:
    assert seaweed.endpoint is not None
    return seaweed.endpoint


def _listening(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["s3", "--help"])
    assert exc.value.code == 0
    assert "--dir" in capsys.readouterr().out


def test_endpoint_env_and_repr_hide_nothing_needed() -> None:
    ep = S3Endpoint("http://127.0.0.1:1", "key", "very-secret", "b")
    assert ep.env() == {
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "very-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1",
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:1",
    }
    assert "very-secret" not in repr(ep)


@pytest.mark.slow
def test_put_get_and_range(endpoint: S3Endpoint) -> None:
    s3 = s3_client(endpoint)
    s3.put_object(Bucket=endpoint.bucket, Key="small/obj.bin", Body=b"0123456789")
    assert s3.get_object(Bucket=endpoint.bucket, Key="small/obj.bin")["Body"].read() == b"0123456789"
    part = s3.get_object(Bucket=endpoint.bucket, Key="small/obj.bin", Range="bytes=2-5")
    assert part["Body"].read() == b"2345"
    assert part["ContentRange"] == "bytes 2-5/10"
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket=endpoint.bucket, Key="small/missing")
    assert exc.value.response["Error"]["Code"] in ("NoSuchKey", "404")


@pytest.mark.slow
def test_multipart_upload(endpoint: S3Endpoint) -> None:
    s3 = s3_client(endpoint)
    # 5 MiB is S3's minimum for every part but the last.
    chunks = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(2 * MIB)]
    key = "multi/blob.bin"
    upload_id = s3.create_multipart_upload(Bucket=endpoint.bucket, Key=key)["UploadId"]
    parts = []
    for number, chunk in enumerate(chunks, start=1):
        etag = s3.upload_part(Bucket=endpoint.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk)[
            "ETag"
        ]
        parts.append({"ETag": etag, "PartNumber": number})
    done = s3.complete_multipart_upload(
        Bucket=endpoint.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )
    assert done["ETag"].strip('"').endswith("-3")  # a multipart ETag, not an MD5 of the content
    body = s3.get_object(Bucket=endpoint.bucket, Key=key)["Body"].read()
    assert len(body) == 12 * MIB
    assert hashlib.sha256(body).digest() == hashlib.sha256(b"".join(chunks)).digest()
    # A range spanning the first part boundary.
    tail = s3.get_object(Bucket=endpoint.bucket, Key=key, Range=f"bytes={5 * MIB - 3}-{5 * MIB + 2}")
    assert tail["Body"].read() == chunks[0][-3:] + chunks[1][:3]


@pytest.mark.slow
def test_wrong_credentials_are_rejected(endpoint: S3Endpoint) -> None:
    s3_client(endpoint).put_object(Bucket=endpoint.bucket, Key="auth/obj", Body=b"x")
    for access, secret in ((endpoint.access_key, "wrong-secret"), ("nobody", endpoint.secret_key)):
        bad = s3_client(endpoint, access_key=access, secret_key=secret, max_attempts=1)
        with pytest.raises(ClientError) as exc:
            bad.get_object(Bucket=endpoint.bucket, Key="auth/obj")
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with pytest.raises(ClientError):
            bad.put_object(Bucket=endpoint.bucket, Key="auth/intruder", Body=b"y")


@pytest.mark.slow
def test_restart_keeps_data_and_ports(seaweed: SeaweedS3Server, endpoint: S3Endpoint) -> None:
    s3_client(endpoint).put_object(Bucket=endpoint.bucket, Key="durable/obj", Body=b"survives")
    again = seaweed.restart()
    assert again == endpoint
    body = s3_client(again).get_object(Bucket=again.bucket, Key="durable/obj")["Body"].read()
    assert body == b"survives"


@pytest.mark.slow
def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))  # bound, not listening: weed cannot bind it, probes are refused at once
        server = SeaweedS3Server(tmp_path / "busy", port=busy.getsockname()[1])
        with pytest.raises(RuntimeError, match="failed to start") as exc:
            server.start(timeout=30)
    assert "weed.log" in str(exc.value) and "weed mini" in str(exc.value)
    assert not server.running


@pytest.mark.slow
def test_mlflow_artifacts_go_through_server_to_s3(
    endpoint: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    # The client gets no S3 credentials: artifacts can only reach S3 through the server's proxy.
    for var in (*endpoint.env(), "MLFLOW_TRACKING_URI", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    with MlflowServer(tmp_path / "mlflow", endpoint) as server:
        assert server.tracking_uri is not None
        client = mlflow.MlflowClient(tracking_uri=server.tracking_uri)
        experiment_id = client.create_experiment("local-services-test")
        run = client.create_run(experiment_id)
        run_id = run.info.run_id
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        client.log_param(run_id, "method", "ties")
        artifact = tmp_path / "merge_report.txt"
        artifact.write_text("merged 8 checkpoints\n")
        client.log_artifact(run_id, str(artifact), artifact_path="reports")
        client.set_terminated(run_id)

        assert client.get_run(run_id).data.params == {"method": "ties"}
        local = client.download_artifacts(run_id, "reports/merge_report.txt", str(tmp_path / "dl"))
        assert Path(local).read_text() == "merged 8 checkpoints\n"

    keys = [
        obj["Key"] for obj in s3_client(endpoint).list_objects_v2(Bucket=endpoint.bucket, Prefix="mlflow/")["Contents"]
    ]
    assert any(k.endswith(f"{run_id}/artifacts/reports/merge_report.txt") for k in keys), keys


@pytest.mark.slow
def test_cli_s3_prints_exports_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mergeflow.dev.local_services",
            "s3",
            "--dir",
            str(tmp_path / "cli"),
            "--secret-key",
            "cli-secret",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("export MLFLOW_S3_ENDPOINT_URL="):
                break
        exports = dict(
            line.removeprefix("export ").strip().split("=", 1) for line in lines if line.startswith("export ")
        )
        assert exports["AWS_SECRET_ACCESS_KEY"] == "cli-secret", lines
        # The secret appears only in its own export line.
        assert sum("cli-secret" in line for line in lines) == 1
        url = exports["AWS_ENDPOINT_URL_S3"]
        assert _listening(url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not _listening(url)  # weed was stopped, not orphaned
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
