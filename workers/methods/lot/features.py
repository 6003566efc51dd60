"""LOT's feature pass: run one task's fine-tuned model on its exemplars and accumulate, per
parameter of the checkpoint, the statistics its closed-form merge needs.

- `gram.<linear>.weight`  X^T X of the layer's input rows (tokens flattened to rows), float64
- `energy.<norm>.weight`  per channel, sum over rows of x_hat^2 (the normalised input the scale multiplies)
- `rows.<param>`          rows seen, for biases and norm shifts (the weights of their mean), and for
                          linear weights (how well their least-squares problem is determined)

Parameters with none of these (embeddings, convolutions, layers never called) get the mean task
vector. Padded tokens are left out when a batch carries an `attention_mask`.

The statistics are cached as one safetensors file per (checkpoint sha256, exemplar hash), so
re-runs and re-merges with a new task only run the new task's model.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from mergeflow.errors import ConfigError
from mergeflow.infra.storage import StorageOptions, join, storage_for
from mergeflow.workers.methods.lot.models import TaskModelSpec, call_module, open_task_model

log = logging.getLogger(__name__)

STATS_VERSION = 1  # bump when what a statistic means changes: old cache files stop matching
GRAM, ENERGY, ROWS = "gram.", "energy.", "rows."


def _param(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def _norm_eps(m: nn.Module) -> tuple[str, float | None] | None:
    """('layer' | 'rms', eps) for normalisation layers with a per-channel scale, else None."""
    weight = getattr(m, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    if isinstance(m, nn.LayerNorm):
        return "layer", m.eps
    rms = getattr(nn, "RMSNorm", None)
    if (rms is not None and isinstance(m, rms)) or type(m).__name__.endswith("RMSNorm"):
        # transformers' RMSNorm classes call it variance_epsilon, torch's eps (None: dtype eps)
        return "rms", getattr(m, "eps", None) or getattr(m, "variance_epsilon", None)
    return None


class FeatureHooks:
    """Forward pre-hooks on every nn.Linear and LayerNorm/RMSNorm; accumulates in float64.

    Use as a context manager; set `row_mask` to a (batch, seq) bool tensor to leave padded
    positions out of every input whose leading dimensions have that shape."""

    def __init__(self, module: nn.Module):
        self._module = module
        self._handles: list = []
        self.row_mask: torch.Tensor | None = None
        self.grams: dict[str, torch.Tensor] = {}
        self.energies: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def __enter__(self) -> FeatureHooks:
        for name, m in self._module.named_modules():
            if isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_pre_hook(self._linear(name, m), with_kwargs=True))
            elif (norm := _norm_eps(m)) is not None:
                self._handles.append(m.register_forward_pre_hook(self._norm(name, m, *norm), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _input_rows(self, args: tuple, kwargs: dict, width: int) -> torch.Tensor:
        x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
        mask = self.row_mask
        if mask is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(mask.shape):
            x = x[mask]
        return x.reshape(-1, width).to(torch.float64)

    def _count(self, key: str, n: int) -> None:
        self.rows[key] = self.rows.get(key, 0) + n

    def _linear(self, name: str, m: nn.Linear):
        def hook(_mod, args, kwargs):
            x = self._input_rows(args, kwargs, m.in_features)
            key = _param(name, "weight")
            g = x.T @ x
            self.grams[key] = g if key not in self.grams else self.grams[key].add_(g)
            self._count(key, x.shape[0])

        return hook

    def _norm(self, name: str, m: nn.Module, kind: str, eps: float | None):
        width = m.weight.shape[0]

        def hook(_mod, args, kwargs):
            x = self._input_rows(args, kwargs, width)
            e = torch.finfo(args[0].dtype if args else torch.float32).eps if eps is None else eps
            if kind == "layer":  # LayerNorm centres first; RMSNorm does not
                x = x - x.mean(dim=1, keepdim=True)
            x_hat = x * torch.rsqrt((x * x).mean(dim=1, keepdim=True) + e)
            key = _param(name, "weight")
            energy = (x_hat * x_hat).sum(dim=0)
            self.energies[key] = energy if key not in self.energies else self.energies[key].add_(energy)
            self._count(key, x.shape[0])

        return hook

    def tensors(self, keep: set[str] | None = None) -> dict[str, torch.Tensor]:
        """The statistics file's tensors, for parameters in `keep` (default: all)."""
        out: dict[str, torch.Tensor] = {}
        params = dict(self._module.named_parameters())
        for key, n in self.rows.items():
            if n == 0:
                continue
            bias = key[: -len("weight")] + "bias"
            if key in self.grams and (keep is None or key in keep):
                out[GRAM + key] = self.grams[key].cpu()
                out[ROWS + key] = torch.tensor([float(n)], dtype=torch.float64)
            if key in self.energies and (keep is None or key in keep):
                out[ENERGY + key] = self.energies[key].cpu()
            if bias in params and (keep is None or bias in keep):
                out[ROWS + bias] = torch.tensor([float(n)], dtype=torch.float64)
        return dict(sorted(out.items()))


@torch.no_grad()
def collect(
    module: nn.Module, batches: Iterable[Any], device: str = "cpu", keep: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """Run `module` (eval mode) over the batches and return its statistics tensors."""
    module = module.eval().to(device)
    with FeatureHooks(module) as hooks:
        for batch in batches:
            batch = _to(batch, device)
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            hooks.row_mask = mask.bool() if isinstance(mask, torch.Tensor) else None
            call_module(module, batch)
    return hooks.tensors(keep)


def _to(batch: Any, device: str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


# ------------------------------------------------------------------------------ hashing


def checkpoint_digest(file_sha256: Iterable[str]) -> str:
    """One sha256 per checkpoint, the one MLflow and re-merges record (infra/tracking.py's
    checkpoint_digest, which workers may not import): over its files' sha256, sorted, one per line."""
    return hashlib.sha256("\n".join(sorted(file_sha256)).encode()).hexdigest()


def exemplar_digest(model: str, batches: list[Any]) -> str:
    """sha256 of what the feature pass feeds: the model source and every exemplar tensor's bytes."""
    h = hashlib.sha256(f"lot-stats/{STATS_VERSION} model={model}\n".encode())

    def add(x: Any, path: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{path} {t.dtype} {tuple(t.shape)}\n".encode())
            h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x):
                add(x[k], f"{path}.{k}")
        elif isinstance(x, (tuple, list)):
            for i, v in enumerate(x):
                add(v, f"{path}[{i}]")
        else:
            h.update(f"{path} {x!r}\n".encode())

    for i, b in enumerate(batches):
        add(b, f"batch{i}")
    return h.hexdigest()


def stats_uri(cache: str, checkpoint_sha: str, exemplar_sha: str) -> str:
    return join(cache, f"{checkpoint_sha}-{exemplar_sha}.safetensors")


# ------------------------------------------------------------------------- the worker


@dataclass(frozen=True)
class FeatureJob:
    spec: TaskModelSpec
    names: tuple[str, ...]  # the checkpoint's tensor names: statistics are kept for these only
    cache: str  # URI prefix of the statistics cache
    device: str = "cpu"


@dataclass
class FeatureResult:
    task: str
    uri: str  # the statistics file
    reused: bool  # found in the cache: no model was built or run
    seconds: float
    keys: tuple[str, ...] = field(default_factory=tuple)  # statistics tensor names in the file
    linear_rows: dict[str, int] = field(default_factory=dict)  # linear weight -> feature rows it saw


def task_features(job: FeatureJob, *file_sha256: str) -> FeatureResult:
    """Statistics for one task: from the cache when this checkpoint and these exemplars were seen
    before, else by running the task's model. `file_sha256` are the checkpoint files' hashes
    (the merge computes them anyway for its manifest), in any order."""
    t0 = time.perf_counter()
    spec = job.spec
    task_model = open_task_model(spec)
    uri = stats_uri(job.cache, checkpoint_digest(file_sha256), exemplar_digest(spec.model, task_model.batches))
    store = storage_for(uri, spec.storage)
    if store.exists(uri):
        keys, rows = read_stats_summary(uri, spec.storage)
        return FeatureResult(spec.task, uri, True, time.perf_counter() - t0, keys, rows)
    module = task_model.build()
    tensors = collect(module, task_model.batches, job.device, keep=set(job.names))
    if not tensors:
        raise ConfigError(
            f"task {spec.task!r}: the feature pass of method.model {spec.model!r} saw no nn.Linear or "
            "norm layer whose parameter names match the checkpoint's tensors"
        )
    metadata = {
        "format": "mergeflow.lot_stats/1",
        "task": spec.task,
        "model": spec.model,
        "exemplars": str(spec.exemplars),
        "seed": str(spec.seed),
        "stats_version": str(STATS_VERSION),
    }
    store.write_bytes(uri, save_safetensors(tensors, metadata=metadata))
    log.info(
        "task %s: LOT statistics for %d tensors in %.1fs -> %s", spec.task, len(tensors), time.perf_counter() - t0, uri
    )
    rows = {k[len(GRAM) :]: int(tensors[ROWS + k[len(GRAM) :]]) for k in tensors if k.startswith(GRAM)}
    return FeatureResult(spec.task, uri, False, time.perf_counter() - t0, tuple(tensors), rows)


def read_stats_summary(uri: str, storage: StorageOptions) -> tuple[tuple[str, ...], dict[str, int]]:
    """A statistics file's tensor names and its linear weights' row counts, without reading a Gram."""
    from mergeflow.workers.dtypes import TORCH_DTYPES
    from mergeflow.workers.safetensors_io import read_header

    tensors = read_header(uri, storage).tensors
    rows = {}
    reader = storage_for(uri, storage).open_reader(uri)
    try:
        for key in tensors:
            if key.startswith(GRAM) and (info := tensors.get(ROWS + key[len(GRAM) :])) is not None:
                rows[key[len(GRAM) :]] = int(
                    torch.frombuffer(reader.read(info.start, info.end), dtype=TORCH_DTYPES[info.dtype])[0]
                )
    finally:
        reader.close()
    return tuple(sorted(tensors)), rows


def load_stats(uri: str, storage: StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """A whole statistics file (tests, notebooks); the merge reads only what each shard needs."""
    return load_safetensors(storage_for(uri, storage).read_bytes(uri))
