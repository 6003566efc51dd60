"""Task Singular Vectors (Gargiulo et al. 2025, arXiv 2412.00081; official code
AntoAndGar/task_singular_vectors @ a6c97188, src/utils/TSVM_utils.py and TSVC_utils.py).

TSV-M (`tsv_merge`), per 2-D tensor (the rule of _svd.py) of shape m x n, r = min(m, n), k = r // T:
    tau_t = U_t diag(s_t) V_t^T (thin SVD, float64); keep each task's top-k triplets;
    U^ = [U_1,k | ... | U_T,k], s^ = [s_1,k, ..., s_T,k], V^ = [V_1,k | ... | V_T,k];
    delta = polar(U^) diag(s^) polar(V^)^T (polar: the orthogonal polar factor, see _svd.py).
Every other float tensor: the mean of the task vectors. model = theta_0 + alpha * delta.

TSV-C (`tsv_compress`): a bundle with, per task and per SVD tensor, the rank-k truncation
U_k diag(s_k) V_k^T of tau_t (the same top-k triplets), every other float tensor's tau_t dense;
`mergeflow reconstruct` rebuilds theta_0 + U_k diag(s_k) V_k^T (the official alpha 1.0). Its model/
holds the TSV-M merge of the same tensors (alpha), so one run gives the merged model and the bundle.

    compressed/tsv_c/<task>/factors-<part>.safetensors   per float tensor of the part, in model order:
        an SVD tensor (m, n) of rank k as one (m + 1 + n, k) tensor: rows [0, m) U_k, row m s_k,
        rows [m + 1, m + 1 + n) V_k (V_k^T transposed); any other tensor: tau_t, its own shape
    compressed/index.json                                format mergeflow.tsv_c/1: tasks, files, tensors
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

import torch

from mergeflow.errors import CheckpointError
from mergeflow.infra.storage import StorageOptions, join
from mergeflow.workers.dtypes import TORCH_DTYPES, is_float
from mergeflow.workers.methods._svd import (
    DEFAULT_EXCLUDE,
    EXCLUDE_DOC,
    LM_VOCAB,
    SvdMethod,
    check_pattern,
    cutoff,
    kept,
    polar,
    takes_svd,
    thin_svd,
)
from mergeflow.workers.methods.base import check_scale
from mergeflow.workers.methods.registry import register
from mergeflow.workers.reading import ShardReader, chunk_ranges
from mergeflow.workers.safetensors_io import StreamingWriter, TensorInfo, read_header

INDEX = "compressed/index.json"
FORMAT = "mergeflow.tsv_c/1"


def rank_per_task(shape: tuple[int, ...], tasks: int) -> int:
    """k = r // T, r = min(m, n). The official int(r * (1 / T)) is the same for every T < 49, r < 20000
    (at T = 49 and multiples of it, float rounding makes it one less)."""
    return min(shape) // tasks


# ------------------------------------------------------------------------------- the formulas


def task_factors(taus: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], float]:
    """Each task's top-k triplets (U_k (m x k), s_k (k,), Vh_k (k x n), float64) and the largest
    singular value over all tasks. One task's float64 SVD at a time."""
    t, m, n = taus.shape
    k = rank_per_task((m, n), t)
    factors, smax = [], 0.0
    for row in taus:
        u, s, vh = thin_svd(row.double())
        smax = max(smax, float(s[0]))
        factors.append((u[:, :k].clone(), s[:k].clone(), vh[:k].clone()))
        del u, s, vh
    return factors, smax


def tsv_merge_delta(factors: list, smax: float, m: int, n: int) -> torch.Tensor:
    """delta = polar(U^) diag(s^) polar(Vh^) (float64), triplets with s at or below the cut-off left out."""
    thr = cutoff(m, n, smax)
    keep = [kept(s, thr) for _, s, _ in factors]
    if not sum(keep):
        return torch.zeros((m, n), dtype=torch.float64, device=factors[0][1].device)
    u = torch.cat([u[:, :q] for (u, _, _), q in zip(factors, keep)], dim=1)
    s = torch.cat([s[:q] for (_, s, _), q in zip(factors, keep)])
    vh = torch.cat([vh[:q] for (_, _, vh), q in zip(factors, keep)], dim=0)
    return (polar(u) * s) @ polar(vh)


def tsv_merge(taus: torch.Tensor) -> torch.Tensor:
    """TSV-M of one 2-D tensor from its task vectors (T, m, n): float64 delta (m, n)."""
    factors, smax = task_factors(taus)
    return tsv_merge_delta(factors, smax, *taus.shape[1:])


def packed_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """The bundle's (m + 1 + n, k) tensor of one task: U_k, then s_k, then V_k."""
    return torch.cat([u, s[None, :], vh.T], dim=0)


# ------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class TsvMergeParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = field(
        default=1.0,
        metadata={
            "doc": "model = base + alpha * delta, the mean tensors included (official code: swept over 0.1..3.0 "
            "on validation); 1.0 keeps each task's own top singular values as they are; auto: chosen on validation data"
        },
    )
    svd_exclude: str = field(default=DEFAULT_EXCLUDE, metadata={"doc": EXCLUDE_DOC})

    def __post_init__(self):
        check_scale("alpha", self.alpha)
        check_pattern("svd_exclude", self.svd_exclude)


@dataclass(frozen=True)
class TsvCompressParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = field(
        default=1.0,
        metadata={
            "doc": "model/ = base + alpha * the TSV-M delta of the same tensors (each task's rebuild from "
            "compressed/ uses 1.0, as the official TSV-C); auto: chosen on validation data"
        },
    )
    svd_exclude: str = field(
        default=LM_VOCAB,
        metadata={
            "doc": "regular expression (re.search on the tensor name) of 2-D tensors kept dense in the bundle "
            "(and merged as the mean in model/) instead of by SVD; '' excludes none. Default: LLM vocabulary "
            "embeddings / lm_head (the official TSV-C factors every 2-D tensor, text_projection included)"
        },
    )
    store_dtype: Literal["float32", "base"] = field(
        default="float32",
        metadata={"doc": "dtype of the bundle's factors and dense task vectors: float32, or the base's"},
    )

    def __post_init__(self):
        check_scale("alpha", self.alpha)
        check_pattern("svd_exclude", self.svd_exclude)


# ------------------------------------------------------------------------------- the bundle


def factors_key(task: str) -> str:
    return f"factors/{task}"


def factors_file(part: str, task: str) -> str:
    return f"compressed/tsv_c/{task}/factors-{part}.safetensors"


def bundle_entry(job, params, tasks: int) -> tuple[tuple[int, ...], int | None]:
    """(stored shape, rank or None when the tensor is stored dense)."""
    if takes_svd(job.name, job.shape, params.svd_exclude):
        m, n = job.shape
        k = rank_per_task(job.shape, tasks)
        return (m + 1 + n, k), k
    return job.shape, None


def shard_files(spec) -> dict[str, tuple[str, list]]:
    t = len(spec.task_names)
    floats = [j for j in spec.tensors if j.is_float]
    store = lambda j: "F32" if spec.params.store_dtype == "float32" else j.dtype  # noqa: E731
    entries = [(j.name, store(j), bundle_entry(j, spec.params, t)[0]) for j in floats]
    return {factors_key(task): (factors_file(spec.part, task), entries) for task in spec.task_names}


def index_doc(run) -> bytes:
    t = len(run.task_names)
    tensors = {}
    for spec in run.shards:
        for job in spec.tensors:
            if job.is_float:
                stored, k = bundle_entry(job, run.params, t)
                tensors[job.name] = {"part": spec.part, "dtype": job.dtype, "shape": list(job.shape)}
                tensors[job.name] |= {"factored": True, "rank": k} if k is not None else {"factored": False}
    doc = {
        "format": FORMAT,
        "tasks": list(run.task_names),
        "files": {task: [factors_file(s.part, task) for s in run.shards] for task in run.task_names},
        "store_dtype": run.params.store_dtype,
        "svd_exclude": run.params.svd_exclude,
        "layout": (
            "factored tensor (m, n) of rank k: one (m + 1 + n, k) tensor, rows [0, m) U_k, row m the singular "
            "values s_k, rows [m + 1, m + 1 + n) V_k; other float tensors: tau_t in their own shape"
        ),
        "rebuild": "theta_t = theta_0 + U_k diag(s_k) V_k^T (factored) or theta_0 + tau_t (dense), float32 sum",
        "tensors": tensors,
    }
    return json.dumps(doc, indent=1).encode()


@dataclass(frozen=True)
class TsvRebuildSpec:
    task: str
    base: tuple[TensorInfo, ...]  # every tensor of this part, in output order
    factors_file: str | None  # None when the part has no float tensors
    ranks: dict[str, int]  # factored tensors: their rank k
    expected: dict[str, str]  # bundle file URI -> sha256 from the manifest
    output: str
    chunk_elems: int
    storage: StorageOptions = StorageOptions()


def rebuild_specs(run, manifest, task, parts, base, output, options, chunk_elems, model_order) -> list:
    from mergeflow.workers.methods.tall_masks.bundle import verified_bytes

    expect = manifest["outputs"]
    index = json.loads(verified_bytes(run, INDEX, expect, options))
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{join(run, INDEX)}: not a TSV-C bundle index ({index.get('format')!r})")
    specs = []
    for part, names in sorted(parts.items()):
        rel = factors_file(part, task)
        info = {n: index["tensors"][n] for n in names if n in index["tensors"]}
        if info and rel not in expect:
            raise CheckpointError(f"{run}: {rel} is not listed in manifest.json")
        specs.append(
            TsvRebuildSpec(
                task=task,
                base=tuple(base.tensors[n] for n in model_order(part, names)),
                factors_file=join(run, rel) if info else None,
                ranks={n: int(i["rank"]) for n, i in info.items() if i["factored"]},
                expected={join(run, rel): expect[rel]["sha256"]} if info else {},
                output=join(output, f"model-{part}.safetensors"),
                chunk_elems=chunk_elems,
                storage=options,
            )
        )
    return specs


def rebuild_part(spec: TsvRebuildSpec) -> tuple[str, int]:
    """theta_0 + U_k diag(s_k) V_k^T (float64 product, rounded to float32, then the engine's float32
    sum with the base) by blocks of rows; dense tensors theta_0 + tau_t by chunks."""
    from mergeflow.workers.methods.tall_masks.bundle import verify
    from mergeflow.workers.shard import apply_scale, to_bytes

    for uri, sha in spec.expected.items():
        verify(uri, sha, spec.storage)
    stored = read_header(spec.factors_file, spec.storage).tensors if spec.factors_file else {}
    entries = [(b.name, b.dtype, b.shape) for b in spec.base]
    with ExitStack() as files:
        reader = ShardReader(spec.storage, files)
        writer = StreamingWriter(spec.output, entries, spec.storage)
        try:
            for b in spec.base:
                f = stored.get(b.name)
                dtype = TORCH_DTYPES[b.dtype]
                if f is None:
                    if is_float(b.dtype) and spec.factors_file:
                        raise CheckpointError(f"{spec.factors_file}: no entry for tensor {b.name!r}")
                    for lo, hi in chunk_ranges(b.numel, spec.chunk_elems):
                        writer.write(b.name, reader.elements(b, lo, hi).numpy().tobytes())
                    continue
                if b.name in spec.ranks:
                    m, n = b.shape
                    k = spec.ranks[b.name]
                    if f.shape != (m + 1 + n, k):
                        raise CheckpointError(f"{spec.factors_file}: tensor {b.name!r} does not match the base")
                    s = reader.elements(f, m * k, (m + 1) * k).double()
                    v = reader.elements(f, (m + 1) * k, (m + 1 + n) * k).double().view(n, k) if k else None
                    rows = max(1, spec.chunk_elems // max(n, 1))
                    for a in range(0, m, rows):
                        z = min(m, a + rows)
                        base = reader.elements(b, a * n, z * n).float()
                        if k:
                            u = reader.elements(f, a * k, z * k).double().view(z - a, k)
                            delta = ((u * s) @ v.T).to(torch.float32).reshape(-1)
                        else:
                            delta = torch.zeros_like(base)
                        writer.write(b.name, to_bytes(apply_scale(base, delta, 1.0, dtype)))
                    continue
                if f.numel != b.numel:
                    raise CheckpointError(f"{spec.factors_file}: tensor {b.name!r} does not match the base")
                for lo, hi in chunk_ranges(b.numel, spec.chunk_elems):
                    base = reader.elements(b, lo, hi).float()
                    tau = reader.elements(f, lo, hi).float()
                    writer.write(b.name, to_bytes(apply_scale(base, tau, 1.0, dtype)))
            sha = writer.commit()
        except BaseException:
            writer.abort()
            raise
    return sha, writer.bytes_written


# ------------------------------------------------------------------------------- methods


@register
class TsvMerge(SvdMethod):
    name = "tsv_merge"
    summary = "TSV-M: each task's top 1/T singular triplets per 2-D tensor, orthogonalised (Gargiulo et al. 2025)"
    Params = TsvMergeParams

    def svd_delta(self, taus, params, ctx):
        return tsv_merge(taus).to(torch.float32), {}


@register
class TsvCompress(TsvMerge):
    name = "tsv_compress"
    summary = "TSV-C: a bundle of each task's rank-1/T factors per 2-D tensor; model/ holds the TSV-M merge"
    Params = TsvCompressParams
    compresses = True

    def _store(self, params, ctx) -> torch.dtype:
        return torch.float32 if params.store_dtype == "float32" else TORCH_DTYPES[ctx.dtype]

    def svd_delta(self, taus, params, ctx):
        factors, smax = task_factors(taus)
        store = self._store(params, ctx)
        files = {
            factors_key(task): packed_factors(*f).to(store) for task, f in zip(ctx.task_names, factors, strict=True)
        }
        return tsv_merge_delta(factors, smax, *taus.shape[1:]).to(torch.float32), files

    def mean_files(self, taus, params, ctx):
        store = self._store(params, ctx)
        return {factors_key(task): row.to(store) for task, row in zip(ctx.task_names, taus, strict=True)}

    def shard_files(self, spec):
        return shard_files(spec)

    def run_files(self, run, results):
        return {INDEX: index_doc(run)}

    def rebuild_specs(self, run, manifest, task, parts, base, output, options, chunk_elems, model_order):
        return rebuild_specs(run, manifest, task, parts, base, output, options, chunk_elems, model_order)

    rebuild_part = staticmethod(rebuild_part)  # a plain function: Ray ships it by reference
