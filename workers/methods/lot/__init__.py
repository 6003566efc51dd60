"""LOT merging (Sun et al., arXiv 2505.23859): per layer, the closed-form merge that minimises the
drift of each task's output features on that task's own exemplars.

Before the map, each task's fine-tuned model runs on a few exemplars (one Ray task per model, GPU
when present) and its feature statistics are cached by content (features.py; the models come from
models.py). The map then solves each tensor from those statistics (solve.py, with the rule of
rules.py): linear weights over blocks of whole rows against one pinv per tensor, so a worker holds
O(T x in^2) for the Grams plus O(T x block x in).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from mergeflow.errors import CheckpointError
from mergeflow.infra.storage import join
from mergeflow.workers.dtypes import is_float
from mergeflow.workers.methods.base import Method, MethodOutput, check_scale
from mergeflow.workers.methods.lot import solve
from mergeflow.workers.methods.lot.features import ENERGY, GRAM, ROWS, FeatureJob, task_features
from mergeflow.workers.methods.lot.models import TaskModelSpec, check_model
from mergeflow.workers.methods.lot.rules import RULES, agreed_rule
from mergeflow.workers.methods.registry import register
from mergeflow.workers.safetensors_io import read_header

log = logging.getLogger(__name__)

# Least squares with fewer rows than a few times the unknowns per output fits the exemplars: on the
# digits suite (512 inputs, one row per exemplar, 8 tasks) 64 exemplars per task (1x) scored 0.23 on
# validation, 256 (4x) 0.89.
THIN = 2
DEFAULT_CACHE = ".lot_stats"  # under the output (a re-merge: its root); outlives --overwrite, keyed by content


@dataclass(frozen=True)
class LotParams:
    __pydantic_config__ = {"extra": "forbid"}
    lambda_: float | Literal["auto"] = field(
        default=1.0,
        metadata={"doc": "model = base + lambda * merged vector (the paper's 1.0); auto: chosen on validation data"},
    )
    model: str = field(
        default="",
        metadata={
            "doc": "builds each task's model and exemplars: hf (transformers, from config.json) or module:function"
        },
    )
    exemplars: int = field(default=64, metadata={"doc": "exemplars per task for the feature statistics"})
    exemplar_seed: int = field(default=0, metadata={"doc": "which exemplars, when more are available"})
    exemplar_files: dict[str, str] | None = field(
        default=None, metadata={"doc": "hf: a JSON file of token-id lists per task"}
    )
    stats_cache: str | None = field(
        default=None,
        metadata={
            "doc": "where feature statistics are cached by content (default OUTPUT/.lot_stats): share it across runs"
        },
    )

    def __post_init__(self):
        check_scale("lambda", self.lambda_)
        if self.exemplars < 1:
            raise ValueError(f"exemplars: must be >= 1, got {self.exemplars}")
        if not self.model:
            raise ValueError("model: LOT runs each task's model on its exemplars; give hf or module:function")


@dataclass
class Features:
    """The feature stage's result, for the map (statistics files), Ray (memory) and the manifest."""

    results: list  # FeatureResult, task order
    rules: dict[str, int]
    thin: dict[str, list[int]]
    memory: int
    cache: str


@register
class Lot(Method):
    name = "lot"
    summary = "LOT: per layer, the closed-form merge that minimises feature drift on each task's exemplars"
    Params = LotParams
    scale = "lambda_"
    whole_tensors = True
    path_params = ("exemplar_files", "stats_cache")

    def check(self, params, task_names):
        if params.model == "hf":
            files = params.exemplar_files or {}
            missing = sorted(set(task_names) - set(files))
            if missing:
                raise ValueError(
                    f"exemplar_files: no token-id file for task {missing[0]!r} (model hf needs one per task)"
                )
            unknown = sorted(set(files) - set(task_names))
            if unknown:
                raise ValueError(f"exemplar_files: names unknown task {unknown[0]!r}")

    # ------------------------------------------------------------------ driver side

    def before_map(self, run) -> None:
        features = collect_features(run)
        run.notes["lot"] = features
        run.globals["lot_stats"] = tuple(r.uri for r in features.results)

    def memory(self, run) -> int | None:
        return run.notes["lot"].memory

    def manifest(self, run, results) -> dict:
        f: Features = run.notes["lot"]
        reused = sum(r.reused for r in f.results)
        return {
            "lot": {
                "stats_cache": f.cache,
                "stats": {r.task: r.uri for r in f.results},
                "features_computed": len(f.results) - reused,
                "features_reused": reused,
                "feature_seconds": {r.task: round(r.seconds, 3) for r in f.results},
                "rules": f.rules,
                "thin_layers": f.thin,
            }
        }

    def describe(self, manifest: dict) -> list[str]:
        lot = manifest.get("lot")
        if not lot:
            return []
        rules = ", ".join(f"{k} {v}" for k, v in lot["rules"].items() if v)
        lines = [
            f"LOT         features of {len(lot['stats'])} task(s): {lot['features_computed']} computed, "
            f"{lot['features_reused']} reused from {lot['stats_cache']}; tensors per rule: {rules}"
        ]
        if lot.get("thin_layers"):
            lines.append(
                f"  warning: {len(lot['thin_layers'])} linear layer(s) saw fewer feature rows than twice their "
                "input width (manifest lot.thin_layers); raise method.exemplars"
            )
        return lines

    # ------------------------------------------------------------------ worker side

    def open_shard(self, spec):
        headers = [read_header(uri, spec.storage).tensors for uri in spec.globals["lot_stats"]]
        return headers, [set(h) for h in headers]

    def tensor_kernel(self, access, params, ctx):
        headers, keys = ctx.shard
        rule = agreed_rule(ctx.tensor, ctx.task_names, keys)
        for lo, hi, base, delta, taus in _solve(access, rule, headers):
            # LOT's norms are exact float64 sums (the engine's are blockwise float32): kept as they were
            yield (
                lo,
                hi,
                base,
                taus,
                MethodOutput(delta=delta.to(torch.float32), tau_sq=(taus.double() ** 2).sum(dim=1).cpu().numpy()),
            )


def _stat(access, info, device: torch.device) -> torch.Tensor:
    return access.elements(info).to(device).to(torch.float64).reshape(info.shape)


def _solve(access, rule: str, headers: list[dict]):
    """Yield (lo, hi, base, delta*, taus) over the tensor's flattened elements."""
    job, tasks, device = access.job, access.spec.task_names, access.device
    if rule == "linear":
        if len(job.shape) != 2:
            raise CheckpointError(
                f"tensor {job.name!r}: LOT has an input Gram for it but it is not 2-D {list(job.shape)}"
            )
        width = job.shape[1]
        infos = [h[GRAM + job.name] for h in headers]
        _check_shape(job, tasks, infos, (width, width), "input Gram")
        grams = [_stat(access, i, device) for i in infos]
        pinv = solve.gram_pinv(grams)
        for lo, hi, base, taus in access.row_chunks():  # a row block's solution needs only its own rows
            blocks = [row.view(-1, width) for row in taus]
            yield lo, hi, base, solve.linear_rows(blocks, grams, pinv).reshape(-1), taus
        return
    if rule == "norm_scale":
        infos = [h[ENERGY + job.name] for h in headers]
        _check_shape(job, tasks, infos, (job.numel,), "channel energy")
        energies = torch.stack([_stat(access, i, device) for i in infos])
        for lo, hi, base, taus in access.chunks():
            yield lo, hi, base, solve.norm_scale_delta(taus, energies[:, lo:hi]), taus
        return
    if rule == "additive":
        rows = [float(_stat(access, h[ROWS + job.name], device)[0]) for h in headers]
        for lo, hi, base, taus in access.chunks():
            yield lo, hi, base, solve.additive_delta(taus, rows), taus
        return
    for lo, hi, base, taus in access.chunks():
        yield lo, hi, base, solve.mean_delta(taus), taus


def _check_shape(job, tasks, infos, shape: tuple[int, ...], what: str) -> None:
    for task, info in zip(tasks, infos):
        if tuple(info.shape) != shape:
            raise CheckpointError(
                f"task {task!r}: LOT {what} for tensor {job.name!r} has shape {list(info.shape)}, "
                f"expected {list(shape)} for a tensor of shape {list(job.shape)}"
            )


# ------------------------------------------------------------------------ the feature stage


def collect_features(run) -> Features:
    """Statistics for every task, from the cache or by running its model."""
    p = run.params
    check_model(p.model)
    cache = p.stats_cache or join(run.cache_root, DEFAULT_CACHE)
    plan = run.plan
    file_hashes = run.input_hashes()  # sha256, or the Ray task computing it (Ray hands the value over)
    calls = []
    for name, cp in zip(run.task_names, plan.tasks):
        if cp.adapter is not None:  # the task model would be the adapter's tensors, not base + B @ A
            raise CheckpointError(
                f"task {name!r}: {cp.uri} is a LoRA adapter; {run.method.name} runs each task's full model "
                "on its exemplars, so give it the merged checkpoint (PEFT's merge_and_unload) or pick "
                "another method"
            )
        exemplar_file = (p.exemplar_files or {}).get(name)
        spec = TaskModelSpec(p.model, cp.uri, name, p.exemplars, p.exemplar_seed, exemplar_file, run.storage)
        job = FeatureJob(spec, tuple(cp.tensors), cache, run.device)
        calls.append((job, *(file_hashes[f] for f in cp.files)))
    results = run.map(task_features, calls, desc="LOT features", gpu=run.device == "cuda")
    keys = [set(r.keys) for r in results]
    rules = dict.fromkeys(RULES, 0)
    widest = 0
    thin = {}
    for name, info in plan.base.tensors.items():
        if is_float(info.dtype):
            rule = agreed_rule(name, run.task_names, keys)  # fails here, before the map, on disagreement
            rules[rule] += 1
            if rule == "linear":
                widest = max(widest, info.shape[1])
                rows = sum(r.linear_rows.get(name, 0) for r in results)
                if rows < THIN * info.shape[1]:
                    thin[name] = [rows, info.shape[1]]
    if thin:
        name, (rows, width) = next(iter(thin.items()))
        log.warning(
            "LOT: %d linear layer(s) saw fewer feature rows than %d x their input width (e.g. %s: %d rows "
            "for %d inputs, all tasks together); the solution may fit the exemplars, not the tasks: raise "
            "method.exemplars",
            len(thin),
            THIN,
            name,
            rows,
            width,
        )
    # every task's float64 Gram of the widest linear input plus pinv and its sum, and T float32 row
    # blocks of chunk_elems with their float64 products
    t = len(run.task_names)
    chunk = plan.config.execution.chunk_elems
    memory = (t + 2) * widest * widest * 8 + 4 * (t + 4) * chunk * 4 + 256 * 2**20
    return Features(results, rules, thin, memory, cache)
