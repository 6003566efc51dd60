"""EMR-Merging (Huang et al. 2024, arXiv 2405.17461): one unified task vector, one bit-mask and one
rescaler per task; each task rebuilds as theta_0 + lambda_t * M_t * tau_uni.

Per weight (docs/methods.md, "EMR-Merging"):
- elect:   flag = +1 where the mean task vector is > 0, else -1 (a mean of exactly 0 elects -1)
- masks:   M_t = tau_t * flag > 0 (a zero tau_t is never in a mask)
- unified: tau_uni = flag * max_t |M_t * tau_t| (0 where no task agrees with the elected sign)
- rescale: lambda_t = sum_n mean|tau_t[n]| / sum_n mean|M_t[n] * tau_uni[n]| over the model's tensors n
  (`rescale_mode: code`, the official code: every tensor weighs 1/numel), or the plain sums over all
  weights (`paper`).

The first three are element-wise (one chunk kernel); the rescalers need whole-model sums, which the
kernel reduces in the map: per tensor, exact integer sums of |tau_t| and |M_t * tau_uni| (MethodOutput.sums),
so the rescalers do not depend on how tensors are chunked or sharded. They go into the bundle's index at
commit. model/ holds theta_0 + alpha * tau_uni for users who need one model (EMR itself has no alpha;
1.0 is tau_uni as it is).

    compressed/tau_uni-<part>.safetensors              tau_uni, unscaled (the base dtype, or float32)
    compressed/masks/<task>/masks-<part>.safetensors   one uint8 tensor per weight tensor, np.packbits order
    compressed/index.json                              format mergeflow.emr/1: tasks, rescalers, files, tensors
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import numpy as np
import torch

from mergeflow.errors import CheckpointError
from mergeflow.infra.storage import StorageOptions, join
from mergeflow.workers.bits import pack_rows, row_counts, unpack
from mergeflow.workers.dtypes import TORCH_DTYPES
from mergeflow.workers.methods.base import Method, MethodOutput, check_scale, running_sum
from mergeflow.workers.methods.registry import register
from mergeflow.workers.methods.tall_masks import bundle as tall_bundle
from mergeflow.workers.methods.tall_masks import mask_counts
from mergeflow.workers.reading import ShardReader, chunk_ranges
from mergeflow.workers.safetensors_io import TensorInfo, read_header

INDEX = "compressed/index.json"
FORMAT = "mergeflow.emr/1"
TAU_SUM = "emr.abs_tau/"  # + tensor name: per task, sum |tau_t| in units of 2^-150 (exact integers)
UNI_SUM = "emr.abs_uni/"  # + tensor name: per task, sum |M_t * tau_uni| in the same units


@dataclass(frozen=True)
class EmrParams:
    __pydantic_config__ = {"extra": "forbid"}
    alpha: float | Literal["auto"] = field(
        default=1.0,
        metadata={
            "doc": "model/ = base + alpha * tau_uni (EMR itself has no alpha: 1.0 is tau_uni as it is; "
            "each task's rebuild uses its own rescaler); auto: chosen on validation data"
        },
    )
    rescale_mode: Literal["code", "paper"] = field(
        default="code",
        metadata={
            "doc": "rescalers: code = sums over tensors of per-tensor mean magnitudes (the official code, "
            "the paper's numbers); paper = sums over all weights"
        },
    )
    store_dtype: Literal["base", "float32"] = field(
        default="base",
        metadata={
            "doc": "dtype of tau_uni in compressed/: the base's, or float32 (rebuilds exactly what the rescalers saw)"
        },
    )

    def __post_init__(self):
        check_scale("alpha", self.alpha)


# ------------------------------------------------------------------------------ the formulas


def emr_chunk(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masks (T, n) bool, |tau_uni| (n,), tau_uni (n,)) of one chunk of task vectors (T, n) float32.

    The elected sign is that of the in-order float32 sum over tasks (the mean's sign); a sum of
    exactly 0 elects -1, as `(mean > 0) * 2 - 1` does in the official code. With flagged = tau_t * flag,
    M_t = flagged > 0 and |M_t * tau_t| = max(flagged, 0), so max_t |M_t * tau_t| = max(max_t flagged, 0)."""
    flag = torch.where(running_sum(taus) > 0, 1.0, -1.0)
    flagged = taus * flag
    masks = flagged > 0
    mag = flagged.amax(dim=0).clamp_(min=0.0).add_(0.0)  # + 0.0: no -0.0 where no task agrees
    tau_uni = torch.mul(mag, flag).add_(0.0)
    return masks, mag, tau_uni


# Exact sums of float32 magnitudes. A float32 |x| with exponent field e is an integer multiple of
# 2^(e - 150) below 2^(e - 126); grouping e by 4 (bits >> 25: 64 groups), every value of group g is an
# integer multiple of u_g = 2^(4g - 150) below 2^27 u_g, so float64 sums of up to 2^26 of them are exact
# (in any order: bincount, CPU or GPU). Scaled by 2^150 they are integers, added in Python.
_GROUP_SHIFT, _GROUPS, _EXACT_N = 25, 64, 1 << 26
_UNIT_EXP = 150  # sums are integers in units of 2^-150


def _groups_to_int(per_group: list[float]) -> int:
    return sum(int(math.ldexp(v, _UNIT_EXP)) for v in per_group if v)


def _pieces(x: torch.Tensor):
    """(lo, hi, groups int32, |x| float64) over pieces of at most 2^26 elements of a float32 vector."""
    for lo in range(0, x.numel(), _EXACT_N):
        bits = x[lo : lo + _EXACT_N].contiguous().view(torch.int32) & 0x7FFFFFFF
        yield lo, lo + bits.numel(), bits >> _GROUP_SHIFT, bits.view(torch.float32).double()


def exact_abs_sum(x: torch.Tensor) -> int:
    """sum |x| of a float32 vector, exactly, as an integer count of 2^-150: chunk and shard sums add
    up to the same number whatever the split (float sums would not)."""
    return sum(
        _groups_to_int(torch.bincount(g, weights=w, minlength=_GROUPS).cpu().tolist()) for *_, g, w in _pieces(x)
    )


def exact_masked_sums(x: torch.Tensor, masks: torch.Tensor) -> list[int]:
    """Per row t of masks (T, n) bool, sum |x| over masks[t], exactly (as exact_abs_sum)."""
    totals = [0] * masks.shape[0]
    for lo, hi, g, w in _pieces(x):
        for t in range(masks.shape[0]):  # kept values go to groups [64, 128), the others to [0, 64)
            keyed = torch.bitwise_or(g, masks[t, lo:hi].to(torch.int32) << 6)
            per_group = torch.bincount(keyed, weights=w, minlength=2 * _GROUPS)[_GROUPS:]
            totals[t] += _groups_to_int(per_group.cpu().tolist())
    return totals


def rescale_sums(taus: torch.Tensor, masks: torch.Tensor, mag: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per task, the exact sum |tau_t| and sum |M_t * tau_uni| of a chunk (object arrays of Python ints)."""
    a = np.array([exact_abs_sum(taus[i]) for i in range(taus.shape[0])], dtype=object)
    return a, np.array(exact_masked_sums(mag, masks), dtype=object)


def rescalers_from_sums(
    sums: dict[str, list[list[int]]], numel: dict[str, int], tasks: tuple[str, ...], mode: str
) -> tuple[dict[str, float], list[str]]:
    """({task: lambda_t}, tasks with an empty mask) from per-tensor sums (TAU_SUM/UNI_SUM keys, each a
    list of per-shard per-task integers). Exact rational arithmetic, one rounding to float at the end.

    A task whose mask is empty (no weight agrees with the elected sign) gets 0.0: the official code
    divides by zero there (inf or nan, and so NaN weights); any value rebuilds theta_0."""
    t = len(tasks)
    num, den = [Fraction(0)] * t, [Fraction(0)] * t
    for key, parts in sums.items():
        if key.startswith(TAU_SUM):
            name, into = key[len(TAU_SUM) :], num
        elif key.startswith(UNI_SUM):
            name, into = key[len(UNI_SUM) :], den
        else:
            continue
        weight = Fraction(1, numel[name]) if mode == "code" else Fraction(1)
        for part in parts:
            for i in range(t):
                into[i] += int(part[i]) * weight
    lambdas, empty = {}, []
    for i, task in enumerate(tasks):
        if den[i] == 0:
            lambdas[task] = 0.0
            empty.append(task)
        else:
            lambdas[task] = float(num[i] / den[i])
    return lambdas, empty


# ------------------------------------------------------------------------------ bundle files


def tau_file(part: str) -> str:
    return f"compressed/tau_uni-{part}.safetensors"


def mask_file(part: str, task: str) -> str:
    return tall_bundle.mask_file(part, task)  # TALL's layout: compressed/masks/<task>/masks-<part>


def shard_files(spec) -> dict[str, tuple[str, list]]:
    floats = [j for j in spec.tensors if j.is_float]
    store = lambda j: "F32" if spec.params.store_dtype == "float32" else j.dtype  # noqa: E731
    files = {"tau": (tau_file(spec.part), [(j.name, store(j), j.shape) for j in floats])}
    packed = [(j.name, "U8", ((j.numel + 7) // 8,)) for j in floats]
    for task in spec.task_names:
        files[f"mask/{task}"] = (mask_file(spec.part, task), packed)
    return files


def run_rescalers(run, results: list) -> tuple[dict[str, float], list[str]]:
    numel = {j.name: j.numel for s in run.shards for j in s.tensors if j.is_float}
    sums: dict[str, list] = {}
    for r in results:  # a resumed run's journaled shards carry lists, fresh ones object arrays
        for key, value in r.sums.items():
            sums.setdefault(key, []).append(list(value))
    return rescalers_from_sums(sums, numel, run.task_names, run.params.rescale_mode)


def index_doc(run, lambdas: dict[str, float]) -> bytes:
    tensors = {}
    for spec in run.shards:
        for job in spec.tensors:
            if job.is_float:
                tensors[job.name] = {"part": spec.part, "dtype": job.dtype, "shape": list(job.shape)}
    doc = {
        "format": FORMAT,
        "tasks": list(run.task_names),
        "rescale_mode": run.params.rescale_mode,
        "rescalers": lambdas,
        "rebuild": "theta_t = theta_0 + rescalers[t] * masks[t] * tau_uni (float32, cast to the tensor's dtype)",
        "tau_uni": {"files": [tau_file(s.part) for s in run.shards], "dtype": run.params.store_dtype},
        "masks": {t: [mask_file(s.part, t) for s in run.shards] for t in run.task_names},
        "mask_order": "np.packbits (first element in the most significant bit), count = numel",
        "tensors": tensors,
    }
    return json.dumps(doc, indent=1).encode()


# ------------------------------------------------------------------------------- rebuild


@dataclass(frozen=True)
class EmrRebuildSpec:
    task: str
    rescaler: float
    base: tuple[TensorInfo, ...]  # every tensor of this part, in output order
    tau_file: str | None  # None when the part has no float tensors
    mask_file: str | None
    expected: dict[str, str]  # bundle file URI -> sha256 from the manifest
    output: str  # output file URI
    chunk_elems: int
    storage: StorageOptions = StorageOptions()


def rebuild_specs(run, manifest, task, parts, base, output, options, chunk_elems, model_order) -> list:
    expect = manifest["outputs"]
    index = json.loads(tall_bundle.verified_bytes(run, INDEX, expect, options))
    if index.get("format") != FORMAT or task not in index.get("rescalers", {}):
        raise CheckpointError(f"{join(run, INDEX)}: not an EMR bundle index with a rescaler for task {task!r}")
    chunk = max(8, chunk_elems - chunk_elems % 8)  # whole mask bytes per chunk
    specs = []
    for part, tensors in sorted(parts.items()):
        tau_rel, mask_rel = tau_file(part), mask_file(part, task)
        has_float = any(n in index["tensors"] for n in tensors)
        for rel in (tau_rel, mask_rel) if has_float else ():
            if rel not in expect:
                raise CheckpointError(f"{run}: {rel} is not listed in manifest.json")
        specs.append(
            EmrRebuildSpec(
                task=task,
                rescaler=float(index["rescalers"][task]),
                base=tuple(base.tensors[n] for n in model_order(part, tensors)),
                tau_file=join(run, tau_rel) if has_float else None,
                mask_file=join(run, mask_rel) if has_float else None,
                expected={join(run, r): expect[r]["sha256"] for r in (tau_rel, mask_rel) if has_float},
                output=join(output, f"model-{part}.safetensors"),
                chunk_elems=chunk,
                storage=options,
            )
        )
    return specs


def rebuild_part(spec: EmrRebuildSpec) -> tuple[str, int]:
    """theta_0 + lambda_t * M_t * tau_uni for one part, streamed by chunks; bundle files are checked
    against their recorded sha256 before their bytes are trusted."""
    from mergeflow.workers.safetensors_io import StreamingWriter
    from mergeflow.workers.shard import apply_scale, to_bytes

    for uri, sha in spec.expected.items():
        tall_bundle.verify(uri, sha, spec.storage)
    tau = read_header(spec.tau_file, spec.storage).tensors if spec.tau_file else {}
    masks = read_header(spec.mask_file, spec.storage).tensors if spec.mask_file else {}
    entries = [(b.name, b.dtype, b.shape) for b in spec.base]
    with ExitStack() as files:
        reader = ShardReader(spec.storage, files)
        writer = StreamingWriter(spec.output, entries, spec.storage)
        try:
            for b in spec.base:
                if b.name not in tau:
                    for lo, hi in chunk_ranges(b.numel, spec.chunk_elems):
                        writer.write(b.name, reader.elements(b, lo, hi).numpy().tobytes())
                    continue
                t, m = tau[b.name], masks.get(b.name)
                if m is None or t.numel != b.numel:
                    raise CheckpointError(f"{spec.tau_file}: tensor {b.name!r} does not match the base checkpoint")
                for lo, hi in chunk_ranges(b.numel, spec.chunk_elems):
                    base = reader.elements(b, lo, hi).float()
                    uni = reader.elements(t, lo, hi).float()
                    bits = unpack(reader.elements(m, lo // 8, (hi + 7) // 8), hi - lo)
                    masked = torch.where(bits, uni, torch.zeros((), dtype=uni.dtype))
                    writer.write(b.name, to_bytes(apply_scale(base, masked, spec.rescaler, TORCH_DTYPES[b.dtype])))
            sha = writer.commit()
        except BaseException:
            writer.abort()
            raise
    return sha, writer.bytes_written


# ------------------------------------------------------------------------------- the method


@register
class Emr(Method):
    name = "emr"
    summary = (
        "EMR-Merging: unified task vector plus one mask and one rescaler per task; model/ = base + alpha * tau_uni"
    )
    Params = EmrParams
    compresses = True

    def kernel(self, taus, params, ctx) -> MethodOutput:
        masks, mag, tau_uni = emr_chunk(taus)
        store = torch.float32 if params.store_dtype == "float32" else TORCH_DTYPES[ctx.dtype]
        packed = pack_rows(masks).cpu()
        files = {"tau": tau_uni.to(store)} | {f"mask/{task}": packed[row] for row, task in enumerate(ctx.task_names)}
        a, b = rescale_sums(taus, masks, mag)
        layer_sums = {
            "kept": row_counts(masks, packed),
            "count_hist": torch.bincount(mask_counts(masks).reshape(-1), minlength=taus.shape[0] + 1)
            .cpu()
            .numpy()
            .astype(np.int64),
        }
        return MethodOutput(
            delta=tau_uni, files=files, sums={TAU_SUM + ctx.tensor: a, UNI_SUM + ctx.tensor: b}, layer_sums=layer_sums
        )

    def shard_files(self, spec):
        return shard_files(spec)

    def run_files(self, run, results):
        lambdas, _ = run_rescalers(run, results)
        return {INDEX: index_doc(run, lambdas)}

    def manifest(self, run, results):
        lambdas, empty = run_rescalers(run, results)
        return {"emr": {"rescale_mode": run.params.rescale_mode, "rescalers": lambdas, "empty_masks": empty}}

    def describe(self, manifest: dict) -> list[str]:
        emr, s = manifest.get("emr"), manifest.get("summary", {})
        if not emr:
            return []
        lines = [f"rescalers ({emr['rescale_mode']} mode) and mask density per task:"]
        for task, lam in emr["rescalers"].items():
            density = s.get("mask_density", {}).get(task)
            mask = f"   mask {density:7.2%}" if density is not None else ""
            lines.append(f"  {task:<24} lambda {lam:<10.6g}{mask}")
        if emr.get("empty_masks"):
            lines.append(f"  warning: empty mask (rebuilds the base): {', '.join(emr['empty_masks'])}")
        return lines

    def rebuild_specs(self, run, manifest, task, parts, base, output, options, chunk_elems, model_order):
        return rebuild_specs(run, manifest, task, parts, base, output, options, chunk_elems, model_order)

    rebuild_part = staticmethod(rebuild_part)  # a plain function: Ray ships it by reference
