"""`mergeflow remerge`: refresh a merge when its tasks change, reusing what did not change.

Layout under the config's output ROOT, so that a scheduler can keep one stable config:

    ROOT/runs/<UTC stamp>/   one complete run per re-merge; its manifest.json names its parent
    ROOT/latest.json         the newest complete run, replaced atomically after each commit
    ROOT/.mergeflow.lock     held while a re-merge runs (infra/lock.py)

The parent is `--from RUN`, else the run latest.json names, else ROOT itself when a plain
`mergeflow merge` wrote there; with none, the first re-merge is a from-scratch merge.

Reused from the parent, by content hash (sha256 of every input file, from the parent's manifest
when the file's size and mtime/ETag still match what it recorded; only new or changed files are read):
- Task Arithmetic with tasks only appended (same base, same leading tasks): the parent's delta/
  sum. The apply pass reads that sum, the base and the new tasks, and gives the bytes of a
  from-scratch merge (workers/append.py). Removing, replacing or reordering tasks recomputes the
  sum: float32 subtraction would not give those bytes back.
- global TIES thresholds, per task, keyed by (base hash, task hash, density): only new or changed
  tasks get the histogram passes, over the base and those tasks alone.
- TALL masks and consensus depend on tau_MTL of all tasks: recomputed (their TIES thresholds are
  reused as above).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mergeflow.errors import MergeflowError
from mergeflow.infra import hash_cache
from mergeflow.infra.lock import RunLock
from mergeflow.infra.storage import StorageOptions, basename, join, normalize, sha256_of, storage_for
from mergeflow.infra.storage import parent as parent_of
from mergeflow.infra.tracking import checkpoint_digest
from mergeflow.workers.append import PreviousSum, append_shard
from mergeflow.workers.checkpoint import resolve_files
from mergeflow.workers.safetensors_io import read_header
from mergeflow.workflows import registry, runtime
from mergeflow.workflows.commit import MANIFEST, clear, read_manifest
from mergeflow.workflows.config import MergeConfig
from mergeflow.workflows.journal import Journal
from mergeflow.workflows.merge import MergeReport, Reuse, run_merge
from mergeflow.workflows.plan import Plan, input_stamps, make_plan

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
LATEST = "latest.json"
RUN_NAME = re.compile(r"\d{8}T\d{6}\.\d{6}Z")  # new_run_name()


# ------------------------------------------------------------------------------ the parent run


@dataclass(frozen=True)
class Parent:
    uri: str
    manifest: dict
    manifest_sha256: str
    mlflow_run_id: str | None

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["inputs"]["tasks"]]

    def record(self) -> dict:
        return {"run": self.uri, "manifest_sha256": self.manifest_sha256, "mlflow_run_id": self.mlflow_run_id}


def load_parent(uri: str, options: StorageOptions) -> Parent:
    store = storage_for(uri, options)
    if not store.exists(join(uri, MANIFEST)):
        raise MergeflowError(f"{uri}: no {MANIFEST}; the parent of a re-merge must be a finished run")
    data = store.read_bytes(join(uri, MANIFEST))
    run_id = None
    if store.exists(join(uri, "tracking.json")):
        run_id = json.loads(store.read_bytes(join(uri, "tracking.json"))).get("run_id")
    return Parent(uri, json.loads(data), hashlib.sha256(data).hexdigest(), run_id)


def find_parent(root: str, options: StorageOptions, explicit: str | None = None) -> Parent | None:
    if explicit:
        return load_parent(normalize(explicit), options)
    store = storage_for(root, options)
    if store.exists(join(root, LATEST)):
        return load_parent(join(root, latest_run(root, store.read_bytes(join(root, LATEST)))), options)
    if store.exists(join(root, MANIFEST)):  # a plain `mergeflow merge` into ROOT
        return load_parent(root, options)
    return None


def latest_run(root: str, data: bytes) -> str:
    """The run latest.json points at, as a path under ROOT: runs/<name>, nothing else."""
    try:
        run = json.loads(data)["run"]
    except (ValueError, KeyError, TypeError):
        run = None
    parts = run.split("/") if isinstance(run, str) else []
    if len(parts) != 2 or parts[0] != RUNS_DIR or not RUN_NAME.fullmatch(parts[1]):
        raise MergeflowError(
            f"{join(root, LATEST)}: does not name a run under {join(root, RUNS_DIR)} (got {run!r}); "
            "it is corrupt: remove it or pass --from RUN"
        )
    return run


# --------------------------------------------------------------------- what the task set is


@dataclass(frozen=True)
class TaskSet:
    """A merge's inputs by content: the base's and every task's checkpoint digest, in task order."""

    base: str
    tasks: tuple[tuple[str, str], ...]  # (name, digest)


def digest(files: list[str], hashes: dict[str, str]) -> str:
    return checkpoint_digest({"files": {f: {"sha256": hashes[f]} for f in files}})


def taskset(config: MergeConfig, files: dict[str, list[str]], hashes: dict[str, str]) -> TaskSet:
    return TaskSet(
        digest(files[config.base], hashes), tuple((t.name, digest(files[t.checkpoint], hashes)) for t in config.tasks)
    )


def parent_taskset(manifest: dict) -> TaskSet:
    inputs = manifest["inputs"]
    return TaskSet(checkpoint_digest(inputs["base"]), tuple((t["name"], checkpoint_digest(t)) for t in inputs["tasks"]))


def same_method(config: MergeConfig, manifest: dict) -> bool:
    """Same method settings: the method's declared parameters as the manifest records them. A value
    keyed by task (TALL masks' per-task lambdas) is compared for the tasks both runs have (a new
    task's value is part of adding it); a value chosen on validation data (`auto`) is compared by
    how it is chosen (evaluator, split, grid), not by the value the parent happened to choose."""
    method, recorded = config.method.method, manifest["method"]
    doc = json.loads(json.dumps(method.record(config.method.params, config.task_names)))
    auto = config.method.auto()
    same = all(k in auto or _same_value(recorded.get(k), v) for k, v in doc.items())
    if auto:
        sel, was = config.selection, manifest.get("selection") or {}
        same = same and (was.get("evaluator"), was.get("split")) == (sel.evaluator, sel.split)
        for key in auto:  # the scale's record is "alpha" whatever the method calls it
            record = "alpha" if key == method.scale.rstrip("_") else key
            grid = sel.alphas if record == "alpha" else getattr(sel, f"{key}s", None)
            same = same and (was.get(record) or {}).get("grid") == list(grid or ())
    return same


def _same_value(before, now) -> bool:
    if isinstance(before, dict) and isinstance(now, dict):
        return all(before.get(k, v) == v for k, v in now.items())
    return before == now


@dataclass(frozen=True)
class Changes:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    reordered: bool = False
    base_changed: bool = False
    method_changed: bool = False

    @property
    def any(self) -> bool:
        return bool(
            self.added or self.removed or self.replaced or self.reordered or self.base_changed or self.method_changed
        )

    def describe(self) -> str:
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (("added", self.added), ("replaced", self.replaced), ("removed", self.removed))
            if names
        ]
        parts += [
            what
            for what, flag in (
                ("task order changed", self.reordered),
                ("base changed", self.base_changed),
                ("method settings changed", self.method_changed),
            )
            if flag
        ]
        return "; ".join(parts) or "no changes"

    def record(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def compare(old: TaskSet, new: TaskSet, method_changed: bool) -> Changes:
    before, after = dict(old.tasks), dict(new.tasks)
    kept = [n for n, _ in new.tasks if n in before]
    return Changes(
        added=tuple(n for n, _ in new.tasks if n not in before),
        removed=tuple(n for n, _ in old.tasks if n not in after),
        replaced=tuple(n for n in kept if before[n] != after[n]),
        reordered=kept != [n for n, _ in old.tasks if n in after],
        base_changed=old.base != new.base,
        method_changed=method_changed,
    )


# ------------------------------------------------------------------------------ input hashes


def checkpoint_files(config: MergeConfig) -> dict[str, list[str]]:
    """Checkpoint URI -> its safetensors files (index files and existence checks only)."""
    options = config.storage.options()
    uris = [config.base] + [t.checkpoint for t in config.tasks]
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(lambda u: resolve_files(u, options)[0], uris))
    return dict(zip(uris, found))


def recorded_files(manifest: dict) -> dict[str, dict]:
    """Input file URI -> its manifest entry (sha256, size, and stamp when recorded)."""
    out = {}
    for cp in [manifest["inputs"]["base"], *manifest["inputs"]["tasks"]]:
        for name, entry in cp["files"].items():
            out[cp["uri"] if cp["uri"].endswith(".safetensors") else join(cp["uri"], name)] = entry
    return out


def known_hashes(manifest: dict, stamps: dict[str, str]) -> dict[str, str]:
    """sha256 of the files whose size and mtime/ETag are what the manifest recorded with them."""
    return {
        f: e["sha256"] for f, e in recorded_files(manifest).items() if e.get("stamp") and stamps.get(f) == e["stamp"]
    }


# ------------------------------------------------------------------------------------- reuse


def appendable(config: MergeConfig, parent: Parent, old: TaskSet, new: TaskSet) -> int | None:
    """k when the parent's delta/ holds the running sum of exactly the first k new tasks (a method
    whose delta is the in-order sum of the task vectors, merged by the same method)."""
    if not config.method.method.running_sum or parent.manifest["method"]["name"] != config.method.name:
        return None
    k = len(old.tasks)
    if old.base != new.base or new.tasks[:k] != old.tasks:
        return None
    if not any(rel.startswith("delta/") for rel in parent.manifest["outputs"]):
        return None
    return k


def delta_intact(parent: Parent, rels: list[str], options: StorageOptions, quiet: bool, use_cache: bool) -> bool:
    """Whether the parent's delta/ files still hash to the sha256 its manifest recorded. A file whose
    stamp (size + mtime, or ETag) is the one remembered with a verified hash is not read again (the
    run that wrote it remembered it), as for inputs; the others are hashed, next to the data."""
    expected = {join(parent.uri, rel): parent.manifest["outputs"][rel]["sha256"] for rel in rels}
    stamps = input_stamps(list(expected), options)
    known = hash_cache.cached_hashes(stamps) if use_cache else {}
    todo = [uri for uri in expected if uri not in known]
    if todo:
        runtime.connect(None)
        sizes = [parent.manifest["outputs"][rel]["size"] for rel in rels if join(parent.uri, rel) in todo]
        known |= dict(
            zip(
                todo,
                runtime.run_tasks(
                    sha256_of, [(u, options) for u in todo], sizes=sizes, desc="verify the parent's sum", quiet=quiet
                ),
            )
        )
    bad = [uri for uri, sha in expected.items() if known[uri] != sha]
    if bad:
        log.warning(
            "%s: sha256 differs from the parent's %s (the run was modified); recomputing the sum of "
            "every task instead of extending it",
            bad[0],
            MANIFEST,
        )
        return False
    if use_cache:
        hash_cache.remember(stamps, known)
    return True


def previous_sum(
    parent: Parent, plan: Plan, k: int, options: StorageOptions, quiet: bool = False
) -> PreviousSum | None:
    """The parent's delta/ tensors located from their headers; None when they do not cover the plan."""
    outputs = parent.manifest["outputs"]
    rels = sorted(rel for rel in outputs if rel.startswith("delta/"))
    if not delta_intact(parent, rels, options, quiet, plan.config.execution.hash_cache):
        return None
    with ThreadPoolExecutor(max_workers=8) as pool:
        headers = list(pool.map(lambda rel: read_header(join(parent.uri, rel), options), rels))
    tensors = {n: info for h in headers for n, info in h.tensors.items()}
    floats = [j for s in plan.shards for j in s.tensors if j.is_float]
    if any(j.name not in tensors or tensors[j.name].dtype != "F32" or tensors[j.name].shape != j.shape for j in floats):
        log.warning("%s: delta/ does not cover this model's tensors; recomputing the sum", parent.uri)
        return None
    layers = json.loads(storage_for(parent.uri, options).read_bytes(join(parent.uri, "stats/layers.json")))
    names = parent.task_names
    tau_sq = {layer: tuple(float(e["tau_norm"][n]) ** 2 for n in names) for layer, e in layers.items()}
    return PreviousSum(tensors, tau_sq, k)


# ------------------------------------------------------------------------------- run folders


def new_run_name() -> str:
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}Z"


def run_names(root: str, options: StorageOptions) -> list[str]:
    runs = join(root, RUNS_DIR)
    prefix = runs.rstrip("/") + "/"
    names = {u[len(prefix) :].split("/")[0] for u in storage_for(runs, options).list(runs)}
    return sorted(n for n in names if RUN_NAME.fullmatch(n))  # anything else there is not ours


def pick_run_dir(root: str, options: StorageOptions, fingerprint: str) -> str:
    """Where the new run goes. A run of the same plan is reused: a finished one (killed before
    latest.json moved, or an earlier run of the same inputs) is only published, an unfinished one
    resumed. Other unfinished runs (left by killed re-merges: we hold the lock, nobody else writes
    here) are removed."""
    chosen = None
    for name in reversed(run_names(root, options)):
        run = join(root, RUNS_DIR, name)
        manifest = read_manifest(run, options)
        if manifest is not None:
            if chosen is None and manifest.get("fingerprint") == fingerprint:
                chosen = run
            continue
        if chosen is None and Journal(run, options).fingerprint() == fingerprint:
            chosen = run
            continue
        log.warning("removing the unfinished run %s", run)
        remove_run(run, options, None)
    return chosen or join(root, RUNS_DIR, new_run_name())


def publish(root: str, run: str, options: StorageOptions) -> dict:
    """Point ROOT/latest.json at run (one PUT or rename: readers see the old or the new pointer)."""
    store = storage_for(root, options)
    data = store.read_bytes(join(run, MANIFEST))
    doc = {
        "run": run[len(root.rstrip("/")) + 1 :],
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write_bytes(join(root, LATEST), json.dumps(doc, indent=1).encode())
    return doc


def prune(root: str, options: StorageOptions, keep: int, current: str) -> list[str]:
    """Remove complete runs older than the newest `keep` (never the current one)."""
    if keep <= 0:
        return []
    store = storage_for(root, options)
    done = [n for n in run_names(root, options) if store.exists(join(root, RUNS_DIR, n, MANIFEST))]
    dropped = []
    for name in done[:-keep]:
        run = join(root, RUNS_DIR, name)
        if run != current:
            remove_run(run, options, read_manifest(run, options))
            dropped.append(run)
    return dropped


def remove_run(run: str, options: StorageOptions, manifest: dict | None) -> None:
    """Delete a run's own files (what its manifest and journal list) and its folder when that empties it."""
    clear(run, options, manifest)
    storage_for(run, options).remove_empty_dirs(parent_of(run), (basename(run),))


# --------------------------------------------------------------------------------- the recipe


@dataclass
class RemergeResult:
    root: str
    parent: Parent | None
    up_to_date: bool = False
    changes: Changes | None = None
    run: str | None = None
    report: MergeReport | None = None
    reused: dict = field(default_factory=dict)
    gate: object = None  # workflows.gate.Verdict when the config has a gate
    published: bool = False


def remerge(
    config: MergeConfig,
    *,
    parent: str | None = None,
    if_changed: bool = False,
    quiet: bool = False,
    keep: int = 0,
    lock: RunLock | None = None,
) -> RemergeResult:
    """Re-merge `config` into a new run under its output root. With if_changed, return at once
    (reading no tensor data, starting nothing) when the parent already merged the same contents."""
    root, options = config.output, config.storage.options()
    par = find_parent(root, options, parent)
    config = registry.resolve(config, par.task_names if par else ())
    if config.execution.keep_delta == "auto":  # the next re-merge extends a running sum
        keep_delta = config.method.method.running_sum
        config = config.model_copy(update={"execution": config.execution.model_copy(update={"keep_delta": keep_delta})})
    result = RemergeResult(root, par)

    files = checkpoint_files(config)
    every = list(dict.fromkeys(f for fs in files.values() for f in fs))
    hashes = known_hashes(par.manifest, input_stamps(every, options)) if par else {}
    from_parent, hashed_bytes = len(hashes), 0
    if par is not None:
        unknown = [f for f in every if f not in hashes]
        if unknown:  # what changed is decided by content: hash only files that are new or touched
            runtime.connect(config.execution.ray_address)
            sizes = [storage_for(f, options).size(f) for f in unknown]
            got = runtime.run_tasks(
                sha256_of, [(f, options) for f in unknown], desc="hash new inputs", sizes=sizes, quiet=quiet
            )
            hashes |= dict(zip(unknown, got))
            hashed_bytes = sum(sizes)
        old, new = parent_taskset(par.manifest), taskset(config, files, hashes)
        result.changes = compare(old, new, not same_method(config, par.manifest))
        if if_changed and not result.changes.any:
            result.up_to_date, result.run = True, par.uri
            return result

    plan = make_plan(config)
    k = appendable(config, par, old, new) if par else None
    if k is not None and config.execution.ray_address:
        runtime.connect(config.execution.ray_address)  # verify the parent's sum on the cluster, not locally
    prev = previous_sum(par, plan, k, options, quiet) if k is not None else None
    names = config.task_names
    result.reused = {
        "input_hashes": from_parent,  # files whose sha256 came from the parent's manifest
        "bytes_hashed_to_compare": hashed_bytes,
        "sum_of_tasks": list(names[:k]) if prev else [],
    }
    reuse = Reuse(
        input_hashes=hashes,
        worker=functools.partial(append_shard, previous=prev) if prev else None,
        manifest={
            "parent": par.record() if par else None,
            "remerge": {"changes": result.changes.record() if result.changes else None, "reused": result.reused},
        },
        parent=par.manifest if par else None,
        digests=new if par else None,
        parent_digests=old if par else None,
        cache_root=root,  # caches shared by every run under the root (LOT's statistics)
    )
    result.run = pick_run_dir(root, options, plan.fingerprint)
    result.report = run_merge(config.model_copy(update={"output": result.run}), quiet=quiet, reuse=reuse, lock=lock)
    result.reused = (result.report.manifest or {}).get("remerge", {}).get("reused", result.reused)
    if config.gate is not None:  # the new run replaces the published one only if it scores as well
        from mergeflow.workflows import gate

        result.gate = gate.evaluate(config, result.run, result.report.manifest, par, quiet=quiet)
        if not result.gate.passed:
            return result  # kept for inspection, not published
    if lock is not None:
        lock.check()  # a merge whose lock was taken over must not move latest.json
    publish(root, result.run, options)
    result.published = True
    for run in prune(root, options, keep, result.run):
        log.info("removed the old run %s (--keep %d)", run, keep)
    return result
