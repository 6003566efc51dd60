"""The MLOps handoff against real servers (an `mlflow server` whose artifacts live in SeaweedFS, run
outputs on that S3 store): registered model versions, the evaluation gate, lineage. A tiny digits
suite goes through three re-merges: a first one, one that adds a task and passes the gate, and one
with a damaged task checkpoint that fails it, leaving the registry and the published run as they were."""

from __future__ import annotations

import os

os.environ.setdefault("AWS_ACCESS_KEY_ID", "mergeflow")  # the module's servers and the workers use these
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "mf-e2e-Secret-7Qx2vLp9")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import json  # noqa: E402
import shutil  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mergeflow.dev.local_services import MlflowServer, s3_client  # noqa: E402
from mergeflow.workflows.cli import main  # noqa: E402

EVALUATOR = "mergeflow.dev.suite.models:evaluate"


@pytest.fixture(scope="module")
def mlflow_on_s3(s3_server, tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3_server.endpoint)
    uri = server.start()
    yield uri, s3_server.endpoint
    server.stop()


def write_config(path, suite, tasks, root, endpoint, **extra) -> str:
    doc = {
        "base": str(suite / "base"),
        "tasks": [{"name": t, "checkpoint": str(suite / t)} for t in tasks],
        "output": root,
        "method": {"name": "tall_masks", "lambda": 0.4},
        "selection": {"evaluator": EVALUATOR, "split": "val"},
        "storage": {"endpoint_url": endpoint.url, "region": endpoint.region},
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def damage(checkpoint) -> None:
    """A fine-tune gone wrong: every weight pushed far from where training left it."""
    f = checkpoint / "model.safetensors"
    sd = load_file(f)
    gen = torch.Generator().manual_seed(0)
    save_file(
        {
            k: (v.float() + 0.5 * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.is_floating_point() else v
            for k, v in sd.items()
        },
        f,
    )


def test_registry_gate_and_lineage_through_three_remerges(ray_session, tiny_suite, mlflow_on_s3, tmp_path, capsys):
    from mlflow import MlflowClient

    uri, endpoint = mlflow_on_s3
    suite = tmp_path / "suite"
    shutil.copytree(tiny_suite[0], suite)
    names = [n for n in tiny_suite[1] if n != "identity"]  # the tiny suite's identity fine-tune is below its base
    root = f"s3://{endpoint.bucket}/mlops-{uuid.uuid4().hex[:8]}/root"
    flags = ["--quiet", "--tracking-uri", uri, "--experiment", "mlops", "--gate", "--register", "digits-merge"]
    client = MlflowClient(tracking_uri=uri)
    s3 = s3_client(endpoint)
    key = root.removeprefix(f"s3://{endpoint.bucket}/")

    def latest() -> str:
        return json.loads(s3.get_object(Bucket=endpoint.bucket, Key=f"{key}/latest.json")["Body"].read())["run"]

    # 1. the first run: every task is new, so each rebuilt task model must beat the base model
    cfg = write_config(tmp_path / "merge.yaml", suite, names[:1], root, endpoint)
    assert main(["remerge", cfg, *flags]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "gate        passed" in out and "'digits-merge' version 1, alias 'candidate'" in out
    v1 = client.get_model_version_by_alias("digits-merge", "candidate")
    assert v1.version == "1" and v1.source == f"{root}/{latest()}/model"
    assert v1.tags["mergeflow.method"] == "tall_masks" and "mergeflow reconstruct" in v1.description
    run1 = client.get_run(v1.run_id)
    assert run1.data.tags["mergeflow.gate"] == "passed" and f"gate.score.{names[0]}" in run1.data.metrics
    inputs = {d.dataset.name: json.loads(d.dataset.source) for d in run1.inputs.dataset_inputs}
    assert set(inputs) == {"base:base", *(f"task:{n}" for n in names[:1])}
    assert inputs[f"task:{names[0]}"]["uri"] == str(suite / names[0]) and len(inputs["base:base"]["sha256"]) == 64
    first = latest()

    # 2. a second task arrives: rot90's rebuilt model loses 3.6 points to the interference (this tiny
    # MLP's tasks do interfere), within what this gate allows; rot180 beats the base; version 2 gets the alias
    gate = {"max_task_drop": 0.05, "mean_must_not_drop": False}
    cfg = write_config(tmp_path / "merge.yaml", suite, names, root, endpoint, gate=gate)
    assert main(["remerge", cfg, *flags]) == 0, capsys.readouterr()
    assert "'digits-merge' version 2" in capsys.readouterr().out
    v2 = client.get_model_version_by_alias("digits-merge", "candidate")
    assert v2.version == "2" and latest() != first
    second = latest()
    assert main(["inspect", f"{root}/{second}", "--endpoint-url", endpoint.url]) == 0
    shown = capsys.readouterr().out
    assert "lineage" in shown and f"{root}/{first}" in shown and "first merge" in shown

    # 3. a damaged checkpoint: the merge commits, the gate fails (exit 4, one line naming the task),
    # and neither the registry nor latest.json moves
    damage(suite / names[1])
    assert main(["remerge", cfg, *flags]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gate failed" in err[0] and f"task {names[1]!r}" in err[0]
    assert client.get_model_version_by_alias("digits-merge", "candidate").version == "2"
    assert len(client.search_model_versions("name='digits-merge'")) == 2
    assert latest() == second
    failed = [
        r
        for r in client.search_runs([client.get_experiment_by_name("mlops").experiment_id])
        if r.data.tags.get("mergeflow.gate") == "failed"
    ]
    assert (
        len(failed) == 1
        and failed[0].data.metrics[f"gate.score.{names[1]}"] < failed[0].data.metrics[f"gate.parent.{names[1]}"]
    )
