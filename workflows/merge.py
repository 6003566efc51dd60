"""The merge recipe: plan -> method passes -> map -> after-map -> selection -> commit (then track).

The driver handles headers, small statistics and JSON only; tensor bytes move between storage
and the Ray workers that own each shard. The recipe knows no method: the method's stages
(workers/methods/base.py) run on a Run (workflows/run.py), and its kernels in the workers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from mergeflow.infra import hash_cache
from mergeflow.infra.lock import DEFAULT_TTL, RunLock
from mergeflow.infra.storage import join, sha256_of, storage_for
from mergeflow.workers.lora_out import Target
from mergeflow.workers.shard import ShardResult, apply_shard, merge_shard
from mergeflow.workflows import commit, lora_out, prestart, runtime, select, stats
from mergeflow.workflows.commit import OutputState
from mergeflow.workflows.config import MergeConfig
from mergeflow.workflows.input_hashes import InputHashes
from mergeflow.workflows.journal import Journal
from mergeflow.workflows.plan import Plan, input_stamps, make_plan
from mergeflow.workflows.run import Reuse, Run, memory_per_task

log = logging.getLogger(__name__)

__all__ = ["MergeReport", "Reuse", "run_merge", "track"]


@dataclass
class MergeReport:
    plan: Plan
    state: OutputState
    manifest: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    shards_run: int = 0
    shards_reused: int = 0
    bytes_read: int = 0
    bytes_hashed: int = 0


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    t0 = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def _verify_outputs(output: str, outputs: dict[str, tuple[str, int]], options, part: tuple[str, list]) -> bool:
    """The shard's recorded files are there with their hashes; its model part may come back from
    the joined model.safetensors (commit.restore_part) when the run stopped after joining them."""
    store = storage_for(output, options)
    for rel, (sha, size) in outputs.items():
        uri = join(output, rel)
        if not store.exists(uri) and rel == part[0]:
            if commit.restore_part(output, rel, part[1], options) != (sha, size):
                return False
        elif not store.exists(uri) or store.size(uri) != size or sha256_of(uri, options) != sha:
            return False
    return True


def reusable_shards(run: Run, journal: Journal) -> dict[int, ShardResult]:
    """Journaled shards the method accepts for this run's shards (computed with the same reduced
    values) whose files are still there with the recorded hashes."""
    recorded = {
        s.index: r for s in run.shards if (r := journal.recorded(s.index)) is not None and run.method.can_reuse(r, s)
    }
    if not recorded:
        return {}
    specs = {s.index: s for s in run.shards}
    calls = [
        (
            run.output,
            r.outputs,
            run.storage,
            (specs[i].model_file(), [(j.name, j.dtype, j.shape) for j in specs[i].tensors]),
        )
        for i, r in recorded.items()
    ]
    ok = runtime.run_tasks(_verify_outputs, calls, desc="verify written shards", quiet=run.quiet)
    return {i: r for (i, r), good in zip(recorded.items(), ok) if good}


def on_node(fn, *args) -> ShardResult:
    """fn(*args) in a Ray worker, noting which node computed the shard."""
    result = fn(*args)
    result.node, result.node_ip = runtime.current_node()
    return result


def map_shards(
    run: Run,
    specs,
    journal: Journal,
    desc: str,
    fn=merge_shard,
    extra: tuple = (),
    merge_into: dict[int, ShardResult] | None = None,
) -> list[ShardResult]:
    """Run `fn(spec, *extra)` per shard, journaling each result as it lands; with `merge_into`, a
    result's outputs are added to that shard's earlier result (a second pass over the same shard,
    which keeps the node of the first)."""

    def record(i: int, r: ShardResult) -> None:
        if merge_into is not None and r.index in merge_into:
            earlier = merge_into[r.index]
            r = dataclasses.replace(
                earlier,
                outputs=earlier.outputs | r.outputs,
                bytes_read=earlier.bytes_read + r.bytes_read,
                seconds=earlier.seconds + r.seconds,
            )
        journal.record(r)
        results[i] = r

    results: list = [None] * len(specs)
    runtime.run_tasks(
        on_node,
        [(fn, s, *extra) for s in specs],
        desc=desc,
        sizes=[s.nbytes for s in specs],
        on_result=record,
        memory=run.method.memory(run) or memory_per_task(run.plan, run.chunk),
        gpu=run.device == "cuda",
        quiet=run.quiet,
    )
    return results


def run_merge(
    config: MergeConfig,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    reuse: Reuse | None = None,
    lock: RunLock | None = None,
    lock_ttl: float = DEFAULT_TTL,
) -> MergeReport:
    """Plan, map, reduce and commit one merge into config.output.

    One merge writes an output at a time: after planning (bad input fails before anything is
    written), it takes the output's lock, the one `remerge` takes; a caller that already holds
    the lock covering the output (remerge, on its root) passes it instead."""
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    with _timed(timings, "plan"):
        plan = make_plan(config)
        lora_out.check(plan)
    options = config.storage.options()
    with ExitStack() as held:
        if lock is None:
            commit.refuse_foreign(config.output, options)  # before the lock file lands in someone else's folder
            lock = held.enter_context(
                RunLock(
                    config.output,
                    options,
                    ttl=lock_ttl,
                    heartbeat=min(15.0, lock_ttl / 4),
                    command=f"mergeflow merge -> {config.output}",
                )
            )
        return _merge_locked(plan, overwrite, quiet, reuse or Reuse(), lock, timings, t_start)


def _merge_locked(
    plan: Plan, overwrite: bool, quiet: bool, reuse: Reuse, lock: RunLock, timings: dict[str, float], t_start: float
) -> MergeReport:
    config, method = plan.config, plan.method
    worker = reuse.worker or merge_shard
    with _timed(timings, "plan"):
        state = commit.prepare_output(plan, overwrite)
    report = MergeReport(plan, state, timings=timings)
    if state is OutputState.COMPLETE:
        report.manifest = commit.read_manifest(config.output, config.storage.options())
        return report

    input_files = [f for cp in [plan.base, *plan.tasks] for f in cp.files]
    options = config.storage.options()
    # The manifest needs every input's sha256: known ones are reused, the rest hashed while Ray
    # starts and the merge runs (workflows/input_hashes.py says where).
    known = {f: reuse.input_hashes[f] for f in input_files if f in reuse.input_hashes}
    if config.execution.hash_cache:
        known |= hash_cache.cached_hashes(
            {f: plan.stamps[f] for f in input_files if f not in known and f in plan.stamps}
        )
    to_hash = [f for f in input_files if f not in known]
    hashing = InputHashes.start(to_hash, options, config.execution.ray_address)
    try:
        with _timed(timings, "ray_start"):
            # A private runtime still starting in the background is not waited for: the driver
            # computes the first shards meanwhile (runtime.run_tasks); anything else connects.
            device = None
            if prestart.in_flight() and not config.execution.ray_address:
                device = runtime.device_while_starting(config.execution.device)
            if device is None:
                runtime.connect(config.execution.ray_address)
                hashing.connected()
                device = runtime.resolve_device(config.execution.device)
            chunk = config.execution.chunk_for(device, len(plan.tasks))
        journal = Journal(config.output, options)
        run = Run(
            plan,
            journal,
            reuse,
            device=device,
            chunk=chunk,
            quiet=quiet,
            input_hashes=lambda: known | hashing.for_tasks(),
        )
        scale_auto = config.select_scale
        if scale_auto:  # the model waits for the scale: the map writes the unscaled delta
            run.write_model, run.write_delta = False, True

        with _timed(timings, "method_passes"):
            method.before_map(run)

        if method.compresses:  # its masks get a plot at the commit (stats.overlap_png)
            stats.preload_plotting()
        with _timed(timings, "merge"):
            reused = reusable_shards(run, journal) if state is OutputState.RESUME else {}
            todo = [s for s in run.shards if s.index not in reused]
            results = dict(reused)
            for r in map_shards(run, todo, journal, desc=f"merge ({method.name})", fn=worker):
                results[r.index] = r
            report.shards_reused, report.shards_run = len(reused), len(todo)
            while (redo := method.after_map(run, results)) is not None and redo.shards:
                for r in map_shards(run, redo.shards, journal, desc=redo.desc, fn=worker):
                    results[r.index] = r
                report.shards_run += len(redo.shards)

        if scale_auto:
            with _timed(timings, "select_scale"):
                run.selection["alpha"] = run.saved.get("alpha") or select.select_scale(run)
                run.saved["alpha"] = run.selection["alpha"]
                run.save()
                run.params = method.with_scale(run.params, float(run.selection["alpha"]["chosen"]))
            with _timed(timings, "merge"):
                scale = float(method.scale_of(run.params))
                run.write_model = True
                for r in map_shards(
                    run,
                    run.shards,
                    journal,
                    desc=f"write model ({method.scale.rstrip('_')} {scale:g})",
                    fn=apply_shard,
                    extra=(scale,),
                    merge_into=results,
                ):
                    results[r.index] = r

        with _timed(timings, "commit"):
            shards = run.shards
            ordered = [results[s.index] for s in shards]
            outputs, single = commit.consolidate(plan, commit.shard_outputs(ordered))
            outputs |= commit.write_model_index(plan, single=single)
            outputs |= commit.put_files(plan, method.run_files(run, ordered))
            layers = stats.merge_layers(ordered)
            summary = stats.summary(layers, plan.task_names)
            outputs |= write_stats(plan, layers, summary)
            fresh = hashing.result()
            if config.execution.hash_cache:
                hash_cache.remember(plan.stamps, fresh)
                remember_delta(plan, outputs)
            hashes = known | fresh
            inputs = {f: (hashes[f], storage_for(f, options).size(f)) for f in input_files}
            record = method.record(run.params, plan.task_names)
            outputs |= commit.put_files(plan, {"model/README.md": commit.model_card(plan, record, inputs)})
            if config.lora_out is not None:
                with _timed(timings, "lora_out"):
                    lo = config.lora_out
                    target = None if lo.concat else Target(rank=lo.rank, energy=lo.energy)
                    scale = float(method.scale_of(run.params))
                    written, lora_section = lora_out.export(plan, target, scale, single=single, quiet=quiet)
                    outputs |= written
            report.bytes_read = sum(r.bytes_read for r in ordered)
            report.bytes_hashed = sum(inputs[f][1] for f in to_hash)
            extra = {
                "summary": summary
                | sizes_summary(plan, outputs)
                | {"bytes_read": report.bytes_read, "bytes_hashed": report.bytes_hashed},
                "timings": {k: round(v, 3) for k, v in timings.items()},
                "nodes": placement(ordered),
            }
            if single:
                extra["model_parts"] = commit.model_parts(plan)
            extra |= method.manifest(run, ordered)
            if config.lora_out is not None:
                extra |= lora_section
            if run.selection:
                extra["selection"] = {
                    "evaluator": config.selection.evaluator,
                    "split": config.selection.split,
                    **run.selection,
                }
            extra |= reuse.manifest
            if "remerge" in extra and run.reused:
                extra["remerge"] = extra["remerge"] | {"reused": extra["remerge"]["reused"] | run.reused}
            commit.sweep(plan, outputs)
            lock.check()  # a merge whose lock was taken over must not publish a manifest
            report.manifest = commit.write_manifest(plan, record, outputs, inputs, extra)
    except BaseException:
        hashing.cancel()
        commit.drop_partial_writes(config.output, options)  # temp files of the shards the failure cancelled
        raise
    timings["total"] = time.perf_counter() - t_start
    return report


def remember_delta(plan: Plan, outputs: dict[str, tuple[str, int]]) -> None:
    """The sha256 of the delta/ files just written, by stamp: a re-merge that extends this sum
    verifies them without reading them again."""
    delta = {join(plan.config.output, rel): sha for rel, (sha, _) in outputs.items() if rel.startswith("delta/")}
    if delta:
        hash_cache.remember(input_stamps(list(delta), plan.config.storage.options()), delta)


def write_stats(plan: Plan, layers, summary: dict) -> dict[str, tuple[str, int]]:
    import json

    files = {
        "stats/layers.json": json.dumps(stats.layers_doc(layers, plan.task_names), indent=1).encode(),
        "stats/summary.json": json.dumps(summary, indent=1).encode(),
    }
    png = stats.overlap_png(layers, plan.task_names)
    if png:
        files["stats/task_overlap.png"] = png
    return commit.put_files(plan, files)


def placement(results: list[ShardResult]) -> dict[str, dict]:
    """Which Ray node computed which shards (numbered from 1, as in the file names).
    A resumed run keeps the node of the run that computed a reused shard."""
    nodes: dict[str, dict] = {}
    driver = runtime.current_node()  # shards the driver ran before its runtime was up are its node's
    for r in results:
        if not r.node:  # journaled before nodes were recorded
            continue
        node, ip = driver if r.node == runtime.DRIVER else (r.node, r.node_ip)
        n = nodes.setdefault(node, {"ip": ip, "shards": [], "bytes_read": 0, "seconds": 0.0})
        n["shards"].append(r.index + 1)
        n["bytes_read"] += r.bytes_read
        n["seconds"] = round(n["seconds"] + r.seconds, 3)
    return nodes


def sizes_summary(plan: Plan, outputs: dict[str, tuple[str, int]]) -> dict:
    """Storage accounting for the compressed bundle against keeping every checkpoint."""
    compressed = sum(size for rel, (_, size) in outputs.items() if rel.startswith("compressed/"))
    individual = sum(cp.nbytes for cp in plan.tasks)
    out = {
        "input_bytes": plan.input_bytes,
        "model_bytes": sum(s for r, (_, s) in outputs.items() if r.startswith("model/")),
    }
    if lora := sum(size for rel, (_, size) in outputs.items() if rel.startswith("lora/")):
        out["lora_bytes"] = lora
    if compressed:
        out["compressed_bytes"] = compressed
        out["checkpoints_bytes"] = individual
        out["compression_ratio"] = round((individual + plan.base.nbytes) / (compressed + plan.base.nbytes), 3)
    return out


def track(
    report: MergeReport, config_text: str | None, options, parent_run_id: str | None = None, gate=None
) -> str | None:
    """One MLflow run per merge, logged after the commit: a tracking failure raises
    TrackingError but can never undo or corrupt the committed result. `gate` (a re-merge's
    workflows.gate.Verdict) adds its scores as metrics and its outcome as tags."""
    from mergeflow.infra.tracking import log_merge

    if report.manifest is None or not options.enabled:
        return None
    output, storage = report.plan.config.output, report.plan.config.storage.options()
    store = storage_for(output, storage)
    files = {rel: store.read_bytes(join(output, rel)) for rel in report.manifest["outputs"] if rel.startswith("stats/")}
    run_id = log_merge(
        report.manifest,
        output=output,
        config_text=config_text,
        files=files,
        options=options,
        parent_run_id=parent_run_id,
        extra_metrics=gate.metrics() if gate is not None else None,
        extra_tags={"mergeflow.gate": "passed" if gate.passed else "failed", "mergeflow.gate_reason": gate.reason}
        if gate is not None
        else None,
    )
    if run_id:
        import json

        from mergeflow.infra.tracking import redact

        doc = {"tracking_uri": redact(options.tracking_uri()), "run_id": run_id, "experiment": options.experiment}
        store.write_bytes(join(output, commit.TRACKING), json.dumps(doc, indent=1).encode())
    return run_id


def is_tracked(report: MergeReport) -> bool:
    """Whether the committed run of `report` was logged to MLflow (it has its tracking.json)."""
    output = report.plan.config.output
    return storage_for(output, report.plan.config.storage.options()).exists(join(output, commit.TRACKING))


def register(report: MergeReport, run_id: str, options, register_config) -> str:
    """A registered model version for the tracked run (its source the run's model/), alias moved."""
    from mergeflow.infra.tracking import register_model

    plan = report.plan
    output = plan.config.output
    rebuild = f"mergeflow reconstruct {output} --task T --output DIR" if plan.method.compresses else None
    return register_model(
        report.manifest,
        run_id=run_id,
        output=output,
        options=options,
        name=register_config.name,
        alias=register_config.alias,
        copy_weights=register_config.copy_weights,
        rebuild_command=rebuild,
        storage=plan.config.storage.options(),
    )
