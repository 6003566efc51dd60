"""The merge recipe: plan -> map -> reduce -> commit, one call each.

The driver handles headers, small statistics and JSON only; tensor bytes move
between storage and the Ray workers that own each shard.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from mergeflow.infra import hash_cache
from mergeflow.infra.lock import DEFAULT_TTL, RunLock
from mergeflow.infra.storage import join, sha256_of, storage_for
from mergeflow.workers import kth_value
from mergeflow.workers.lot.shard import lot_shard
from mergeflow.workers.methods import get_method
from mergeflow.workers.shard import (ShardResult, ShardSpec, apply_shard, majority_redo, merge_shard, shard_counts,
                           shard_ties_sample)
from mergeflow.workflows import commit, lot_stage, runtime, select, stats
from mergeflow.workflows.commit import OutputState
from mergeflow.workflows.config import MergeConfig
from mergeflow.workflows.input_hashes import InputHashes
from mergeflow.workflows.journal import Journal
from mergeflow.workflows.plan import Plan, input_stamps, make_plan

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Reuse:
    """Work a re-merge takes from its parent run instead of redoing it (built by workflows/remerge.py)."""

    input_hashes: Mapping[str, str] = field(default_factory=dict)  # input file -> sha256 known to be current
    thresholds: Callable[[Plan, bool], tuple[float, ...]] | None = None  # global TIES thresholds, from a cache
    worker: Callable[[ShardSpec], ShardResult] | None = None  # the apply pass, in place of merge_shard
    manifest: dict = field(default_factory=dict)  # extra manifest keys: the parent, what was reused


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    t0 = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def _memory_per_task(plan: Plan) -> int:
    # float32 task rows, their abs/bit views and masks: ~6 words per element per task, plus I/O buffers.
    chunk = plan.shards[0].chunk_elems if plan.shards else plan.config.execution.chunk_elems
    return 6 * 4 * chunk * (len(plan.tasks) + 2) + 256 * 2**20


def _pass_options(plan: Plan, quiet: bool) -> dict:
    return dict(sizes=[s.nbytes for s in plan.shards], quiet=quiet, memory=_memory_per_task(plan),
                gpu=plan.shards[0].device == "cuda")


def _ties_sample(plan: Plan, quiet: bool) -> tuple[kth_value.Sample, int]:
    """The 1/32 sample of every task's |tau| (and how many values each task has)."""
    sample, total = kth_value.Sample.empty(len(plan.tasks)), 0
    for part, numel in runtime.run_tasks(shard_ties_sample, [(s,) for s in plan.shards], desc="TIES threshold: sample",
                                         **_pass_options(plan, quiet)):
        sample, total = sample + part, total + numel
    return sample, total


def _ties_k(plan: Plan, total: int) -> np.ndarray:
    return np.full(len(plan.tasks), kth_value.kth_rank(total, plan.params.density), dtype=np.int64)


def ties_thresholds(plan: Plan, quiet: bool, sampled: tuple[kth_value.Sample, int] | None = None) -> tuple[float, ...]:
    """Exact whole-model TIES thresholds (per task, the k-th smallest |tau_t| over the model).

    A 1/32 sample places each k-th value in a narrow window; one counting pass then finds it
    exactly. Tasks whose window would be too wide, or missed, take two histogram passes."""
    kw = _pass_options(plan, quiet)
    sample, total = sampled or _ties_sample(plan, quiet)

    def run_pass(counting: kth_value.Plan, i: int) -> list[np.ndarray]:
        kinds = sorted({c.kind for c in counting} - {"skip"})
        calls = [(s, counting) for s in plan.shards]
        counts = kth_value.summed(counting, runtime.run_tasks(
            shard_counts, calls, desc=f"TIES threshold: pass {i + 1} ({'+'.join(kinds)})", **kw))
        if i == 1:
            log.info("TIES thresholds: %s needed more than one pass", ", ".join(
                plan.task_names[j] for j, c in enumerate(counting) if c.kind != "skip"))
        return counts

    return tuple(float(x) for x in kth_value.select(run_pass, sample, total, _ties_k(plan, total)))


def first_ties_thresholds(plan: Plan, quiet: bool, guess_zeros: bool) -> dict:
    """Global TIES thresholds for the journal's globals: {"thresholds": [...]}, exact, or, when the
    sample puts every task's k-th |tau| at 0 with margin (sparse task vectors: most bf16 weights of
    a fine-tune often keep their base value), thresholds of 0 plus {"zeros_to_check": k}. The apply
    pass then counts each task's zeros and check_zero_thresholds confirms them: one pass over the
    inputs fewer, and the same result, as trimming at 0 keeps everything."""
    sample, total = _ties_sample(plan, quiet)
    k = _ties_k(plan, total)
    if guess_zeros and kth_value.zeros_expected(sample, total, k):
        return {"thresholds": [0.0] * len(plan.tasks), "zeros_to_check": k.tolist()}
    return {"thresholds": list(ties_thresholds(plan, quiet, (sample, total)))}


def check_zero_thresholds(plan: Plan, results: dict[int, ShardResult], saved: dict, quiet: bool) -> bool:
    """True when every task has at least k exact zeros (the guessed thresholds of 0 are the exact
    ones); otherwise saved["thresholds"] becomes the exact thresholds and the caller merges again."""
    k = np.asarray(saved.pop("zeros_to_check"), dtype=np.int64)
    zeros = np.sum([r.zeros for r in results.values()], axis=0)
    short = [plan.task_names[t] for t in np.flatnonzero(zeros < k)]
    if not short:
        return True
    log.warning("TIES: the sample put every threshold at 0 but %s %s fewer zeros than trimming needs; computing "
                "exact thresholds and merging again", ", ".join(short), "has" if len(short) == 1 else "have")
    saved["thresholds"] = list(ties_thresholds(plan, quiet))
    return False


def _verify_outputs(output: str, outputs: dict[str, tuple[str, int]], options) -> bool:
    store = storage_for(output, options)
    for rel, (sha, size) in outputs.items():
        uri = join(output, rel)
        if not store.exists(uri) or store.size(uri) != size or sha256_of(uri, options) != sha:
            return False
    return True


def reusable_shards(plan: Plan, journal: Journal, quiet: bool) -> dict[int, ShardResult]:
    """Journaled shards computed with the plan's TIES thresholds (and zero counts, where it checks
    guessed ones) whose files are still there with the recorded hashes."""
    recorded = {s.index: r for s in plan.shards if (r := journal.recorded(s.index)) is not None
                and r.thresholds_used == s.thresholds and (r.zeros is not None or not s.count_zeros)}
    if not recorded:
        return {}
    options = plan.config.storage.options()
    calls = [(plan.config.output, r.outputs, options) for r in recorded.values()]
    ok = runtime.run_tasks(_verify_outputs, calls, desc="verify written shards", quiet=quiet)
    return {i: r for (i, r), good in zip(recorded.items(), ok) if good}


def on_node(fn, *args) -> ShardResult:
    """fn(*args) in a Ray worker, noting which node computed the shard."""
    result = fn(*args)
    result.node, result.node_ip = runtime.current_node()
    return result


def _with(plan: Plan, **changes) -> Plan:
    return dataclasses.replace(plan, shards=tuple(dataclasses.replace(s, **changes) for s in plan.shards))


def _with_params(plan: Plan, **changes) -> Plan:
    params = dataclasses.replace(plan.params, **changes)
    return dataclasses.replace(_with(plan, params=params), params=params)


def map_shards(plan: Plan, specs, journal: Journal, quiet: bool, desc: str, fn=merge_shard, extra: tuple = (),
               merge_into: dict[int, ShardResult] | None = None, memory: int | None = None) -> list[ShardResult]:
    """Run `fn(spec, *extra)` per shard, journaling each result as it lands; with `merge_into`, a
    result's outputs are added to that shard's earlier result (a second pass over the same shard,
    which keeps the node of the first)."""

    def record(i: int, r: ShardResult) -> None:
        if merge_into is not None and r.index in merge_into:
            earlier = merge_into[r.index]
            r = dataclasses.replace(earlier, outputs=earlier.outputs | r.outputs, bytes_read=earlier.bytes_read + r.bytes_read,
                                    seconds=earlier.seconds + r.seconds)
        journal.record(r)
        results[i] = r

    results: list = [None] * len(specs)
    runtime.run_tasks(
        on_node,
        [(fn, s, *extra) for s in specs],
        desc=desc,
        sizes=[s.nbytes for s in specs],
        on_result=record,
        memory=memory or _memory_per_task(plan),
        gpu=plan.shards[0].device == "cuda",
        quiet=quiet,
    )
    return results


def run_merge(config: MergeConfig, *, overwrite: bool = False, quiet: bool = False, reuse: Reuse | None = None,
              lock: RunLock | None = None, lock_ttl: float = DEFAULT_TTL) -> MergeReport:
    """Plan, map, reduce and commit one merge into config.output.

    One merge writes an output at a time: after planning (bad input fails before anything is
    written), it takes the output's lock, the one `remerge` takes; a caller that already holds
    the lock covering the output (remerge, on its root) passes it instead."""
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    with _timed(timings, "plan"):
        plan = make_plan(config)
    options = config.storage.options()
    with ExitStack() as held:
        if lock is None:
            commit.refuse_foreign(config.output, options)  # before the lock file lands in someone else's folder
            lock = held.enter_context(RunLock(config.output, options, ttl=lock_ttl, heartbeat=min(15.0, lock_ttl / 4),
                                              command=f"mergeflow merge -> {config.output}"))
        return _merge_locked(plan, overwrite, quiet, reuse or Reuse(), lock, timings, t_start)


def _merge_locked(plan: Plan, overwrite: bool, quiet: bool, reuse: Reuse, lock: RunLock, timings: dict[str, float],
                  t_start: float) -> MergeReport:
    config = plan.config
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
        known |= hash_cache.cached_hashes({f: plan.stamps[f] for f in input_files if f not in known and f in plan.stamps})
    to_hash = [f for f in input_files if f not in known]
    hashing = InputHashes.start(to_hash, options, config.execution.ray_address)
    try:
        with _timed(timings, "ray_start"):
            runtime.connect(config.execution.ray_address)
            hashing.connected()
            device = runtime.resolve_device(config.execution.device)
            chunk = config.execution.chunk_for(device, len(plan.tasks))
            plan = dataclasses.replace(
                plan, shards=tuple(dataclasses.replace(s, device=device, chunk_elems=chunk) for s in plan.shards)
            )
        journal = Journal(config.output, options)
        saved = journal.load_globals() or {}
        zero_guess = None  # "confirmed" or "refuted" when the apply pass checked thresholds of 0
        if plan.params.uses_ties and plan.params.scope == "global":
            with _timed(timings, "ties_thresholds"):
                if not saved.get("thresholds"):
                    if reuse.thresholds:
                        saved["thresholds"] = list(reuse.thresholds(plan, quiet))
                    else:
                        guess = reuse.worker is None and not config.select_lambda  # passes that need exact ones
                        saved |= first_ties_thresholds(plan, quiet, guess_zeros=guess)
                    journal.save_globals(saved)
                plan = _with(plan, thresholds=tuple(saved["thresholds"]), count_zeros="zeros_to_check" in saved)
        selection: dict = {}
        if config.select_lambda:
            with _timed(timings, "select_lambda"):
                selection["lambda"] = saved.get("lambda") or select.select_lambdas(plan, quiet)
                saved["lambda"] = selection["lambda"]
                journal.save_globals(saved)
                chosen = tuple(float(selection["lambda"]["chosen"][t]) for t in plan.task_names)
                plan = _with_params(plan, lambdas=chosen)
        if config.select_alpha:
            plan = _with(plan, write_model=False, write_delta=True)  # the model waits for alpha

        lot = None
        shard_worker: dict = {"fn": worker}
        if get_method(plan.params.name).kind == "features":
            with _timed(timings, "lot_features"):
                lot = lot_stage.collect_features(plan, known | hashing.for_tasks(), quiet)
            # LOT solves whole tensors from per-task statistics, in its own shard worker
            shard_worker = {"fn": lot_shard, "extra": (lot.stats,), "memory": lot.memory}

        with _timed(timings, "merge"):
            reused = reusable_shards(plan, journal, quiet) if state is OutputState.RESUME else {}
            todo = [s for s in plan.shards if s.index not in reused]
            results = dict(reused)
            for r in map_shards(plan, todo, journal, quiet, desc=f"merge ({plan.params.name})", **shard_worker):
                results[r.index] = r
            report.shards_reused, report.shards_run = len(reused), len(todo)
            if "zeros_to_check" in saved:
                zero_guess = "confirmed" if check_zero_thresholds(plan, results, saved, quiet) else "refuted"
                journal.save_globals(saved)
                plan = _with(plan, thresholds=tuple(saved["thresholds"]), count_zeros=False)
                if zero_guess == "refuted":
                    results = {r.index: r for r in map_shards(plan, plan.shards, journal, quiet,
                                                              desc=f"merge ({plan.params.name})", **shard_worker)}
                    report.shards_run += len(plan.shards)
            if plan.params.uses_ties:
                _, redo = majority_redo(list(plan.shards), list(results.values()))
                for r in map_shards(plan, redo, journal, quiet, desc="TIES majority-sign fix-up", fn=worker):
                    results[r.index] = r
                report.shards_run += len(redo)

        if config.select_alpha:
            with _timed(timings, "select_alpha"):
                selection["alpha"] = saved.get("alpha") or select.select_alpha(plan, list(plan.shards), quiet)
                saved["alpha"] = selection["alpha"]
                journal.save_globals(saved)
                plan = _with_params(plan, alpha=float(selection["alpha"]["chosen"]))
            with _timed(timings, "merge"):
                alpha = plan.params.alpha
                for r in map_shards(plan, plan.shards, journal, quiet, desc=f"write model (alpha {alpha:g})",
                                    fn=apply_shard, extra=(alpha,), merge_into=results):
                    results[r.index] = r

        with _timed(timings, "commit"):
            ordered = [results[s.index] for s in plan.shards]
            outputs = commit.shard_outputs(ordered)
            outputs |= commit.write_model_index(plan)
            if get_method(plan.params.name).compresses:
                outputs |= commit.write_compressed_index(plan)
            layers = stats.merge_layers(ordered)
            summary = stats.summary(layers, plan.task_names)
            outputs |= write_stats(plan, layers, summary)
            fresh = hashing.result()
            if config.execution.hash_cache:
                hash_cache.remember(plan.stamps, fresh)
                remember_delta(plan, outputs)
            hashes = known | fresh
            inputs = {f: (hashes[f], storage_for(f, options).size(f)) for f in input_files}
            report.bytes_read = sum(r.bytes_read for r in ordered)
            report.bytes_hashed = sum(inputs[f][1] for f in to_hash)
            extra = {
                "summary": summary | sizes_summary(plan, outputs)
                | {"bytes_read": report.bytes_read, "bytes_hashed": report.bytes_hashed},
                "timings": {k: round(v, 3) for k, v in timings.items()},
                "nodes": placement(ordered),
            }
            if lot is not None:
                extra["lot"] = lot.manifest(plan)
            if selection:
                extra["selection"] = {"evaluator": config.selection.evaluator, "split": config.selection.split,
                                      **selection}
            if plan.params.uses_ties:
                extra["ties"] = {"thresholds": list(plan.shards[0].thresholds or ()),  # empty: per-tensor scope
                                 "majority": int(np.sign(sum(r.sign_sum for r in ordered)))}
                if zero_guess:
                    extra["ties"]["zero_guess"] = zero_guess
            extra |= reuse.manifest
            commit.sweep(plan, outputs)
            lock.check()  # a merge whose lock was taken over must not publish a manifest
            report.manifest = commit.write_manifest(plan, outputs, inputs, extra)
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
    for r in results:
        if not r.node:  # journaled before nodes were recorded
            continue
        n = nodes.setdefault(r.node, {"ip": r.node_ip, "shards": [], "bytes_read": 0, "seconds": 0.0})
        n["shards"].append(r.index + 1)
        n["bytes_read"] += r.bytes_read
        n["seconds"] = round(n["seconds"] + r.seconds, 3)
    return nodes


def sizes_summary(plan: Plan, outputs: dict[str, tuple[str, int]]) -> dict:
    """Storage accounting for the compressed bundle against keeping every checkpoint."""
    compressed = sum(size for rel, (_, size) in outputs.items() if rel.startswith("compressed/"))
    individual = sum(cp.nbytes for cp in plan.tasks)
    out = {"input_bytes": plan.input_bytes, "model_bytes": sum(s for r, (_, s) in outputs.items() if r.startswith("model/"))}
    if compressed:
        out["compressed_bytes"] = compressed
        out["checkpoints_bytes"] = individual
        out["compression_ratio"] = round((individual + plan.base.nbytes) / (compressed + plan.base.nbytes), 3)
    return out


def track(report: MergeReport, config_text: str | None, options, parent_run_id: str | None = None) -> str | None:
    """One MLflow run per merge, logged after the commit: a tracking failure raises
    TrackingError but can never undo or corrupt the committed result."""
    from mergeflow.infra.tracking import log_merge

    if report.manifest is None or not options.enabled:
        return None
    output, storage = report.plan.config.output, report.plan.config.storage.options()
    store = storage_for(output, storage)
    files = {rel: store.read_bytes(join(output, rel)) for rel in report.manifest["outputs"] if rel.startswith("stats/")}
    run_id = log_merge(report.manifest, output=output, config_text=config_text, files=files, options=options,
                       parent_run_id=parent_run_id)
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
