"""mergeflow from Python: what the `mergeflow` command does, for pipelines and notebooks.

    import mergeflow
    result = mergeflow.merge("merge.yaml", output="runs/x", tracking=False)
    print(result.manifest["outputs"].keys())
    mergeflow.reconstruct("runs/x", task="math", output="rebuilt/math")

Every function raises a mergeflow.MergeflowError subclass (one line naming the culprit) for bad
input, storage and tracking problems; a LockHeld when another merge holds the output. The CLI
(workflows/cli.py) is a thin layer over these.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class MergeResult:
    """What a merge left: the committed run, and its MLflow run when tracked."""

    output: str
    manifest: dict
    report: Any  # workflows.merge.MergeReport: plan, timings, shards run and reused, bytes read
    mlflow_run_id: str | None = None
    already_complete: bool = False  # the output held this very merge: nothing was computed
    model_version: str | None = None  # "NAME version N, alias A" when registered


def load(
    config,
    *,
    output: str | None = None,
    ray_address: str | None = None,
    device: str | None = None,
    resolve_tasks: bool = True,
):
    """A validated MergeConfig from a dict, a YAML/JSON file or a MergeConfig, with `tasks_from`
    expanded (unless resolve_tasks is false: a re-merge orders them after its parent) and the
    command-line style overrides applied."""
    from mergeflow.workflows.config import MergeConfig, config_from_dict, load_config
    from mergeflow.workflows.registry import resolve

    if isinstance(config, MergeConfig):
        cfg = config if output is None else config.model_copy(update={"output": output})
    elif isinstance(config, dict):
        cfg = config_from_dict(config, output=output)
    else:
        cfg = load_config(Path(config), output=output)
    cfg = resolve(cfg) if resolve_tasks else cfg
    changes = {k: v for k, v in {"ray_address": ray_address, "device": device}.items() if v}
    return cfg.model_copy(update={"execution": cfg.execution.model_copy(update=changes)}) if changes else cfg


def plan(config, **options):
    """The plan of a merge from headers alone (what `merge --dry-run` prints): no tensor data read."""
    from mergeflow.workflows.plan import make_plan

    return make_plan(load(config, **options))


def merge(
    config,
    *,
    output: str | None = None,
    overwrite: bool = False,
    ray_address: str | None = None,
    device: str | None = None,
    quiet: bool = True,
    lock_ttl: float = 120.0,
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment: str = "mergeflow",
    register: str | None = None,
    alias: str | None = None,
) -> MergeResult:
    """Merge as `config` says (a dict, a YAML/JSON path or a MergeConfig) and log it to MLflow.

    A finished run of the same inputs and settings at the output is returned as it is (and logged,
    when an earlier attempt could not log it). Raises TrackingError when the merge is committed but
    logging failed: its `.result` is the MergeResult."""
    from mergeflow.errors import ConfigError
    from mergeflow.infra.tracking import TrackingError, TrackingOptions
    from mergeflow.workflows.merge import is_tracked, run_merge, track
    from mergeflow.workflows.merge import register as register_version
    from mergeflow.workflows.watch import Job, with_job_options

    t0 = time.perf_counter()
    cfg = load(config, output=output, ray_address=ray_address, device=device)
    cfg = with_job_options(cfg, Job(config="", register=register, alias=alias))
    loaded = time.perf_counter() - t0
    registry = cfg.tracking.register_
    if registry is not None and not tracking:
        raise ConfigError("tracking.register needs MLflow tracking: drop --no-tracking (or the register section)")
    if tracking:  # MLflow's imports overlap the merge instead of following it
        from mergeflow.infra.tracking import preload

        preload()
    report = run_merge(cfg, overwrite=overwrite, quiet=quiet, lock_ttl=lock_ttl)
    report.timings["config"] = loaded
    complete = report.state.value == "complete"
    result = MergeResult(cfg.output, report.manifest, report, already_complete=complete)
    options = TrackingOptions(enabled=tracking, uri=tracking_uri, experiment=experiment)
    if tracking and not (complete and is_tracked(report)):
        started = time.perf_counter()
        try:
            result.mlflow_run_id = track(report, _config_text(config), options)
            if registry is not None and result.mlflow_run_id:
                version = register_version(report, result.mlflow_run_id, options, registry)
                alias_note = f", alias {registry.alias!r}" if registry.alias else ""
                result.model_version = f"{registry.name!r} version {version}{alias_note}"
        except TrackingError as e:
            e.result = result
            raise
        finally:
            report.timings["tracking"] = time.perf_counter() - started
    return result


def reconstruct(
    run: str,
    task: str,
    output: str,
    *,
    overwrite: bool = False,
    endpoint_url: str | None = None,
    ray_address: str | None = None,
    quiet: bool = True,
) -> dict:
    """Rebuild task `task`'s model from a run's compressed bundle into `output` (an HF checkpoint),
    checking the sha256 of everything it reads. Returns {"task", "files", "run"}."""
    from mergeflow.infra.storage import normalize
    from mergeflow.workflows.reconstruct import reconstruct as rebuild

    return rebuild(
        normalize(run),
        task,
        normalize(output),
        _storage(endpoint_url),
        ray_address=ray_address,
        overwrite=overwrite,
        quiet=quiet,
    )


@dataclass
class RunInfo:
    manifest: dict
    summary: str  # what `mergeflow inspect` prints
    layers: dict  # stats/layers.json: per layer, task-vector norms and mask statistics


def inspect(run: str, *, endpoint_url: str | None = None) -> RunInfo:
    """A finished run's manifest, its human summary and its per-layer statistics."""
    from mergeflow.infra.storage import normalize
    from mergeflow.workflows.inspect_run import describe, layers_table
    from mergeflow.workflows.reconstruct import load_run

    run, options = normalize(run), _storage(endpoint_url)
    return RunInfo(load_run(run, options), describe(run, options), layers_table(run, options))


def remerge(
    config,
    *,
    output: str | None = None,
    parent: str | None = None,
    if_changed: bool = False,
    keep: int = 0,
    lock_ttl: float = 120.0,
    ray_address: str | None = None,
    device: str | None = None,
    quiet: bool = True,
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment: str = "mergeflow",
):
    """Re-merge under the config's output root, reusing what did not change, under the root's lock
    (what cron runs): returns workflows.remerge.RemergeResult (`.up_to_date`, `.run`, `.changes`)."""
    from mergeflow.infra.lock import RunLock
    from mergeflow.infra.tracking import TrackingOptions
    from mergeflow.workflows.merge import is_tracked, track
    from mergeflow.workflows.remerge import remerge as refresh

    cfg = load(config, output=output, ray_address=ray_address, device=device, resolve_tasks=False)
    options = cfg.storage.options()
    with RunLock(
        cfg.output,
        options,
        ttl=lock_ttl,
        heartbeat=min(15.0, lock_ttl / 4),
        command=f"mergeflow.remerge -> {cfg.output}",
    ) as lock:
        result = refresh(cfg, parent=parent, if_changed=if_changed, quiet=quiet, keep=keep, lock=lock)
        if not result.up_to_date and tracking and not is_tracked(result.report):
            track(
                result.report,
                _config_text(config),
                TrackingOptions(uri=tracking_uri, experiment=experiment),
                parent_run_id=result.parent.mlflow_run_id if result.parent else None,
            )
    return result


def _config_text(config) -> str | None:
    if isinstance(config, (str, os.PathLike)):
        return Path(config).read_text()
    if isinstance(config, dict):
        import yaml

        return yaml.safe_dump(config, sort_keys=False)
    return None


def _storage(endpoint_url: str | None):
    from mergeflow.infra.storage import StorageOptions

    return StorageOptions(endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3"))
