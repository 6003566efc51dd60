"""`mergeflow suite report` on a tiny suite: every row merged by the real job, scored as Ray tasks."""

from __future__ import annotations

import json

from mergeflow.dev.suite import models as digits
from mergeflow.dev.suite import report as suite_report
from mergeflow.dev.suite.models import evaluate
from mergeflow.infra.storage import StorageOptions
from mergeflow.infra.tracking import TrackingOptions
from mergeflow.workflows.reconstruct import reconstruct
from mergeflow.workflows.select import _argmax


def test_report_rows_scores_and_files(tiny_suite, tmp_path, ray_session):
    root, tasks = tiny_suite
    out = tmp_path / "report"
    manifests = suite_report.run_merges(digits, root, tasks, out, TrackingOptions(enabled=False), quiet=True)
    assert set(manifests) == {r.key for r in suite_report.rows() if r.method}
    scores = suite_report.score_all(digits, root, tasks, out, manifests, "test", quiet=True)
    meta = json.loads((root / "suite.json").read_text())
    results = suite_report.build_results(digits, meta, root, manifests, scores, "test")
    paths = suite_report.write_report(out, results)

    rows = {r["key"]: r for r in results["rows"]}
    assert list(rows) == [r.key for r in suite_report.rows()]
    assert rows["finetuned"]["normalized"] == 1.0
    for r in rows.values():
        assert set(r["accuracy"]) == set(tasks) and all(0.0 <= v <= 1.0 for v in r["accuracy"].values())
    # zero-shot and fine-tuned agree with the suite's own build-time numbers
    for t in tasks:
        assert rows["zero_shot"]["accuracy"][t] == meta["accuracy"][t]["test"]["zero_shot"]
        assert rows["finetuned"]["accuracy"][t] == meta["accuracy"][t]["test"]["finetuned"]
    # the TALL row scores the models `mergeflow reconstruct` writes
    task = tasks[2]
    reconstruct(str(out / "runs" / "tall_masks"), task, str(tmp_path / "t"), StorageOptions(), quiet=True)
    assert rows["tall_masks"]["accuracy"][task] == evaluate(tmp_path / "t", task, root, "test")
    # every bundle row scores its rebuilt models, not its one merged model
    for key in ("emr", "tsv_compress"):
        reconstruct(str(out / "runs" / key), task, str(tmp_path / key), StorageOptions(), quiet=True)
        assert rows[key]["accuracy"][task] == evaluate(tmp_path / key, task, root, "test"), key
        assert rows[key]["artifact"]["what"] == "compressed bundle"
    # a row's own grid: Iso-C may choose a scale above 1
    grid = manifests["iso_c"]["selection"]["alpha"]["grid"]
    assert grid == list(suite_report.WIDE_ALPHAS)
    # the chosen alpha is the argmax of the logged validation trials
    trials = manifests["task_arithmetic"]["selection"]["alpha"]["trials"]
    best = trials[_argmax([t["avg_normalized"] for t in trials])]["alpha"]
    assert (
        rows["task_arithmetic"]["method"]["alpha"] == best
        and f"alpha {best:g}" in rows["task_arithmetic"]["hyperparameters"]
    )
    # files: a Markdown row per model plus the claims, JSON with claims, a PNG
    md = paths["markdown"].read_text()
    assert all(f"| {r['label']} |" in md for r in results["rows"])
    assert "Claims from the papers, checked on this run" in md
    saved = json.loads(paths["json"].read_text())
    assert [c["claim"] for c in saved["claims"]][0].startswith("TALL-mask rebuilt models keep")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # sizes: the bundle is smaller than the checkpoints; one merged model is 1/T of them
    assert rows["tall_masks"]["artifact"]["bytes"] < rows["tall_masks"]["artifact"]["checkpoints_bytes"]
    ta = rows["task_arithmetic"]["artifact"]
    assert ta["bytes"] * len(tasks) >= ta["checkpoints_bytes"] * 0.99
