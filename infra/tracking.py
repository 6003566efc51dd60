"""Record a finished merge as one MLflow run: parameters, input hashes, metrics, stats and plots.

Tracking happens after the commit: by the time `log_merge` is called, OUT/manifest.json exists and
the merge is a result. A tracking failure therefore never loses a merge; it raises `TrackingError`,
one line naming the tracking URI, what failed, and where the committed merge is.

We talk to MLflow through an explicit `MlflowClient(tracking_uri=...)` and never through the fluent
API's global state (`mlflow.set_tracking_uri`, active runs), so a library caller's own MLflow setup is
left untouched. Nothing from the environment or the storage options is logged: they hold credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from mergeflow.errors import MergeflowError

if TYPE_CHECKING:  # mlflow takes seconds to import: only when a run is actually logged
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

log = logging.getLogger(__name__)

__all__ = ["TrackingError", "TrackingOptions", "log_merge", "register_model", "use_child"]

MAX_PARAM_LENGTH = 6000  # MLflow rejects longer param values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_KEY_LENGTH = 250  # ... and longer param/metric/tag keys

# HTTP behaviour while we log. MLflow's defaults (7 retries with exponential backoff, 120 s timeout)
# make a dead server look like a hang of several minutes after a merge that already finished. With
# these, a refused connection fails in ~3 s and an unreachable host in ~35 s (3 tries of 10 s), while
# one dropped request is still retried. Our artifacts are small (stats, a plot, the manifest), so 10 s
# per request is ample. A user who set one of these variables keeps their value.
_FAST_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # MLflow prints "View run at <tracking URI>" itself, credentials included; we print a redacted line
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

_SUMMARY_METRICS = (
    "bytes_read",
    "bytes_hashed",
    "input_bytes",
    "model_bytes",
    "compressed_bytes",
    "checkpoints_bytes",
    "compression_ratio",
    "parameters",
    "selfish_share",
    "catastrophic_share",
)


class TrackingError(MergeflowError):
    """Logging a merge to MLflow failed; the merge itself is committed."""


@dataclass(frozen=True)
class TrackingOptions:
    enabled: bool = True
    uri: str | None = None
    experiment: str = "mergeflow"

    def tracking_uri(self) -> str:
        """The explicit URI, else a non-empty MLFLOW_TRACKING_URI, else ./mlflow.db (our documented
        default; resolved against the working directory at call time)."""
        if self.uri:
            return self.uri
        if env := os.environ.get("MLFLOW_TRACKING_URI", "").strip():
            return env
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def log_merge(
    manifest: dict,
    *,
    output: str,
    config_text: str | None,
    files: dict[str, bytes],
    options: TrackingOptions,
    parent_run_id: str | None = None,
    extra_metrics: dict[str, float] | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str | None:
    """Log one finished merge as one MLflow run and return its run id (None when tracking is off).

    `files` maps artifact paths relative to the run (e.g. "stats/task_overlap.png") to their bytes.
    Raises TrackingError when the tracking backend fails.
    """
    if not options.enabled:
        return None
    if _child is not None:
        return _in_child("log_merge", dict(locals(), options=_resolved(options)), options, output)
    uri = options.tracking_uri()
    _require_mlflow(uri, output)
    # Everything we send is built first, from the manifest alone: a malformed manifest is a bug and
    # surfaces as its own exception, not as a "tracking failed" message.
    params = run_params(manifest)
    metrics = run_metrics(manifest, extra_metrics)
    tags = run_tags(manifest, output, parent_run_id) | (extra_tags or {})
    datasets = run_inputs(manifest)
    artifacts = run_artifacts(manifest, config_text, files)

    step = "connecting"
    client = run_id = None
    with _fast_failing_http():
        try:
            from mlflow import MlflowClient
            from mlflow.entities import RunStatus

            _ensure_sqlite_dir(uri)
            client = MlflowClient(tracking_uri=uri)
            step = f"finding experiment {options.experiment!r}"
            experiment_id = _experiment_id(client, options.experiment, uri)
            step = "creating the run"
            run_id = client.create_run(experiment_id, tags=tags, run_name=tags["mlflow.runName"]).info.run_id
            step = "logging params and metrics"
            client.log_batch(run_id, metrics=metrics, params=params, synchronous=True)
            step = "logging the input checkpoints"
            client.log_inputs(run_id, datasets=datasets)
            step = "uploading artifacts"
            _upload(client, run_id, artifacts)
            step = "logging selection trials"
            for name, t_params, t_metrics in selection_trials(manifest):
                child = client.create_run(
                    experiment_id, run_name=name, tags={"mlflow.parentRunId": run_id, "mergeflow.trial": name}
                ).info.run_id
                client.log_batch(child, metrics=t_metrics, params=t_params, synchronous=True)
                client.set_terminated(child, RunStatus.to_string(RunStatus.FINISHED))
            step = "finishing the run"
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes one user-facing line
            if run_id is not None:
                _mark_failed(client, run_id)
            raise TrackingError(
                f"MLflow tracking at {redact(uri)} failed while {step} ({_reason(exc)}); "
                f"the merge itself is committed at {redact(output)}"
            ) from exc
    log.info("logged merge to MLflow run %s at %s", run_id, redact(uri))
    return run_id


def register_model(
    manifest: dict,
    *,
    run_id: str,
    output: str,
    options: TrackingOptions,
    name: str,
    alias: str | None,
    copy_weights: bool = False,
    rebuild_command: str | None = None,
    storage=None,
) -> str:
    """A new version of registered model `name` for the tracked run `run_id`, its source the run's
    model/ where it lies (no copy of the weights unless copy_weights), tagged with the method, its
    parameters, the input digests and the run; `alias` moved to it. Returns the version."""
    if _child is not None:
        return _in_child("register_model", dict(locals(), options=_resolved(options)), options, output)
    uri = options.tracking_uri()
    model_uri = f"{output.rstrip('/')}/model"
    tags = {
        "mergeflow.run_id": run_id,
        "mergeflow.output": redact(output),
        "mergeflow.model_uri": redact(model_uri),
        "mergeflow.method": manifest["method"]["name"],
        "mergeflow.params": json.dumps({k: v for k, v in manifest["method"].items() if k != "name"}),
        "mergeflow.input.base": checkpoint_digest(manifest["inputs"]["base"]),
    }
    tags |= {_key(f"mergeflow.input.task.{t['name']}"): checkpoint_digest(t) for t in manifest["inputs"]["tasks"]}
    description = (
        f"mergeflow {manifest['method']['name']} merge of {len(manifest['inputs']['tasks'])} tasks: {model_uri}"
    )
    if rebuild_command:
        description += f". A compressed bundle: rebuild task T's model with `{rebuild_command}`"
    step = "connecting"
    with _fast_failing_http():
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            client = MlflowClient(tracking_uri=uri)
            step = f"creating registered model {name!r}"
            try:
                client.create_registered_model(name)
            except MlflowException as e:
                if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
            if copy_weights:
                step = "copying the weights into the run's artifacts"
                _upload_model(client, run_id, output, manifest, storage)
                source = f"runs:/{run_id}/model"
            elif "://" in model_uri or not uri.startswith(("http://", "https://", "databricks")):
                source = model_uri  # an object store's URI, or a local path a local store can point at
            else:  # a server cannot point at this machine's files: the run's manifest (every file, hashed)
                source = f"runs:/{run_id}/manifest.json"
            step = f"creating a version of {name!r}"
            version = client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
            if alias:
                step = f"moving alias {alias!r}"
                client.set_registered_model_alias(name, alias, version.version)
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes one user-facing line
            raise TrackingError(
                f"MLflow model registry at {redact(uri)} failed while {step} ({_reason(exc)}); "
                f"the merge itself is committed at {redact(output)}"
            ) from exc
    return str(version.version)


def _upload_model(client, run_id: str, output: str, manifest: dict, storage) -> None:
    from mergeflow.infra.storage import join, storage_for

    store = storage_for(output, storage)
    with tempfile.TemporaryDirectory(prefix="mergeflow-model-") as tmp:
        for rel in manifest["outputs"]:
            if rel.startswith("model/"):
                path = Path(tmp, rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(store.read_bytes(join(output, rel)))
        client.log_artifacts(run_id, str(Path(tmp, "model")), artifact_path="model")


# ------------------------------------------------------------------------------------ what we log


def run_params(manifest: dict) -> list[Param]:
    from mlflow.entities import Param

    method = dict(manifest["method"])
    lambdas = method.pop("lambdas", None) or {}
    tasks = [t["name"] for t in manifest["inputs"]["tasks"]]
    values: dict[str, object] = {"method": method.pop("name")}
    values.update(_flatten(method))
    values.update({f"lambda.{task}": v for task, v in lambdas.items()})
    if sel := manifest.get("selection"):
        values |= {
            "selection.evaluator": sel["evaluator"],
            "selection.split": sel["split"],
            "selection.selected": ",".join(k for k in ("alpha", "lambda") if k in sel),
        }
    values |= {"num_tasks": len(tasks), "tasks": _join_within(tasks, MAX_PARAM_LENGTH), "shards": manifest["shards"]}
    values["input.base.sha256"] = checkpoint_digest(manifest["inputs"]["base"])
    values.update({f"input.task.{t['name']}.sha256": checkpoint_digest(t) for t in manifest["inputs"]["tasks"]})
    return [Param(_key(k), str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]


def selection_trials(manifest: dict) -> list[tuple[str, list[Param], list[Metric]]]:
    """One child run per hyper-parameter trial: (run name, params, metrics)."""
    from mlflow.entities import Metric, Param

    sel = manifest.get("selection") or {}
    now = int(time.time() * 1000)
    out = []
    for tr in (sel.get("lambda") or {}).get("trials", []):
        params = [Param("trial", "lambda"), Param("task", tr["task"]), Param("lambda", str(tr["lambda"]))]
        out.append((f"lambda-{tr['task']}-{tr['lambda']:g}", params, [Metric("score", float(tr["score"]), now, 0)]))
    for tr in (sel.get("alpha") or {}).get("trials", []):
        metrics = {"avg_normalized": tr["avg_normalized"], "avg_score": tr["avg_score"]}
        metrics |= {f"score.{t}": v for t, v in tr["scores"].items()}
        metrics |= {f"normalized.{t}": v for t, v in tr["normalized"].items()}
        params = [Param("trial", "alpha"), Param("alpha", str(tr["alpha"]))]
        out.append(
            (
                f"alpha-{tr['alpha']:g}",
                params,
                [Metric(_key(k), float(v), now, 0) for k, v in metrics.items() if _is_finite_number(v)],
            )
        )
    return out


def checkpoint_digest(checkpoint: dict) -> str:
    """One digest per checkpoint: sha256 of its files' sha256 hex digests, sorted, one per line.

    Sorted by digest, not by file name: renaming a checkpoint's files does not change its digest,
    changing any file's bytes does."""
    digests = sorted(f["sha256"] for f in checkpoint["files"].values())
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def run_metrics(manifest: dict, extra: dict[str, float] | None = None) -> list[Metric]:
    from mlflow.entities import Metric

    values: dict[str, float] = {f"time.{stage}_s": v for stage, v in manifest.get("timings", {}).items()}
    values |= extra or {}
    outputs = manifest.get("outputs")
    if outputs is not None:
        values["bytes_written"] = sum(o["size"] for o in outputs.values())
    summary = manifest.get("summary", {})
    values.update({k: summary[k] for k in _SUMMARY_METRICS if k in summary})
    values.update({f"mask_density.{task}": d for task, d in summary.get("mask_density", {}).items()})
    now = int(time.time() * 1000)
    return [Metric(_key(k), float(v), now, 0) for k, v in values.items() if _is_finite_number(v)]


def run_inputs(manifest: dict) -> list:
    """Every input checkpoint as an MLflow dataset input (MLflow's lineage views): its URI and digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = manifest["inputs"]
    out = []
    for role, name, cp in [("base", "base", inputs["base"])] + [("task", t["name"], t) for t in inputs["tasks"]]:
        digest = checkpoint_digest(cp)
        source = json.dumps({"uri": redact(cp["uri"]), "sha256": digest, "files": sorted(cp["files"])})
        dataset = Dataset(name=f"{role}:{name}", digest=digest[:32], source_type="mergeflow.checkpoint", source=source)
        out.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", role)]))
    return out


def run_tags(manifest: dict, output: str, parent_run_id: str | None) -> dict[str, str]:
    method = manifest["method"]["name"]
    tags = {
        "mlflow.runName": f"{method}-{len(manifest['inputs']['tasks'])}tasks",
        "mergeflow.output": redact(output),
        "mergeflow.version": str(manifest.get("mergeflow_version", "unknown")),
        "mergeflow.fingerprint": str(manifest.get("fingerprint", "")),
    }
    if parent_run_id:
        # mlflow.parentRunId is what the MLflow UI nests by; ours survives a UI that drops it.
        tags["mlflow.parentRunId"] = tags["mergeflow.parent_run"] = parent_run_id
    if parent := manifest.get("parent"):  # a re-merge: its parent run, even when that one was not tracked
        tags["mergeflow.parent_uri"] = redact(str(parent["run"]))
        tags["mergeflow.parent_manifest_sha256"] = str(parent["manifest_sha256"])
    return tags


def run_artifacts(manifest: dict, config_text: str | None, files: dict[str, bytes]) -> dict[str, bytes]:
    artifacts = {}
    if config_text is not None:
        artifacts["config.yaml"] = config_text.encode()
    artifacts["manifest.json"] = json.dumps(manifest, indent=1).encode()
    for rel, data in files.items():
        artifacts[_safe_relpath(rel)] = data
    return artifacts


# ------------------------------------------------------------------------------------ MLflow calls


_child = None  # a tracking_child.Child that serves this process's log_merge and register_model


def use_child() -> None:
    """Serve this process's tracking calls from a child process started now, which imports MLflow
    while the merge runs (the `mergeflow merge` command; infra/tracking_child.py says why)."""
    global _child
    from mergeflow.infra import tracking_child

    _child = tracking_child.start()


def _resolved(options: TrackingOptions) -> TrackingOptions:
    return TrackingOptions(enabled=options.enabled, uri=options.tracking_uri(), experiment=options.experiment)


def _in_child(name: str, kwargs: dict, options: TrackingOptions, output: str):
    from mergeflow.infra.tracking_child import ChildGone

    try:
        return _child.call(name, kwargs)
    except ChildGone as exc:
        raise TrackingError(
            f"MLflow tracking at {redact(options.tracking_uri())} failed ({exc}); "
            f"the merge itself is committed at {redact(output)}"
        ) from exc


def import_mlflow() -> None:
    """The MLflow modules a logged run needs, imported (a failure is reported where tracking runs)."""
    try:
        import mlflow  # noqa: F401
        from mlflow.entities import RunStatus  # noqa: F401
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401
    except Exception:  # noqa: BLE001
        pass


def preload() -> None:
    """Import MLflow in a background thread while the merge runs (~1.2 s of imports a run would
    otherwise pay after its commit, on the critical path). Nothing is connected or logged."""
    import threading

    if _child is None:
        threading.Thread(target=import_mlflow, name="mergeflow-preload-mlflow", daemon=True).start()


def _require_mlflow(uri: str, output: str) -> None:
    # Tracking is optional to a merge: a missing package is a tracking failure like any other.
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise TrackingError(
            f"MLflow tracking at {redact(uri)} failed (mlflow is not installed: {exc}); "
            f"the merge itself is committed at {redact(output)}"
        ) from exc


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_local_artifact_location(uri))
        except MlflowException:
            # Another merge may have created it between our two calls; if not, re-raise.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow tracking at {redact(uri)}: experiment {name!r} is deleted; restore it "
            "(mlflow experiments restore) or choose another experiment name"
        )
    return experiment.experiment_id


def _local_artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store go next to the database, not into ./mlruns of whatever the
    working directory happens to be. Servers choose their own location (None)."""
    path = _sqlite_path(uri)
    return (path.parent / "mlruns").resolve().as_uri() if path else None


def _ensure_sqlite_dir(uri: str) -> None:
    # sqlite cannot create the folder of a new database file.
    if path := _sqlite_path(uri):
        path.parent.mkdir(parents=True, exist_ok=True)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def _upload(client: MlflowClient, run_id: str, artifacts: dict[str, bytes]) -> None:
    # One log_artifacts call for the whole tree: one request per file, no per-file client setup.
    with tempfile.TemporaryDirectory(prefix="mergeflow-artifacts-") as tmp:
        for rel, data in artifacts.items():
            path = Path(tmp, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        client.log_artifacts(run_id, tmp)


def _mark_failed(client: MlflowClient, run_id: str) -> None:
    # Best effort: when the backend is gone this fails too, and the original error is the one to report.
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # noqa: BLE001
        log.debug("could not mark MLflow run %s FAILED: %s", run_id, exc)


@contextmanager
def _fast_failing_http() -> Iterator[None]:
    """Set the HTTP settings above for the duration of one log_merge call, then restore the
    environment exactly (MLflow reads these variables on every request). urllib3's warning per
    retry is held back unless its debug log is on: a failure ends in one TrackingError line."""
    added = [k for k in _FAST_HTTP_ENV if k not in os.environ]
    for k in added:
        os.environ[k] = _FAST_HTTP_ENV[k]
    retries = logging.getLogger("urllib3.connectionpool")
    level = retries.level
    if not retries.isEnabledFor(logging.DEBUG):
        retries.setLevel(logging.ERROR)
    try:
        yield
    finally:
        retries.setLevel(level)
        for k in added:
            os.environ.pop(k, None)


# ------------------------------------------------------------------------------------ small helpers


_SECRET_QUERY_KEYS = re.compile(r"token|secret|passw|key|sig|credential|auth", re.IGNORECASE)


def redact(uri: str) -> str:
    """The URI without credentials: a password or a bare token in the user part
    (http://user:secret@host -> http://user:***@host, https://TOKEN@host -> https://***@host) and the
    values of query parameters that name a token, key, secret, password or signature."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    if query:
        pairs = [p.partition("=") for p in query.split("&")]
        query = "&".join(k + eq + ("***" if eq and _SECRET_QUERY_KEYS.search(k) else v) for k, eq, v in pairs)
    if (netloc, query) == (parts.netloc, parts.query):
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _reason(exc: BaseException) -> str:
    """A short cause: the well-known network failures by name, else the first line of the message."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError) or "Connection refused" in str(e):
            return "connection refused"
        if isinstance(e, TimeoutError) or type(e).__name__ in ("ConnectTimeout", "ReadTimeout", "Timeout"):
            return "timed out"
        e = e.__cause__ or e.__context__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _flatten(values: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _join_within(names: list[str], limit: int) -> str:
    """Comma-joined names; over `limit`, cut at a name boundary and say how many were left out."""
    joined = ",".join(names)
    if len(joined) <= limit:
        return joined
    head = joined[: limit - 32]  # 32 characters leave room for ",... (+N more)"
    head = head.rsplit(",", 1)[0] if "," in head else ""  # drop the name cut in half
    kept = len(head.split(",")) if head else 0
    return f"{head},... (+{len(names) - kept} more)"


_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")


def _key(name: str) -> str:
    # MLflow accepts letters, digits, _ . / - : and space in keys; task names are already restricted
    # by the config, this only keeps an unexpected one from failing the whole batch.
    return _BAD_KEY_CHARS.sub("_", name)[:MAX_KEY_LENGTH]


def _safe_relpath(rel: str) -> str:
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"artifact path {rel!r} must be relative and stay inside the run")
    return str(path)


def _is_finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
