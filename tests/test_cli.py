"""The CLI contract end to end on a real local Ray runtime and a real sqlite MLflow store."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
import yaml

from mergeflow.dev.local_services import free_port
from mergeflow.workflows.cli import main


def make_config(tmp_path, family, method) -> str:
    base, tasks = family(tasks=3)
    path = tmp_path / "merge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
                "output": "out",
                "method": method,
            }
        )
    )
    return str(path)


def test_merge_inspect_reconstruct_and_tracking(ray_session, capsys, tmp_path, family):
    cfg = make_config(tmp_path, family, {"name": "consensus", "k": 2, "lambda": 0.3})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["merge", cfg, "--quiet", "--tracking-uri", uri, "--experiment", "cli-test"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "out"  # relative `output` resolves against the config file's folder
    assert "merged 3 tasks with consensus" in out and "weights kept by c tasks" in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"]["k"] == 2 and len(manifest["inputs"]["tasks"]) == 3
    for rel, entry in manifest["outputs"].items():
        assert (run / rel).stat().st_size == entry["size"], rel

    tracked = json.loads((run / "tracking.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=uri)
    r = client.get_run(tracked["run_id"])
    assert r.data.params["method"] == "consensus" and r.data.params["num_tasks"] == "3"
    assert r.data.metrics["selfish_share"] == manifest["summary"]["selfish_share"]
    assert r.data.tags["mergeflow.output"] == str(run)

    assert main(["inspect", str(run), "--layers"]) == 0
    text = capsys.readouterr().out
    assert "method      consensus" in text and "model.layers.1" in text

    assert main(["reconstruct", str(run), "--task", "task_01", "--output", str(tmp_path / "t1"), "--quiet"]) == 0
    assert (tmp_path / "t1" / "model.safetensors.index.json").exists()
    assert (tmp_path / "t1" / "config.json").exists()

    assert main(["reconstruct", str(run), "--task", "nope", "--output", str(tmp_path / "t2")]) == 2
    assert "no task 'nope'" in capsys.readouterr().err


def test_tracking_failure_keeps_the_committed_merge(ray_session, capsys, tmp_path, family):
    cfg = make_config(tmp_path, family, {"name": "task_arithmetic"})
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["merge", cfg, "--quiet", "--tracking-uri", dead]) == 3
    err = capsys.readouterr().err.strip()
    assert dead in err and "committed" in err and len(err.splitlines()) == 1
    assert (tmp_path / "out" / "manifest.json").exists()


def test_help_explains_the_config(capsys):
    try:
        main(["merge", "--help"])
    except SystemExit as e:
        assert e.code == 0
    text = capsys.readouterr().out
    for key in ("base_merge", "density", "lambda", "--ray-address", "--tracking-uri", "manifest.json"):
        assert key in text


def test_the_command_exits_quickly_with_its_output_and_tracking_complete(tmp_path, family):
    """`mergeflow` ends the process right after the atexit handlers (workflows/cli.py run): what is
    printed to a pipe, the MLflow run and the exit status must all survive that."""
    import os
    import subprocess
    import sys

    cfg = make_config(tmp_path, family, {"name": "task_arithmetic"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS="")
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mergeflow.workflows.cli", "merge", cfg, "--quiet", "--tracking-uri", uri]
        + ["--register", "cli-model", "--alias", "champion"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    assert "merged 3 tasks with task_arithmetic" in done.stdout and "timings" in done.stdout
    # The wall line's parts add up to it, and with the exit line it accounts for the whole process.
    wall_line = next(line for line in done.stdout.splitlines() if line.startswith("wall "))
    total, _, parts = wall_line.removeprefix("wall").partition("s = ")
    seconds = {p.rsplit(" ", 1)[0]: float(p.rsplit(" ", 1)[1]) for p in parts.split(", ")}
    assert {"start-up", "imports", "plan", "ray start", "merge", "commit", "tracking", "other"} <= set(seconds), (
        wall_line
    )
    assert seconds["other"] < 1.0, wall_line  # every second of note has a name
    assert sum(seconds.values()) == pytest.approx(float(total), abs=0.05 * len(seconds) + 0.05)
    exit_line = next(line for line in done.stdout.splitlines() if line.startswith("exit "))
    accounted = float(total) + float(exit_line.split()[1].removesuffix("s"))
    assert elapsed - 1.5 <= accounted <= elapsed + 0.1, (elapsed, wall_line, exit_line)
    tracked = json.loads((tmp_path / "out" / "tracking.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(tracked["run_id"]).info.status == "FINISHED"
    assert client.get_model_version_by_alias("cli-model", "champion").run_id == tracked["run_id"]

    # Ray started where the merge needs it, not early (so no shard computed in the driver): same bytes.
    late = subprocess.run(
        [sys.executable, "-m", "mergeflow.workflows.cli", "merge", cfg, "--quiet", "--no-tracking"]
        + ["--output", str(tmp_path / "late")],
        env=env | {"MERGEFLOW_PRESTART": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert late.returncode == 0, late.stderr[-2000:]
    early, baseline = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("out", "late"))
    assert early["outputs"] == baseline["outputs"]
    assert [n["ip"] for n in early["nodes"].values()] == ["127.0.0.1"], early["nodes"]  # driver and workers: one node

    # Tracking runs in a child process of the command: a dead server is still exit 3, one line.
    dead = f"http://127.0.0.1:{free_port()}"
    untracked = subprocess.run(
        [sys.executable, "-m", "mergeflow.workflows.cli", "merge", cfg, "--quiet", "--tracking-uri", dead]
        + ["--output", str(tmp_path / "untracked")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert untracked.returncode == 3, untracked.stderr[-2000:]
    err = untracked.stderr.strip().splitlines()
    assert len(err) == 1 and dead in err[0] and "committed" in err[0], untracked.stderr[-2000:]
    assert (tmp_path / "untracked" / "manifest.json").exists()

    bad = subprocess.run(
        [sys.executable, "-m", "mergeflow.workflows.cli", "inspect", str(tmp_path / "nothing")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("mergeflow: error:")


def test_wall_breakdown_sums_to_the_wall_time():
    from mergeflow.workflows.timings import breakdown, process_age

    parts = dict(breakdown({"plan": 0.5, "ray_start": 4.0, "merge": 2.0, "commit": 1.5, "lora_out": 1.0}, 1.2, 10.0))
    assert parts == pytest.approx(
        {"start-up": 1.2, "plan": 0.5, "ray start": 4.0, "merge": 2.0, "commit": 0.5, "lora out": 1.0, "other": 0.8}
    )
    assert sum(parts.values()) == pytest.approx(10.0)
    assert 0.0 < process_age() < 3600  # this test process started a moment ago, not at boot
