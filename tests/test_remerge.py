"""Re-merging (workflows/remerge.py) against the reference that matters: a from-scratch merge of the
same task set, in the same task order, whose files must be byte-identical. Also what is reused
(the Task Arithmetic sum, TIES thresholds, input hashes), bytes read, --if-changed, lineage in the
manifest and MLflow, `watch --once` on a task folder, and the lock seen from the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import config_for

from mergeflow.infra.lock import EXIT_LOCKED, RunLock
from mergeflow.workers.dtypes import is_float
from mergeflow.workflows.cli import main
from mergeflow.workflows.commit import OutputState
from mergeflow.workflows.merge import run_merge
from mergeflow.workflows.remerge import LATEST, RUNS_DIR, remerge

EXECUTION = {"shard_size": 3000, "chunk_elems": 64}  # several shards whose layout changes with T


def result_files(run: Path) -> dict[str, bytes]:
    """Everything a merge computes: model, delta and compressed tensors, and the indexes."""
    keep = ("model/", "delta/", "compressed/")
    return {
        p.relative_to(run).as_posix(): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.relative_to(run).as_posix().startswith(keep)
    }


def scratch(tmp_path: Path, base, tasks, method: dict, name: str, keep_delta: bool = False) -> Path:
    out = tmp_path / "scratch" / name
    run_merge(config_for(base, tasks, out, method, **EXECUTION, keep_delta=keep_delta), quiet=True)
    return out


def again(base, tasks, root: Path, method: dict, **kw):
    return remerge(config_for(base, tasks, root, method, **EXECUTION), quiet=True, **kw)


def replace_task(family, tmp_path: Path, task_dir: Path, seed: int = 7) -> None:
    """New content at the same location (a re-trained checkpoint landing over the old one)."""
    _, other = family(tasks=1, seed=seed, root=tmp_path / f"other-{seed}")
    shutil.rmtree(task_dir)
    shutil.copytree(other[0][1], task_dir)


def test_task_arithmetic_add_one_reuses_the_sum_bit_for_bit(ray_session, family, tmp_path):
    base, tasks = family(tasks=3)
    root = tmp_path / "root"
    method = {"name": "task_arithmetic", "alpha": 0.3}
    first = again(base, tasks[:2], root, method)
    assert first.parent is None and first.report.state is OutputState.FRESH
    assert json.loads((root / LATEST).read_text())["run"] == Path(first.run).relative_to(root).as_posix()

    second = again(base, tasks, root, method)
    assert second.parent.uri == first.run and second.changes.added == ("task_02",)
    assert second.reused["sum_of_tasks"] == ["task_00", "task_01"]
    want = scratch(tmp_path, base, tasks, method, "ta3", keep_delta=True)
    got = result_files(Path(second.run))
    assert any(r.startswith("delta/") for r in got) and got == result_files(want)

    # Reads: the previous float32 sum, the base and the new task; nothing else (headers aside).
    plan = second.report.plan
    float_numel = sum(i.numel for i in plan.base.tensors.values() if is_float(i.dtype))
    expected = (
        4 * float_numel
        + sum(i.nbytes for i in plan.base.tensors.values())
        + sum(i.nbytes for i in plan.tasks[2].tensors.values())
    )
    assert second.report.bytes_read == expected
    assert second.report.bytes_hashed == 0  # every input hash known: the parent's, or hashed to compare
    assert second.reused["bytes_hashed_to_compare"] == sum(p.stat().st_size for p in tasks[2][1].glob("*.safetensors"))

    manifest = second.report.manifest
    parent_bytes = (Path(first.run) / "manifest.json").read_bytes()
    assert manifest["parent"] == {
        "run": first.run,
        "manifest_sha256": hashlib.sha256(parent_bytes).hexdigest(),
        "mlflow_run_id": None,
    }
    assert manifest["remerge"]["changes"]["added"] == ["task_02"]
    latest = json.loads((root / LATEST).read_text())
    assert root / latest["run"] == Path(second.run)
    assert latest["manifest_sha256"] == hashlib.sha256((Path(second.run) / "manifest.json").read_bytes()).hexdigest()

    # Only alpha changes: the sum is reused as it is (no task read), the model rescaled.
    third = again(base, tasks, root, {"name": "task_arithmetic", "alpha": 0.7})
    assert third.changes.method_changed and not third.changes.added
    assert third.reused["sum_of_tasks"] == ["task_00", "task_01", "task_02"]
    assert third.report.bytes_read == 4 * float_numel + sum(i.nbytes for i in plan.base.tensors.values())
    assert result_files(Path(third.run)) == result_files(
        scratch(tmp_path, base, tasks, {"name": "task_arithmetic", "alpha": 0.7}, "ta3-a07", keep_delta=True)
    )


def test_task_arithmetic_remove_and_replace_recompute_the_sum(ray_session, family, tmp_path):
    base, tasks = family(tasks=3)
    root = tmp_path / "root"
    method = {"name": "task_arithmetic"}
    again(base, tasks, root, method)

    removed = again(base, [tasks[0], tasks[2]], root, method)
    assert removed.changes.removed == ("task_01",) and removed.reused["sum_of_tasks"] == []
    assert result_files(Path(removed.run)) == result_files(
        scratch(tmp_path, base, [tasks[0], tasks[2]], method, "removed", keep_delta=True)
    )

    replace_task(family, tmp_path, tasks[2][1])
    replaced = again(base, [tasks[0], tasks[2]], root, method)
    assert replaced.changes.replaced == ("task_02",) and replaced.reused["sum_of_tasks"] == []
    # The unchanged task's and the base's hashes come from the parent; only the new file is read.
    assert replaced.reused["bytes_hashed_to_compare"] == sum(
        p.stat().st_size for p in tasks[2][1].glob("*.safetensors")
    )
    assert result_files(Path(replaced.run)) == result_files(
        scratch(tmp_path, base, [tasks[0], tasks[2]], method, "replaced", keep_delta=True)
    )


def test_ties_thresholds_are_reused_per_task_content(ray_session, family, tmp_path):
    base, tasks = family(tasks=3)
    root = tmp_path / "root"
    method = {"name": "ties", "density": 0.3}
    again(base, tasks[:2], root, method)

    added = again(base, tasks, root, method)
    assert added.reused["thresholds_of"] == ["task_00", "task_01"]
    assert added.reused["thresholds_computed_for"] == ["task_02"]
    want = scratch(tmp_path, base, tasks, method, "ties3")
    assert result_files(Path(added.run)) == result_files(want)
    scratch_manifest = json.loads((want / "manifest.json").read_text())
    assert added.report.manifest["ties"] == scratch_manifest["ties"]

    replace_task(family, tmp_path, tasks[1][1])
    replaced = again(base, tasks, root, method)
    assert replaced.changes.replaced == ("task_01",)
    assert replaced.reused["thresholds_of"] == ["task_00", "task_02"]
    assert replaced.reused["thresholds_computed_for"] == ["task_01"]
    assert result_files(Path(replaced.run)) == result_files(scratch(tmp_path, base, tasks, method, "ties3-replaced"))

    removed = again(base, [tasks[0], tasks[2]], root, method)  # every threshold known: no histogram pass
    assert removed.changes.removed == ("task_01",) and removed.reused["thresholds_computed_for"] == []
    assert result_files(Path(removed.run)) == result_files(
        scratch(tmp_path, base, [tasks[0], tasks[2]], method, "ties-removed")
    )

    denser = again(base, tasks, root, {"name": "ties", "density": 0.5})  # another density: nothing cached
    assert denser.reused["thresholds_of"] == [] and denser.changes.method_changed


@pytest.mark.parametrize(
    "method",
    [
        {"name": "tall_masks", "base_merge": "ties", "density": 0.3, "lambda": 0.4},
        {"name": "consensus", "k": 2, "lambda": 0.5},
    ],
    ids=["tall_masks-ties", "consensus-ta"],
)
def test_masks_are_recomputed_on_add_and_remove(ray_session, family, tmp_path, method):
    base, tasks = family(tasks=4)
    root = tmp_path / "root"
    again(base, tasks[:3], root, method)
    added = again(base, tasks, root, method)
    assert added.changes.added == ("task_03",)
    assert added.reused["sum_of_tasks"] == []
    if method["name"] == "tall_masks":
        assert added.reused["thresholds_computed_for"] == ["task_03"]
    got = result_files(Path(added.run))
    assert any(r.startswith("compressed/masks/task_03/") for r in got)
    assert got == result_files(scratch(tmp_path, base, tasks, method, "added"))

    removed = again(base, tasks[1:], root, method)
    assert removed.changes.removed == ("task_00",)
    assert result_files(Path(removed.run)) == result_files(scratch(tmp_path, base, tasks[1:], method, "removed"))


def test_if_changed_is_a_no_op_that_reads_no_checkpoint(ray_session, family, tmp_path):
    base, tasks = family(tasks=2)
    root = tmp_path / "root"
    method = {"name": "task_arithmetic"}
    first = again(base, tasks, root, method, if_changed=True)  # no parent yet: a merge
    assert not first.up_to_date

    # Same size and mtime, other bytes: a re-merge that read the file would notice; --if-changed
    # trusts the stamps recorded in the manifest (as make and rsync do) and reads nothing.
    victim = tasks[0][1] / "model.safetensors"
    st = victim.stat()
    original = victim.read_bytes()
    other = original[:-4] + bytes(4)
    victim.write_bytes(other)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    runs = sorted((root / RUNS_DIR).iterdir())
    noop = again(base, tasks, root, method, if_changed=True)
    assert noop.up_to_date and noop.run == first.run and noop.report is None
    assert sorted((root / RUNS_DIR).iterdir()) == runs

    # A touched file (new mtime) is hashed again: the recorded bytes mean still up to date.
    victim.write_bytes(original)
    touched = again(base, tasks, root, method, if_changed=True)
    assert touched.up_to_date and touched.run == first.run

    # Other bytes under a new stamp are a change.
    victim.write_bytes(other)
    changed = again(base, tasks, root, method, if_changed=True)
    assert not changed.up_to_date and changed.changes.replaced == ("task_00",)


def test_unfinished_runs_are_resumed_or_removed(ray_session, family, tmp_path):
    base, tasks = family(tasks=2)
    root = tmp_path / "root"
    method = {"name": "task_arithmetic"}
    first = again(base, tasks[:1], root, method)
    latest = (root / LATEST).read_bytes()
    second = again(base, tasks, root, method)
    # As if killed after its commit but before latest.json moved: it is published, not recomputed.
    (root / LATEST).write_bytes(latest)
    published = again(base, tasks, root, method)
    assert published.run == second.run and published.report.state is OutputState.COMPLETE
    assert (root / LATEST).read_bytes() != latest
    # As if killed before its commit: no manifest, latest.json still naming the first run.
    (Path(second.run) / "manifest.json").unlink()
    (root / LATEST).write_bytes(latest)
    junk = root / RUNS_DIR / "20000101T000000.000000Z"
    (junk / ".mergeflow").mkdir(parents=True)
    (junk / ".mergeflow" / "plan.json").write_text(json.dumps({"fingerprint": "0" * 64}))

    resumed = again(base, tasks, root, method)
    assert resumed.run == second.run and resumed.report.state is OutputState.RESUME
    assert resumed.report.shards_run == 0 and resumed.report.shards_reused == len(resumed.report.plan.shards)
    assert not junk.exists() and Path(first.run).exists()


def write_config(path: Path, base, tasks, output="root", **extra) -> str:
    doc = {"base": str(base), "output": output, "method": {"name": "task_arithmetic"}, "execution": EXECUTION, **extra}
    if tasks is not None:
        doc["tasks"] = [{"name": n, "checkpoint": str(p)} for n, p in tasks]
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_cli_remerge_lineage_in_mlflow_and_lock(ray_session, family, tmp_path, capsys):
    base, tasks = family(tasks=3)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tmp_path / "remerge.yaml"
    track = ["--quiet", "--tracking-uri", uri, "--experiment", "remerge-test"]
    assert main(["remerge", write_config(cfg, base, tasks[:2]), *track]) == 0
    assert main(["remerge", write_config(cfg, base, tasks), *track, "--keep", "1"]) == 0
    out = capsys.readouterr().out
    assert "added task_02; reused the sum of 2 task(s)" in out

    root = tmp_path / "root"
    latest = root / json.loads((root / LATEST).read_text())["run"]
    assert list((root / RUNS_DIR).iterdir()) == [latest]  # --keep 1 removed the parent once published
    manifest = json.loads((latest / "manifest.json").read_text())
    parent_id = manifest["parent"]["mlflow_run_id"]
    child_id = json.loads((latest / "tracking.json").read_text())["run_id"]
    assert parent_id and parent_id != child_id
    tags = mlflow.MlflowClient(tracking_uri=uri).get_run(child_id).data.tags
    assert tags["mlflow.parentRunId"] == tags["mergeflow.parent_run"] == parent_id
    assert tags["mergeflow.parent_manifest_sha256"] == manifest["parent"]["manifest_sha256"]

    assert main(["remerge", str(cfg), "--if-changed", *track]) == 0
    assert capsys.readouterr().out.strip() == f"up to date (run {latest})"
    assert main(["inspect", str(latest)]) == 0
    assert f"parent      {manifest['parent']['run']}" in capsys.readouterr().out

    with RunLock(str(root), command="another scheduler"):
        assert main(["remerge", str(cfg), "--if-changed", *track]) == EXIT_LOCKED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(another scheduler)" in err and f"pid {os.getpid()}" in err


def test_watch_once_picks_up_a_new_checkpoint_folder(ray_session, family, tmp_path, capsys):
    base, tasks = family(tasks=3)
    registry = tmp_path / "registry"
    registry.mkdir()
    for name, path in tasks[:2]:
        shutil.copytree(path, registry / name)
    (registry / "task_09").mkdir()  # still uploading: an index without its shards
    (registry / "task_09" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})
    )
    cfg = write_config(tmp_path / "watch.yaml", base, None, tasks_from="registry")
    args = ["watch", cfg, "--once", "--quiet", "--no-tracking"]

    assert main(args) == 0
    assert "merged 2 tasks" in capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("up to date (run ")

    shutil.copytree(tasks[2][1], registry / "task_02")
    assert main(args) == 0
    assert "added task_02; reused the sum of 2 task(s)" in capsys.readouterr().out
    root = tmp_path / "root"
    run = root / json.loads((root / LATEST).read_text())["run"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert [t["name"] for t in manifest["inputs"]["tasks"]] == ["task_00", "task_01", "task_02"]
    assert manifest["inputs"]["tasks"][2]["uri"] == str(registry / "task_02")
    assert result_files(run) == result_files(
        scratch(
            tmp_path,
            base,
            [(n, registry / n) for n in ("task_00", "task_01", "task_02")],
            {"name": "task_arithmetic"},
            "watched",
            keep_delta=True,
        )
    )


def test_alpha_auto_add_one_equals_scratch_and_is_then_up_to_date(ray_session, tiny_suite, tmp_path):
    """With `alpha: auto` the sum is still extended (selection then scores models built from it), the
    parent's chosen alpha does not count as a settings change, and the result is a from-scratch run's."""
    from mergeflow.workflows.config import config_from_dict

    suite, names = tiny_suite
    selection = {"evaluator": "mergeflow.dev.suite.models:evaluate", "alphas": [0.2, 0.8]}

    def cfg(tasks, out, **execution):
        return config_from_dict(
            {
                "base": str(suite / "base"),
                "output": str(out),
                "tasks": [{"name": n, "checkpoint": str(suite / n)} for n in tasks],
                "method": {"name": "task_arithmetic", "alpha": "auto"},
                "selection": selection,
                **({"execution": execution} if execution else {}),
            }
        )

    root = tmp_path / "root"
    remerge(cfg(names[:2], root), quiet=True)
    added = remerge(cfg(names, root), quiet=True)
    assert added.reused["sum_of_tasks"] == names[:2] and not added.changes.method_changed
    scratch_run = tmp_path / "scratch"
    report = run_merge(cfg(names, scratch_run, keep_delta=True), quiet=True)
    assert added.report.manifest["method"]["alpha"] == report.manifest["method"]["alpha"]
    assert result_files(Path(added.run)) == result_files(scratch_run)
    assert remerge(cfg(names, root), if_changed=True, quiet=True).up_to_date
