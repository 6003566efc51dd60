"""Hostile or unlucky input and environments: foreign folders, concurrent merges, crafted runs,
credentials, MLflow outages, a modified parent, a full disk, a killed worker, garbage manifests.
Each test reproduces a defect seen with tiny families; none of them passes on the code before
the fixes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergeflow.dev.local_services import free_port
from mergeflow.workflows.cli import main

REPO = Path(__file__).resolve().parents[1]
MERGEFLOW = str(Path(sys.executable).with_name("mergeflow"))


def write_config(path: Path, base, tasks, output, method=None, **extra) -> Path:
    raw = {
        "base": str(base),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
        "output": str(output),
        "method": method or {"name": "task_arithmetic"},
        **extra,
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line_error(capsys, rc: int, code: int = 2) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == code, captured
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.out + captured.err, err
    return err


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------- foreign folders and --overwrite


def foreign_folder(out: Path) -> dict[str, bytes]:
    (out / "model").mkdir(parents=True)
    (out / "stats").mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "my experiment", "files": ["model/my_model.bin"]}))
    (out / "model" / "my_model.bin").write_bytes(b"\x00weights")
    (out / "stats" / "notes.txt").write_text("lab notes")
    return tree(out)


def test_a_foreign_manifest_is_not_a_finished_merge_and_overwrite_touches_nothing(capsys, tmp_path, family):
    base, tasks = family(tasks=2)
    out = tmp_path / "out"
    before = foreign_folder(out)
    cfg = write_config(tmp_path / "merge.yaml", base, tasks, out)
    err = one_line_error(capsys, main(["merge", str(cfg), "--quiet", "--no-tracking"]))
    assert str(out) in err and "finished merge" not in err and "not a manifest mergeflow wrote" in err
    err = one_line_error(capsys, main(["merge", str(cfg), "--quiet", "--no-tracking", "--overwrite"]))
    assert str(out) in err and "nothing was touched" in err
    assert tree(out) == before


def test_a_garbage_manifest_gives_one_line_from_merge_and_inspect(capsys, tmp_path, family):
    base, tasks = family(tasks=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(b'{"format": "mergeflow.run/1", "outputs": {')
    cfg = write_config(tmp_path / "merge.yaml", base, tasks, out)
    assert "not a manifest mergeflow wrote" in one_line_error(capsys, main(["merge", str(cfg), "--quiet"]))
    assert "not a manifest mergeflow wrote" in one_line_error(capsys, main(["inspect", str(out)]))


def test_overwrite_removes_only_what_the_run_lists(ray_session, capsys, tmp_path, family):
    base, tasks = family(tasks=2)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "merge.yaml", base, tasks, out, {"name": "task_arithmetic", "alpha": 0.3})
    assert main(["merge", str(cfg), "--quiet", "--no-tracking"]) == 0
    (out / "README.md").write_text("what this folder is")  # the user's own files next to and inside the run
    (out / "model" / "notes.txt").write_text("kept")
    other = write_config(tmp_path / "other.yaml", base, tasks, out, {"name": "task_arithmetic", "alpha": 0.5})
    assert main(["merge", str(other), "--quiet", "--no-tracking", "--overwrite"]) == 0
    capsys.readouterr()
    assert (out / "README.md").read_text() == "what this folder is"
    assert (out / "model" / "notes.txt").read_text() == "kept"
    assert json.loads((out / "manifest.json").read_text())["method"]["alpha"] == 0.5


# ----------------------------------------------------------------------------- concurrent merges


def slow_family(root: Path) -> Path:
    """A family whose merge takes a few seconds with tiny chunks: long enough to race against."""
    subprocess.run(
        [
            MERGEFLOW,
            "make-family",
            str(root),
            "--tasks",
            "4",
            "--layers",
            "6",
            "--hidden",
            "256",
            "--vocab",
            "2048",
            "--shards",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    return root


def test_a_second_merge_into_the_same_output_exits_75_naming_the_holder(ray_session, capsys, tmp_path):
    fam = slow_family(tmp_path / "fam")
    out = tmp_path / "out"
    raw = yaml.safe_load((fam / "config.yaml").read_text())
    raw |= {
        "base": str(fam / raw["base"]),
        "output": str(out),
        "execution": {"chunk_elems": 1024, "shard_size": 200_000},
        "tasks": [t | {"checkpoint": str(fam / t["checkpoint"])} for t in raw["tasks"]],
    }
    first = tmp_path / "a.yaml"
    first.write_text(yaml.safe_dump(raw | {"method": {"name": "task_arithmetic", "alpha": 0.3}}))
    second = tmp_path / "b.yaml"
    second.write_text(yaml.safe_dump(raw | {"method": {"name": "task_arithmetic", "alpha": 0.9}}))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(
        [MERGEFLOW, "merge", str(first), "--quiet", "--no-tracking"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / ".mergeflow.lock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        for cfg in (second, first):  # other settings, and the same config fired twice (cron)
            err = one_line_error(capsys, main(["merge", str(cfg), "--quiet", "--no-tracking"]), code=75)
            assert f"pid {proc.pid}" in err and "locked by" in err
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["alpha"] == 0.3
    for rel, entry in manifest["outputs"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == entry["sha256"], rel


# ----------------------------------------------------------------------------------- crafted runs


def test_reconstruct_refuses_a_weight_map_that_escapes_the_output(ray_session, capsys, tmp_path, family):
    base, tasks = family(tasks=2)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "merge.yaml", base, tasks, run, {"name": "tall_masks"})
    assert main(["merge", str(cfg), "--quiet", "--no-tracking"]) == 0
    index_path = run / "model" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-/../../../escaped.safetensors"
    data = json.dumps(index).encode()
    index_path.write_bytes(data)
    manifest = json.loads((run / "manifest.json").read_text())  # a consistent forgery: the hash matches
    manifest["outputs"]["model/model.safetensors.index.json"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = tmp_path / "deep" / "er" / "rebuilt"
    rc = main(["reconstruct", str(run), "--task", tasks[0][0], "--output", str(rebuilt), "--quiet"])
    assert "escaped.safetensors" in one_line_error(capsys, rc)
    assert not list(tmp_path.rglob("escaped.safetensors"))


def test_manifest_paths_that_leave_the_run_are_refused(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    doc = {
        "format": "mergeflow.run/1",
        "outputs": {"../../etc/owned": {"sha256": "0" * 64, "size": 1}},
        "inputs": {"base": {"uri": "/b", "files": {}}, "tasks": []},
    }
    (run / "manifest.json").write_text(json.dumps(doc))
    assert "not a relative path inside the folder" in one_line_error(capsys, main(["inspect", str(run)]))


def test_a_task_name_with_a_trailing_newline_is_refused(tmp_path):
    from mergeflow.errors import ConfigError
    from mergeflow.workflows.config import config_from_dict

    raw = {
        "base": "/b",
        "tasks": [{"name": "task_00\n", "checkpoint": "/t"}],
        "output": str(tmp_path),
        "method": {"name": "task_arithmetic"},
    }
    with pytest.raises(ConfigError, match="task name"):
        config_from_dict(raw)


# ------------------------------------------------------------------------------ credentials, MLflow


def test_debug_does_not_print_the_aws_session_token(tmp_path):
    port = free_port()  # nothing listens there: the request fails, after botocore would have logged it
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": "s3://bucket/base",
                "tasks": [{"name": "a", "checkpoint": "s3://bucket/a"}],
                "output": str(tmp_path / "out"),
                "method": {"name": "task_arithmetic"},
                "storage": {"endpoint_url": f"http://127.0.0.1:{port}"},
            }
        )
    )
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
        AWS_SECRET_ACCESS_KEY="SECRETKEYEXAMPLE",
        AWS_SESSION_TOKEN="SESSIONTOKEN-0123456789",
        RAY_AUTH_MODE="disabled",
    )
    proc = subprocess.run(
        [MERGEFLOW, "--debug", "merge", str(cfg), "--quiet", "--no-tracking"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr  # --debug was on
    for secret in ("SESSIONTOKEN-0123456789", "SECRETKEYEXAMPLE"):
        assert secret not in proc.stdout + proc.stderr
    assert "DEBUG botocore" not in proc.stderr


@pytest.mark.slow
def test_credentials_in_the_tracking_uri_are_not_written_or_printed(ray_session, capsys, tmp_path, family):
    from mergeflow.dev.local_services import MlflowServer

    base, tasks = family(tasks=2)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "merge.yaml", base, tasks, out)
    with MlflowServer(tmp_path / "mlflow") as server:
        uri = server.tracking_uri.replace("http://", "http://mfuser:TOKEN-s3cr3t-42@")
        assert main(["merge", str(cfg), "--quiet", "--tracking-uri", uri]) == 0
    captured = capsys.readouterr()
    assert "mfuser:***@" in captured.out
    assert "TOKEN-s3cr3t-42" not in captured.out + captured.err
    tracked = (out / "tracking.json").read_text()
    assert "TOKEN-s3cr3t-42" not in tracked and "mfuser:***@" in tracked


def test_a_committed_run_whose_tracking_failed_is_tracked_when_run_again(ray_session, capsys, tmp_path, family):
    import mlflow

    base, tasks = family(tasks=2)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "merge.yaml", base, tasks, out)
    down = f"http://127.0.0.1:{free_port()}"
    assert main(["merge", str(cfg), "--quiet", "--tracking-uri", down]) == 3
    assert (out / "manifest.json").exists() and not (out / "tracking.json").exists()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["merge", str(cfg), "--quiet", "--tracking-uri", uri, "--experiment", "late"]) == 0
    assert "logging it" in capsys.readouterr().out
    run_id = json.loads((out / "tracking.json").read_text())["run_id"]
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["method"] == "task_arithmetic"
    assert main(["merge", str(cfg), "--quiet", "--tracking-uri", uri, "--experiment", "late"]) == 0
    assert "nothing to do" in capsys.readouterr().out  # tracked now: not logged twice


# ------------------------------------------------------------------------------- modified parents


def test_a_modified_parent_sum_is_not_extended(ray_session, tmp_path, family):
    from conftest import config_for

    from mergeflow.workflows.merge import run_merge
    from mergeflow.workflows.remerge import remerge

    base, tasks = family(tasks=4, layers=2, hidden=32, vocab=64)
    root = tmp_path / "root"
    execution = {"shard_size": 20_000, "chunk_elems": 256}
    method = {"name": "task_arithmetic", "alpha": 0.3}
    first = remerge(config_for(base, tasks[:3], root, method, **execution), quiet=True)
    delta = sorted((Path(first.run) / "delta").glob("*.safetensors"))[0]
    data = bytearray(delta.read_bytes())
    data[-3] ^= 0x40  # one flipped bit in a weight: same size, same header
    delta.write_bytes(bytes(data))
    second = remerge(config_for(base, tasks, root, method, **execution), quiet=True)
    assert second.reused["sum_of_tasks"] == []
    scratch = run_merge(config_for(base, tasks, tmp_path / "scratch", method, **execution), quiet=True)

    def model(run) -> dict:
        m = json.loads((Path(run) / "manifest.json").read_text())["outputs"]
        return {rel: o["sha256"] for rel, o in m.items() if rel.startswith("model/")}

    assert model(second.run) == model(scratch.plan.config.output)


# ------------------------------------------------------------------------ disks, killed processes


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_gives_one_line_and_leaves_no_temp_files(ray_session, capsys, tmp_path, family, small_disk):
    base, tasks = family(tasks=3, layers=2, hidden=128, vocab=1024)
    out = small_disk / "out"
    cfg = write_config(tmp_path / "merge.yaml", base, tasks, out, execution={"shard_size": 100_000})
    err = one_line_error(capsys, main(["merge", str(cfg), "--quiet", "--no-tracking"]))
    assert "no space left" in err and str(out) in err and "MB free" in err
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "manifest.json").exists()


def _holders_of(path: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(os.readlink(fd) == str(path) for fd in (proc / "fd").iterdir()):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_a_worker_killed_mid_merge_leaves_only_listed_files(tmp_path):
    fam = slow_family(tmp_path / "fam")
    out = tmp_path / "out"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    cmd = [MERGEFLOW, "merge", str(fam / "config.yaml"), "--output", str(out), "--quiet", "--no-tracking"]
    raw = yaml.safe_load((fam / "config.yaml").read_text())
    (fam / "config.yaml").write_text(yaml.safe_dump(raw | {"execution": {"chunk_elems": 512, "shard_size": 150_000}}))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        for tmp in (out / "model").glob(".*.tmp") if (out / "model").exists() else []:
            for pid in _holders_of(tmp):
                if pid != proc.pid:
                    os.kill(pid, signal.SIGKILL)  # a Ray worker, mid-file
                    killed = pid
                    break
            if killed:
                break
        time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=300)
    assert killed is not None, "no worker was caught writing"
    assert proc.returncode == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    ours = {
        str(p.relative_to(out))
        for d in ("model", "compressed", "delta", "stats")
        for p in (out / d).rglob("*")
        if p.is_file()
    }
    assert ours == set(manifest["outputs"])  # no temp file of the killed writer, nothing unlisted


def test_files_and_their_folder_are_synced_around_the_rename(tmp_path, monkeypatch):
    """A power loss after the manifest must not find it pointing at empty files: data reaches the
    disk before the rename publishes it, and the rename before commit() returns."""
    import stat

    from mergeflow.infra.storage.local import LocalStorage

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    LocalStorage().write_bytes(str(tmp_path / "new" / "manifest.json"), b"{}")
    assert events[-3:] == ["fsync file", "rename", "fsync dir"]
    assert events.count("fsync dir") >= 2  # the new folder's own entry in its parent, too
