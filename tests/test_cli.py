"""The CLI contract end to end on a real local Ray runtime and a real sqlite MLflow store."""

from __future__ import annotations

import json

import mlflow
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
    done = subprocess.run(
        [sys.executable, "-m", "mergeflow.workflows.cli", "merge", cfg, "--quiet", "--tracking-uri", uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "merged 3 tasks with task_arithmetic" in done.stdout and "timings" in done.stdout
    tracked = json.loads((tmp_path / "out" / "tracking.json").read_text())
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(tracked["run_id"]).info.status == "FINISHED"

    bad = subprocess.run(
        [sys.executable, "-m", "mergeflow.workflows.cli", "inspect", str(tmp_path / "nothing")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("mergeflow: error:")
