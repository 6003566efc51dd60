"""PEFT LoRA adapters as task checkpoints: a folder with adapter_config.json and
adapter_model.safetensors, whose task vector is, per targeted weight, scale * B @ A.

Planning binds an adapter to the base (`bind`): every base tensor gets a source, a LoraFactor for a
targeted weight, the adapter's full tensor for modules_to_save (and trained biases), Unchanged
(tau = 0) for the rest, with shapes checked and PEFT's scaling rules applied: lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora, per module from rank_pattern / alpha_pattern, transposed for
fan_in_fan_out (GPT-2's Conv1D). Workers then form B @ A chunk by chunk of rows (`fill_chunk`), so a
merge holds O(T x chunk), never an adapter's dense task vector.

The product is summed over the rank in a fixed order in float64 and rounded once to float32: the same
bytes whatever the chunk, shard or device (a matmul's summation order depends on its shape).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch

from mergeflow.errors import CheckpointError
from mergeflow.workers.safetensors_io import TensorInfo

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of the wrapped model's module names
# Adapter features mergeflow does not turn into task vectors: one line says so rather than a wrong merge.
UNSUPPORTED = {
    "use_dora": "DoRA",
    "layer_replication": "layer replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA",
    "lora_bias": "LoRA biases",
    "use_bdlora": "BD-LoRA",
}


@dataclass(frozen=True)
class LoraFactor:
    """A targeted weight's task vector: scale * B @ A (its transpose when fan_in_fan_out)."""

    a: TensorInfo  # (r, in)
    b: TensorInfo  # (out, r)
    scale: float
    fan_in_fan_out: bool
    shape: tuple[int, ...]  # the base weight's
    dtype: str  # the base weight's (a task vector has no stored dtype of its own)

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


@dataclass(frozen=True)
class Unchanged:
    """A base tensor the adapter does not touch: its task vector is 0."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int = 0


def is_adapter(names: set[str]) -> bool:
    return CONFIG in names and WEIGHTS in names


def read_config(uri: str, data: bytes) -> dict:
    """The adapter's config, refusing what is not a plain LoRA adapter, in one line."""
    try:
        cfg = json.loads(data)
    except ValueError:
        raise CheckpointError(f"{uri}: not valid JSON") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{uri}: not a PEFT adapter config")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{uri}: PEFT type {kind!r} is not supported (LoRA adapters only)")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise CheckpointError(f"{uri}: {what} ({key}) adapters are not supported; merge LoRA adapters without it")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise CheckpointError(f"{uri}: r must be a positive integer, got {cfg.get('r')!r}")
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern that matches the end of the module name ("(.*\\.)?<pattern>$")."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def scale_of(cfg: dict, module: str) -> tuple[int, float]:
    """(r, scale) of a module under the adapter's config."""
    r = int(_pattern_value(cfg.get("rank_pattern"), module, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def bind(adapter: dict[str, TensorInfo], cfg: dict, base: dict[str, TensorInfo], where: str) -> dict:
    """Every base tensor's source in this adapter: LoraFactor, the adapter's TensorInfo (a full tensor),
    or Unchanged. One-line CheckpointError for what does not fit the base."""
    factors: dict[str, dict[str, TensorInfo]] = {}
    full: dict[str, TensorInfo] = {}
    for key, info in adapter.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = re.match(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", name)
        if m:
            factors.setdefault(m.group(1), {})[m.group(2)] = info
        else:
            full[name] = info
    out: dict = {}
    for module, ab in factors.items():
        target = f"{module}.weight"
        if target not in base:
            raise CheckpointError(f"{where}: the adapter targets {module!r} but the base has no tensor {target!r}")
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{where}: module {module!r} has lora_{next(iter(ab))} without its pair")
        a, b, w = ab["A"], ab["B"], base[target]
        r, scale = scale_of(cfg, module)
        fan = bool(cfg.get("fan_in_fan_out"))
        want = (b.shape[0], a.shape[1]) if not fan else (a.shape[1], b.shape[0])
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise CheckpointError(
                f"{where}: module {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, not a rank-{r} pair"
            )
        if tuple(w.shape) != want:
            raise CheckpointError(
                f"{where}: module {module!r}'s LoRA update is {list(want)} but the base's {target!r} is {list(w.shape)}"
            )
        out[target] = LoraFactor(a, b, scale, fan, tuple(w.shape), w.dtype)
    for name, info in full.items():
        if name not in base:
            raise CheckpointError(f"{where}: the adapter holds tensor {name!r} (modules_to_save) but the base does not")
        if tuple(info.shape) != tuple(base[name].shape):
            raise CheckpointError(
                f"{where}: the adapter's {name!r} has shape {list(info.shape)}, the base's {list(base[name].shape)}"
            )
        if name in out:
            raise CheckpointError(f"{where}: {name!r} is both a LoRA target and a full tensor")
        out[name] = info
    return {n: out.get(n) or Unchanged(tuple(b.shape), b.dtype) for n, b in base.items()}


def _whole(reader, info: TensorInfo, device) -> torch.Tensor:
    """A small tensor (a LoRA factor) read once per shard and kept."""
    key = (info.file, info.start, str(device))
    t = reader.memo.get(key)
    if t is None:
        t = reader.elements(info, 0, info.numel).to(device).to(torch.float64).reshape(info.shape)
        reader.memo[key] = t
    return t


def fill_chunk(row: torch.Tensor, f: LoraFactor, lo: int, hi: int, reader) -> None:
    """row[:] = elements [lo, hi) of the flattened scale * B @ A (or its transpose), in float32."""
    device = row.device
    a, b = _whole(reader, f.a, device), _whole(reader, f.b, device)  # (r, in), (out, r)
    if f.fan_in_fan_out:  # the weight is (in, out): its rows are A's columns
        a, b = b.T, a.T
    width = f.shape[1]
    r0, r1 = lo // width, (hi - 1) // width + 1
    rows = b[r0:r1]
    acc = torch.zeros((r1 - r0, width), dtype=torch.float64, device=device)
    for k in range(a.shape[0]):  # the rank in order: the same sums whatever the chunk
        acc.addcmul_(rows[:, k : k + 1], a[k : k + 1, :])
    flat = acc.reshape(-1)[lo - r0 * width : hi - r0 * width]
    row.copy_(flat.mul_(f.scale))


def check_finite(f: LoraFactor, reader, who: str, name: str) -> None:
    for info in (f.a, f.b):
        if not bool(torch.isfinite(reader.elements(info, 0, info.numel)).all()):
            raise CheckpointError(f"{who}: the LoRA factors of {name!r} contain NaN or Inf values")
