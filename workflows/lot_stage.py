"""LOT's feature stage: one Ray task per task model (GPU when present), statistics cached by content.
The merge map that follows is the ordinary one over the same shard plan, with workers/lot/shard.py's
lot_shard as the worker and LotFeatures.memory as its Ray `memory=`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mergeflow.infra.storage import join
from mergeflow.workers.dtypes import is_float
from mergeflow.workers.lot.features import FeatureJob, FeatureResult, task_features
from mergeflow.workers.lot.models import TaskModelSpec, check_model
from mergeflow.workers.lot.rules import RULES, agreed_rule
from mergeflow.workflows import runtime
from mergeflow.workflows.plan import Plan

log = logging.getLogger(__name__)

# Least squares with fewer rows than a few times the unknowns per output fits the exemplars: on the
# digits suite (512 inputs, one row per exemplar, 8 tasks) 64 exemplars per task (1x) scored 0.23 on
# validation, 256 (4x) 0.89.
THIN = 2
DEFAULT_CACHE = ".lot_stats"  # under the output; outlives --overwrite, as its files are keyed by content


@dataclass
class LotFeatures:
    results: list[FeatureResult]  # task order
    rules: dict[str, int] = field(default_factory=dict)  # tensors per LOT rule
    thin: dict[str, list[int]] = field(default_factory=dict)  # linear weight -> [feature rows, input width]
    memory: int = 0  # bytes a shard worker needs at most (Ray `memory=`)

    @property
    def stats(self) -> tuple[str, ...]:
        return tuple(r.uri for r in self.results)

    @property
    def reused(self) -> int:
        return sum(r.reused for r in self.results)

    def manifest(self, plan: Plan) -> dict:
        return {
            "stats_cache": stats_cache(plan),
            "stats": {r.task: r.uri for r in self.results},
            "features_computed": len(self.results) - self.reused,
            "features_reused": self.reused,
            "feature_seconds": {r.task: round(r.seconds, 3) for r in self.results},
            "rules": self.rules,
            "thin_layers": self.thin,
        }


def stats_cache(plan: Plan) -> str:
    return plan.config.method.stats_cache or join(plan.config.output, DEFAULT_CACHE)


def collect_features(plan: Plan, file_hashes: dict, quiet: bool) -> LotFeatures:
    """Statistics for every task, from the cache or by running its model. `file_hashes` maps each
    input file to its sha256 or to the Ray task computing it (Ray hands the value to the worker)."""
    p = plan.params
    check_model(p.model)
    options = plan.config.storage.options()
    device = plan.shards[0].device if plan.shards else "cpu"
    calls = []
    for i, (name, cp) in enumerate(zip(plan.task_names, plan.tasks)):
        spec = TaskModelSpec(p.model, cp.uri, name, p.exemplars, p.exemplar_seed,
                             p.exemplar_files[i] if p.exemplar_files else None, options)
        job = FeatureJob(spec, tuple(cp.tensors), stats_cache(plan), device)
        calls.append((job, *(file_hashes[f] for f in cp.files)))
    results = runtime.run_tasks(task_features, calls, desc="LOT features", gpu=device == "cuda", quiet=quiet)
    keys = [set(r.keys) for r in results]
    rules = dict.fromkeys(RULES, 0)
    widest = 0
    thin = {}
    for name, info in plan.base.tensors.items():
        if is_float(info.dtype):
            rule = agreed_rule(name, plan.task_names, keys)  # fails here, before the map, on disagreement
            rules[rule] += 1
            if rule == "linear":
                widest = max(widest, info.shape[1])
                rows = sum(r.linear_rows.get(name, 0) for r in results)
                if rows < THIN * info.shape[1]:
                    thin[name] = [rows, info.shape[1]]
    if thin:
        name, (rows, width) = next(iter(thin.items()))
        log.warning("LOT: %d linear layer(s) saw fewer feature rows than %d x their input width (e.g. %s: %d rows "
                    "for %d inputs, all tasks together); the solution may fit the exemplars, not the tasks: raise "
                    "method.exemplars", len(thin), THIN, name, rows, width)
    return LotFeatures(results, rules=rules, thin=thin, memory=_shard_memory(plan, widest))


def _shard_memory(plan: Plan, widest: int) -> int:
    # every task's float64 Gram of the widest linear input plus pinv and its sum, and T float32 row
    # blocks of chunk_elems with their float64 products
    t = len(plan.tasks)
    return (t + 2) * widest * widest * 8 + 4 * (t + 4) * plan.config.execution.chunk_elems * 4 + 256 * 2**20
