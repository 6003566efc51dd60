"""A merged model as a PEFT LoRA adapter on its base: truncated SVD of each changed linear weight.

Tensors in, tensors out, plus the per-part worker that reads a model part and the base. For each
floating-point tensor the merge changed (model - base, in float64):
- a 2-D `<module>.weight` that is not an embedding: a LoRA target, delta = B @ A with the top-r
  singular triplets (B = U sqrt(S), A = sqrt(S) V^T, scaling 1 since lora_alpha = r);
- the bias of such a module: saved whole (PEFT's bias "lora_only" restores a target's bias);
- anything else (embeddings, norms, 1-D parameters of other modules): its module is a
  modules_to_save, every parameter of it saved whole from the merged model.
The relative error ||delta - B A||_F / ||delta||_F of each target is exact from the dropped singular
values; docs/design.md ("LoRA out") says why the adapter is computed from model/ and not from delta/.
"""

from __future__ import annotations

import math
import re
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from mergeflow.infra.storage import StorageOptions
from mergeflow.workers.dtypes import FLOAT_CODES
from mergeflow.workers.lora import LoraFactor, Unchanged
from mergeflow.workers.reading import ShardReader
from mergeflow.workers.safetensors_io import TensorInfo

PREFIX = "base_model.model."
# Embedding matrices take LoRA of another kind (lora_embedding_A/B); mergeflow saves them whole.
EMBEDDING = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared)$")


@dataclass(frozen=True)
class Target:
    """How many singular triplets to keep: `rank` (a cap when `energy` is given too), or the fewest
    whose squared singular values reach `energy` of the total."""

    rank: int | None = None
    energy: float | None = None

    def keep(self, s: torch.Tensor) -> int:
        k = s.numel() if self.rank is None else min(self.rank, s.numel())
        if self.energy is not None:
            power = torch.cumsum(s.double() ** 2, 0)
            reach = int(torch.searchsorted(power, self.energy * power[-1]).item()) + 1
            k = min(k, reach)
        return max(k, 1)


def module_of(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def is_target(name: str, shape: tuple[int, ...]) -> bool:
    module, param = module_of(name)
    return param == "weight" and len(shape) == 2 and bool(module) and not EMBEDDING.search(module)


def factor(delta: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error) with B @ A the best rank-k approximation of `delta` (float64 in)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = target.keep(s)
    total = float((s**2).sum())
    dropped = float((s[k:] ** 2).sum())
    root = s[:k].sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    return a, b, math.sqrt(dropped / total) if total > 0 else 0.0


@dataclass(frozen=True)
class PartSpec:
    """One model part to turn into adapter tensors: its tensors and the base's of the same names."""

    model: tuple[TensorInfo, ...]
    base: dict[str, TensorInfo]
    target: Target
    fan_in_fan_out: bool  # GPT-2's Conv1D layout: weights stored (in, out)
    storage: StorageOptions

    @property
    def base_bytes(self) -> int:
        return sum(b.nbytes for b in self.base.values())


def _read(reader: ShardReader, info: TensorInfo) -> torch.Tensor:
    return reader.elements(info, 0, info.numel).to(torch.float64).reshape(info.shape)


def export_part(spec: PartSpec) -> dict:
    """{"tensors": {adapter key: float32 tensor}, "targets": {module: (rank, rel error)},
    "changed": [names changed outside targets], "bias": {module: bias key}}."""
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, tuple[int, float]] = {}
    changed: list[str] = []
    with ExitStack() as stack:
        reader = ShardReader(spec.storage, stack)
        for info in spec.model:
            if info.dtype not in FLOAT_CODES:
                continue
            delta = _read(reader, info) - _read(reader, spec.base[info.name])
            if not bool(delta.any()):
                continue
            if is_target(info.name, info.shape):
                mat = delta.T if spec.fan_in_fan_out else delta
                a, b, err = factor(mat, spec.target)
                module, _ = module_of(info.name)
                tensors[f"{PREFIX}{module}.lora_A.weight"] = a.to(torch.float32).contiguous()
                tensors[f"{PREFIX}{module}.lora_B.weight"] = b.to(torch.float32).contiguous()
                targets[module] = (a.shape[0], err)
            else:
                changed.append(info.name)
    return {"tensors": tensors, "targets": targets, "changed": changed}


def concat_factors(sources: list[dict], scale: float, fan_in_fan_out: bool, storage: StorageOptions) -> dict:
    """Task Arithmetic over adapters as one adapter: per module the tasks' factors side by side,
    A = [A_1; ...; A_T] and B = [c_1 B_1, ..., c_T B_T] with c_t = scale * s_t (rank sum_t r_t), so
    B @ A = scale * sum_t s_t B_t @ A_t: the merged delta itself, nothing truncated.

    `sources` are the tasks' bound tensors (workers/lora.py's bind). Returns what export_part does,
    with "changed" the names some task changes other than through LoRA factors."""
    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    changed: set[str] = set()
    with ExitStack() as stack:
        reader = ShardReader(storage, stack)
        for task in sources:
            for name, src in task.items():
                if isinstance(src, Unchanged):
                    continue
                if not isinstance(src, LoraFactor):
                    changed.add(name)
                    continue
                a = _read(reader, src.a)  # (r, in) of the layer's features
                b = _read(reader, src.b) * (scale * src.scale)
                if src.fan_in_fan_out != fan_in_fan_out:  # the other layout: B @ A transposed
                    a, b = b.T, a.T
                per_module.setdefault(module_of(name)[0], []).append((a, b))
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, tuple[int, float]] = {}
    for module, pairs in per_module.items():
        if f"{module}.weight" in changed:  # a full tensor in some task: the module travels whole
            continue
        a = torch.cat([p[0] for p in pairs], dim=0)
        b = torch.cat([p[1] for p in pairs], dim=1)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.to(torch.float32).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.to(torch.float32).contiguous()
        targets[module] = (a.shape[0], 0.0)
    changed |= {f"{m}.weight" for m in per_module if m not in targets}
    return {"tensors": tensors, "targets": targets, "changed": sorted(changed)}


def whole_tensors(names: list[str], model: dict[str, TensorInfo], storage: StorageOptions) -> dict:
    """Merged tensors saved whole, under `base_model.model.<name>`, float32 as PEFT keeps adapters."""
    with ExitStack() as stack:
        reader = ShardReader(storage, stack)
        return {name: _read(reader, model[name]).to(torch.float32).contiguous() for name in names}
