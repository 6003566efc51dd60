"""The S3 path end to end against a real SeaweedFS server on 127.0.0.1: a merge, a
reconstruct and an inspect over s3:// give byte-identical files to the same work on
local files; workers read by range; wrong credentials, missing buckets and a server
that goes away fail as one-line MergeflowErrors; credentials never reach any output.

Credentials travel only through the standard AWS chain (environment). Ray workers
inherit the environment of the process at `ray.init`, which may happen in another
test module first, so the test credentials are put into os.environ at import time
(collection happens before any fixture runs). setdefault: if the session already
carries AWS credentials, the server is started with those instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("AWS_ACCESS_KEY_ID", "mergeflow")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "mf-e2e-Secret-7Qx2vLp9")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import same_place_free  # noqa: E402

from mergeflow.dev.local_services import SeaweedS3Server, s3_client  # noqa: E402
from mergeflow.errors import MergeflowError  # noqa: E402
from mergeflow.infra.storage import StorageOptions  # noqa: E402
from mergeflow.workflows.commit import OutputState  # noqa: E402
from mergeflow.workflows.config import config_from_dict  # noqa: E402
from mergeflow.workflows.inspect_run import describe  # noqa: E402
from mergeflow.workflows.merge import run_merge  # noqa: E402
from mergeflow.workflows.reconstruct import reconstruct  # noqa: E402

pytestmark = pytest.mark.slow

METHOD = {"name": "tall_masks", "alpha": 0.3, "lambda": 0.4}
EXECUTION = {"shard_size": 4000, "chunk_elems": 64}
FAMILY_INDEX = "model.safetensors.index.json"
FAMILY = dict(tasks=3, layers=2, hidden=16, vocab=32, dtype=torch.bfloat16, shards=2, seed=0)


# ------------------------------------------------------------------------ fixtures


class S3:
    """The module's server seen by one test: a fresh key prefix, an admin client."""

    def __init__(self, server: SeaweedS3Server):
        assert server.endpoint is not None
        self.server = server
        self.endpoint = server.endpoint
        self.bucket = server.endpoint.bucket
        self.prefix = f"t-{uuid.uuid4().hex[:10]}"
        self.client = s3_client(server.endpoint)
        self.options = StorageOptions(server.endpoint.url, server.endpoint.region)

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", self.prefix, *parts])

    def upload_dir(self, local: Path, *parts: str) -> str:
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            key = "/".join([self.prefix, *parts, f.relative_to(local).as_posix()])
            self.client.put_object(Bucket=self.bucket, Key=key, Body=f.read_bytes())
        return self.uri(*parts)

    def keys(self, *parts: str) -> dict[str, str]:
        """Relative name -> key of every object under prefix/parts/."""
        root = "/".join([self.prefix, *parts]) + "/"
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root):
            for o in page.get("Contents", []):
                out[o["Key"][len(root) :]] = o["Key"]
        return out

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()


@pytest.fixture()
def s3(s3_server) -> S3:
    if not s3_server.running:  # a fault test that failed half way
        s3_server.start()
    return S3(s3_server)


def make_config(base: str, tasks: list[tuple[str, str]], output: str, s3: S3 | None = None):
    raw = {
        "base": str(base),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
        "output": str(output),
        "method": METHOD,
        "execution": EXECUTION,
    }
    if s3 is not None:
        raw["storage"] = {"endpoint_url": s3.endpoint.url, "region": s3.endpoint.region}
    return config_from_dict(raw)


def upload_family(s3: S3, base_dir: Path, task_dirs) -> tuple[str, list[tuple[str, str]]]:
    base = s3.upload_dir(base_dir, "inputs", base_dir.name)
    tasks = [(n, s3.upload_dir(p, "inputs", p.name)) for n, p in task_dirs]
    return base, tasks


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def compared(rel: str) -> bool:
    """Run files that must match byte for byte (the manifest and the journal hold
    URIs and timestamps; the plot is not a result)."""
    return (
        (rel.startswith("model/") and rel.endswith(".safetensors"))
        or (rel.startswith("compressed/") and rel.endswith(".safetensors"))
        or rel == "stats/layers.json"
    )


def assert_run_equals_local(s3: S3, run_parts: tuple[str, ...], local_run: Path) -> None:
    local = {r: b for r, b in local_files(local_run).items() if not r.startswith(".mergeflow/")}
    remote = {r: k for r, k in s3.keys(*run_parts).items() if not r.startswith(".mergeflow/")}
    assert sorted(remote) == sorted(local)
    checked = [r for r in local if compared(r)]
    assert any(r.startswith("model/model") and r.endswith(".safetensors") for r in checked) and any(
        r.startswith("compressed/masks/") for r in checked
    )
    for rel in checked:
        assert s3.get(remote[rel]) == local[rel], rel


def secret_in(data: bytes) -> bool:
    return os.environ["AWS_SECRET_ACCESS_KEY"].encode() in data


# -------------------------------------------------------------- merge, reconstruct


@pytest.fixture(scope="module")
def merged(ray_session, s3_server, tmp_path_factory):
    """The same merge from s3:// to s3:// and from local files to a local output, once
    for the tests that only read the results. The family is what the `family` fixture
    makes (that one is function-scoped)."""
    from mergeflow.dev.synthetic import make_family

    tmp = tmp_path_factory.mktemp("merged")
    s3 = S3(s3_server)
    base_dir, task_dirs = make_family(tmp / "family", **FAMILY)
    base, tasks = upload_family(s3, base_dir, task_dirs)
    s3_report = run_merge(make_config(base, tasks, s3.uri("run"), s3), quiet=True)
    local_report = run_merge(make_config(base_dir, task_dirs, tmp / "run"), quiet=True)
    return s3, s3_report, local_report, tmp / "run", task_dirs


def test_s3_merge_reconstruct_inspect_equal_local(merged, tmp_path):
    s3, s3_report, local_report, local_run, task_dirs = merged
    assert s3_report.state is OutputState.FRESH and len(s3_report.plan.shards) >= 4
    assert len(s3_report.plan.base.files) == 2  # an index json and two shards per checkpoint
    assert_run_equals_local(s3, ("run",), local_run)
    # Both manifests record the same output hashes; only URIs and timestamps differ.
    assert same_place_free(s3_report.manifest["outputs"]) == same_place_free(local_report.manifest["outputs"])
    assert s3_report.manifest["inputs"]["base"]["uri"].startswith("s3://")
    assert s3.keys("run")["manifest.json"]

    task = task_dirs[-1][0]
    reconstruct(s3.uri("run"), task, s3.uri("rebuilt"), s3.options, quiet=True)
    reconstruct(str(local_run), task, str(tmp_path / "rebuilt"), StorageOptions(), quiet=True)
    local = local_files(tmp_path / "rebuilt")
    remote = s3.keys("rebuilt")
    assert sorted(remote) == sorted(local)
    assert sum(r.endswith(".safetensors") for r in local) >= 4
    for rel, data in local.items():  # safetensors parts, index and config: no URIs in any of them
        assert s3.get(remote[rel]) == data, rel

    text = describe(s3.uri("run"), s3.options)
    assert f"run         {s3.uri('run')}" in text
    assert "tall_masks" in text and "plot        s3://" in text
    assert f"{len(s3_report.plan.shards)} shard(s)" in text


def test_workers_read_ranges_not_whole_checkpoints(merged):
    s3, report, local_report, _, _ = merged
    plan = report.plan
    input_bytes = report.manifest["summary"]["input_bytes"]
    tensor_bytes = sum(i.nbytes for cp in [plan.base, *plan.tasks] for i in cp.tensors.values())
    assert input_bytes == plan.input_bytes > tensor_bytes
    # Every tensor read exactly once, by range; headers (read by the planner) and
    # anything else in the files never reach the workers.
    assert report.bytes_read == tensor_bytes == local_report.bytes_read
    assert report.bytes_read < 1.5 * input_bytes
    assert report.manifest["summary"]["bytes_read"] == report.bytes_read


def test_credentials_never_written(merged):
    s3, report, _, local_run, _ = merged
    assert not secret_in(s3.get(s3.keys("run")["manifest.json"]))
    for rel, key in s3.keys().items():  # everything this test wrote, inputs included
        assert not secret_in(s3.get(key)), rel
    for rel, data in local_files(local_run).items():
        assert not secret_in(data), rel
    assert not secret_in(repr(report.plan.shards[0]).encode())  # what Ray ships to workers


# -------------------------------------------------------------------------- faults


def assert_nothing_written(s3: S3, *parts: str) -> None:
    assert "manifest.json" not in s3.keys(*parts)


@pytest.mark.parametrize(
    "var,value,where",
    [
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret", "s3"),
        ("AWS_ACCESS_KEY_ID", "nobody", "s3"),
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret", "output"),
    ],
    ids=["wrong-secret", "unknown-key", "wrong-secret-output-only"],
)
def test_wrong_credentials(ray_session, s3, family, tmp_path, monkeypatch, var, value, where):
    base_dir, task_dirs = family(tasks=2)
    base, tasks = upload_family(s3, base_dir, task_dirs)
    if where == "output":
        base, tasks = base_dir, task_dirs
    monkeypatch.setenv(var, value)
    t0 = time.monotonic()
    with pytest.raises(MergeflowError) as err:
        run_merge(make_config(base, tasks, s3.uri("run"), s3), quiet=True)
    monkeypatch.undo()
    msg = str(err.value)
    assert "\n" not in msg and time.monotonic() - t0 < 20
    assert "access denied" in msg and "credentials" in msg, msg
    assert f"s3://{s3.bucket}/{s3.prefix}/" in msg, msg
    assert value not in msg and os.environ["AWS_SECRET_ACCESS_KEY"] not in msg
    assert s3.keys("run") == {}  # nothing at all was written


def test_missing_bucket(ray_session, s3, family, tmp_path):
    base_dir, task_dirs = family(tasks=2)
    base, tasks = upload_family(s3, base_dir, task_dirs)
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"

    with pytest.raises(MergeflowError) as err:  # the output's bucket
        run_merge(make_config(base, tasks, f"s3://{missing}/run", s3), quiet=True)
    msg = str(err.value)
    assert f"bucket {missing!r} does not exist" in msg and f"s3://{missing}/run" in msg, msg

    with pytest.raises(MergeflowError) as err:  # an input's bucket
        run_merge(make_config(f"s3://{missing}/base", tasks, s3.uri("run"), s3), quiet=True)
    msg = str(err.value)
    assert f"bucket {missing!r} does not exist" in msg and f"s3://{missing}/base" in msg and "base" in msg, msg

    with pytest.raises(MergeflowError) as err:  # a bucket that exists, a prefix that does not
        run_merge(make_config(s3.uri("inputs", "nothing-here"), tasks, s3.uri("run"), s3), quiet=True)
    assert f"{s3.uri('inputs', 'nothing-here')}: checkpoint not found" in str(err.value)

    # SeaweedFS creates buckets on PUT: a merge that wrote anything would have made it.
    assert missing not in [b["Name"] for b in s3.client.list_buckets()["Buckets"]]
    assert s3.keys("run") == {}


def restart_serving(s3: S3, probe_key: str, timeout: float = 60) -> None:
    """restart() returns once HeadBucket answers, which the filer does before the volume
    server serves data: under load GETs fail with HTTP 500 for a few seconds more."""
    s3.server.restart()
    deadline = time.monotonic() + timeout
    while True:
        try:
            s3.get(probe_key)
            s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}-ready", Body=b"")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_ray_idle(ray, timeout: float = 60) -> None:
    """Tasks of a failed merge that were not cancelled keep running (see the report);
    let them finish so they cannot race the next merge's writes."""
    total = ray.cluster_resources().get("CPU", 0)
    deadline, idle_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= total:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 1.0:
                return
        else:
            idle_since = None
        time.sleep(0.1)


def test_server_down_then_restart_resumes(ray_session, s3, family, tmp_path, monkeypatch):
    base_dir, task_dirs = family(**(FAMILY | {"layers": 6}))
    base, tasks = upload_family(s3, base_dir, task_dirs)
    config = make_config(base, tasks, s3.uri("run"), s3)
    local = run_merge(make_config(base_dir, task_dirs, tmp_path / "run"), quiet=True)
    probe = s3.keys("inputs")[f"{base_dir.name}/{FAMILY_INDEX}"]
    assert len(local.plan.shards) >= 8

    # 1. The server is down before the merge starts: the planner fails fast.
    s3.server.stop()
    t0 = time.monotonic()
    with pytest.raises(MergeflowError) as err:
        run_merge(config, quiet=True)
    msg = str(err.value)
    assert "cannot reach the S3 endpoint" in msg and s3.endpoint.url in msg and "\n" not in msg, msg
    assert time.monotonic() - t0 < 30
    restart_serving(s3, probe)
    assert s3.keys("run") == {}

    # 2. The server goes away mid-merge: right after the first shard is journaled.
    from mergeflow.workflows.journal import Journal

    record = Journal.record
    stopped = []

    def record_then_stop(self, result):
        record(self, result)
        if not stopped:
            stopped.append(result.index)
            s3.server.stop()

    monkeypatch.setattr(Journal, "record", record_then_stop)
    t0 = time.monotonic()
    with pytest.raises(MergeflowError) as err:
        run_merge(config, quiet=True)
    msg = str(err.value)
    # Refused connections, or HTTP 500 from a server that is shutting down: either way one line naming it.
    assert stopped and f"S3 endpoint {s3.endpoint.url}" in msg and "\n" not in msg, msg
    assert time.monotonic() - t0 < 60
    monkeypatch.undo()
    restart_serving(s3, probe)
    wait_ray_idle(ray_session)
    assert_nothing_written(s3, "run")
    assert f".mergeflow/shards/{stopped[0] + 1:05d}.json" in s3.keys("run")

    # 3. Back up: the re-run resumes from the journal and finishes with the local bytes.
    report = run_merge(config, quiet=True)
    assert report.state is OutputState.RESUME and report.shards_reused >= 1
    assert report.shards_reused + report.shards_run == len(report.plan.shards)
    assert_run_equals_local(s3, ("run",), tmp_path / "run")
    assert same_place_free(report.manifest["outputs"]) == same_place_free(local.manifest["outputs"])
