"""alpha / lambda `auto`: trials on a tiny digits suite through real Ray and a real sqlite MLflow.

The selection must (1) pick the argmax of what it logged, (2) score exactly the models the run then
writes or rebuilds, and (3) leave a run byte-identical to one merged with the chosen values given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeflow.dev.suite.models import evaluate
from mergeflow.errors import ConfigError
from mergeflow.infra.storage import StorageOptions
from mergeflow.infra.tracking import TrackingOptions
from mergeflow.workflows.merge import run_merge, track
from mergeflow.workflows.reconstruct import reconstruct
from mergeflow.workflows.select import _argmax

SELECTION = {"evaluator": "mergeflow.dev.suite.models:evaluate", "alphas": [0.2, 0.5, 0.8], "lambdas": [0.3, 0.6]}


@pytest.fixture
def suite(tiny_suite):
    return tiny_suite


def _config(suite, out: Path, method: dict, selection: dict | None = SELECTION):
    from mergeflow.workflows.config import config_from_dict

    root, names = suite
    raw = {
        "base": str(root / "base"),
        "tasks": [{"name": n, "checkpoint": str(root / n)} for n in names],
        "output": str(out),
        "method": method,
    }
    if selection is not None:
        raw["selection"] = selection
    return config_from_dict(raw)


def _files(run: Path, prefix: str) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / prefix).rglob("*")) if p.is_file()}


def test_argmax_takes_the_first_best():
    assert _argmax([0.1, 0.3, 0.3, 0.2]) == 1
    assert _argmax([0.5]) == 0


def test_auto_selects_the_argmax_it_logged_and_writes_that_model(suite, tmp_path, ray_session):
    root, names = suite
    cfg = _config(suite, tmp_path / "auto", {"name": "tall_masks", "alpha": "auto", "lambda": "auto"})
    report = run_merge(cfg, quiet=True)
    sel = report.manifest["selection"]
    assert sel["evaluator"] == SELECTION["evaluator"] and sel["split"] == "val"
    assert sel["alpha"]["grid"] == SELECTION["alphas"] and sel["lambda"]["grid"] == SELECTION["lambdas"]
    assert not (tmp_path / "auto" / ".mergeflow" / "select").exists()  # scratch masks are gone

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = track(report, None, TrackingOptions(uri=uri, experiment="selection"))
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == len(SELECTION["alphas"]) + len(SELECTION["lambdas"]) * len(names)

    alpha_runs = [c for c in children if c.data.params["trial"] == "alpha"]
    logged = sorted((float(c.data.params["alpha"]), c.data.metrics["avg_normalized"]) for c in alpha_runs)
    best_alpha = logged[_argmax([m for _, m in logged])][0]
    assert best_alpha == report.manifest["method"]["alpha"] == float(parent.data.params["alpha"])
    for task in names:
        mine = sorted(
            (float(c.data.params["lambda"]), c.data.metrics["score"])
            for c in children
            if c.data.params["trial"] == "lambda" and c.data.params["task"] == task
        )
        assert mine[_argmax([s for _, s in mine])][0] == report.manifest["method"]["lambda"][task]
        assert float(parent.data.params[f"lambda.{task}"]) == report.manifest["method"]["lambda"][task]

    # The trials scored the very models the run holds: the written model at the chosen alpha ...
    chosen = next(t for t in sel["alpha"]["trials"] if t["alpha"] == best_alpha)
    for task in names:
        assert evaluate(tmp_path / "auto" / "model", task, root, "val") == chosen["scores"][task]
    # ... and each task's rebuilt model at its chosen lambda.
    task = names[1]
    out = tmp_path / "rebuilt"
    reconstruct(str(tmp_path / "auto"), task, str(out), StorageOptions(), quiet=True)
    lam = report.manifest["method"]["lambda"][task]
    trial = next(t for t in sel["lambda"]["trials"] if t["task"] == task and t["lambda"] == lam)
    assert evaluate(out, task, root, "val") == trial["score"]

    # A merge given the chosen values writes the same bytes (model, bundle) without any trial.
    fixed = _config(
        suite,
        tmp_path / "fixed",
        {"name": "tall_masks", "alpha": best_alpha, "lambda": report.manifest["method"]["lambda"]},
        selection=None,
    )
    run_merge(fixed, quiet=True)
    for prefix in ("model", "compressed"):
        assert _files(tmp_path / "auto", prefix) == _files(tmp_path / "fixed", prefix)


def test_consensus_over_ties_selects_and_matches_a_fixed_merge(suite, tmp_path, ray_session):
    method = {"name": "consensus", "base_merge": "ties", "density": 0.3, "k": 2}
    report = run_merge(_config(suite, tmp_path / "auto", method | {"alpha": "auto", "lambda": "auto"}), quiet=True)
    chosen = report.manifest["method"]
    assert chosen["alpha"] in SELECTION["alphas"]
    assert set(chosen["lambda"].values()) <= set(SELECTION["lambdas"])
    fixed = method | {"alpha": chosen["alpha"], "lambda": chosen["lambda"]}
    run_merge(_config(suite, tmp_path / "fixed", fixed, selection=None), quiet=True)
    for prefix in ("model", "compressed"):
        assert _files(tmp_path / "auto", prefix) == _files(tmp_path / "fixed", prefix)
    # normalized score = merged / fine-tuned, per task, as logged
    trial = report.manifest["selection"]["alpha"]["trials"][0]
    ft = report.manifest["selection"]["alpha"]["finetuned"]
    for task, v in trial["normalized"].items():
        assert v == pytest.approx(trial["scores"][task] / ft[task])


def test_auto_needs_a_selection_section(suite, tmp_path):
    with pytest.raises(ConfigError, match=r"method.alpha: auto needs a `selection:` section"):
        _config(suite, tmp_path / "x", {"name": "task_arithmetic", "alpha": "auto"}, selection=None)


def test_bad_evaluator_fails_before_any_work(suite, tmp_path):
    from mergeflow.workflows.plan import make_plan

    cfg = _config(
        suite,
        tmp_path / "x",
        {"name": "task_arithmetic", "alpha": "auto"},
        selection={"evaluator": "mergeflow.dev.suite.models:no_such_function"},
    )
    with pytest.raises(ConfigError, match=r"selection.evaluator: module 'mergeflow.dev.suite.models' has no function"):
        make_plan(cfg)
    with pytest.raises(ConfigError, match=r"must look like 'package.module:function'"):
        _config(suite, tmp_path / "x", {"name": "task_arithmetic", "alpha": "auto"}, selection={"evaluator": "nope"})
    assert not (tmp_path / "x").exists()


def test_suite_config_selects_and_dry_run_says_so(suite, tmp_path, capsys):
    import yaml

    from mergeflow.workflows.cli import main

    root, _ = suite
    raw = yaml.safe_load((root / "config.yaml").read_text())
    assert raw["method"] == {"name": "tall_masks", "alpha": "auto", "lambda": "auto"}
    assert raw["selection"]["evaluator"] == "mergeflow.dev.suite.models:evaluate"
    assert main(["merge", str(root / "config.yaml"), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tall_masks (alpha auto, lambda auto" in out
