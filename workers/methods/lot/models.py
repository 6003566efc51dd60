"""Build one task's fine-tuned model and its exemplar batches, for LOT's feature pass.

`method.model` names how:
- `hf`: a transformers model instantiated offline from the checkpoint's config.json (class from its
  `architectures`, else AutoModel); exemplars are token ids from `method.exemplar_files[task]`, a
  JSON list of token-id lists or `{"input_ids": [...], "attention_mask": [...]}`. Needs the
  optional `mergeflow[hf]` extra.
- `module:function`: a user hook `fn(checkpoint: str, task: str, exemplars: int, seed: int)
  -> (torch.nn.Module, iterable of batches)`. The module carries the checkpoint's weights under the
  checkpoint's tensor names; a batch is a tensor (`module(batch)`), a tuple (`module(*batch)`) or a
  dict (`module(**batch)`; an `attention_mask` there also drops padded tokens from the statistics).

Batches are materialised (they are a few dozen exemplars) so that they can be hashed before any
model is built: with `hf`, a cached statistics file then costs no model load at all. The digits
suite is a hook like any other: `mergeflow.dev.suite.models:lot_task_model`.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergeflow.errors import CheckpointError, ConfigError, StorageError
from mergeflow.infra.storage import StorageOptions, storage_for
from mergeflow.workers.checkpoint import open_checkpoint
from mergeflow.workers.dtypes import TORCH_DTYPES

BUILTIN = ("hf",)
HOOK = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
HF_BATCH = 16  # sequences per forward pass


@dataclass(frozen=True)
class TaskModelSpec:
    """Everything a worker needs to build task `task`'s model and exemplars."""

    model: str  # "hf" or "module:function"
    checkpoint: str  # URI
    task: str
    exemplars: int
    seed: int
    exemplar_file: str | None = None  # hf: the task's token-id file
    storage: StorageOptions = StorageOptions()


@dataclass
class TaskModel:
    batches: list  # exemplar batches, in order
    build: Callable[[], nn.Module]  # the fine-tuned model, built only when statistics are not cached


def resolve_hook(model: str) -> Callable:
    """The user's `module:function`, or a one-line ConfigError saying what is wrong."""
    if not HOOK.match(model):
        raise ConfigError(f"method.model: {model!r} is not hf or a hook written module:function")
    mod_name, fn_name = model.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(
            f"method.model: cannot import module {mod_name!r} for hook {model!r} ({e}); "
            "install it on every Ray node or fix the name"
        ) from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"method.model: module {mod_name!r} has no function {fn_name!r}")
    return fn


def check_model(model: str) -> None:
    """Fail on the driver, before any Ray task, when the model source cannot work."""
    if model == "hf":
        _transformers()
    else:
        resolve_hook(model)


def open_task_model(spec: TaskModelSpec) -> TaskModel:
    if spec.model == "hf":
        return _hf(spec)
    return _hook(spec)


def subset(n_available: int, n: int, seed: int) -> torch.Tensor:
    """A seeded choice of n of the available exemplars, kept in their original order."""
    if n_available <= n:
        return torch.arange(n_available)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_available, generator=gen)[:n].sort().values


def load_tensors(checkpoint: str, storage: StorageOptions) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (local or s3://), read by byte range from its safetensors files."""
    cp = open_checkpoint(checkpoint, storage)
    out: dict[str, torch.Tensor] = {}
    readers = {}
    try:
        for name, info in cp.tensors.items():
            if info.file not in readers:
                readers[info.file] = storage_for(info.file, storage).open_reader(info.file)
            buf = readers[info.file].read(info.start, info.end)
            t = (
                torch.frombuffer(buf, dtype=TORCH_DTYPES[info.dtype])
                if buf
                else torch.empty(0, dtype=TORCH_DTYPES[info.dtype])
            )
            out[name] = t.reshape(info.shape)
    finally:
        for r in readers.values():
            r.close()
    return out


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], spec: TaskModelSpec) -> None:
    """Every checkpoint tensor must land in the module, and every parameter must come from the
    checkpoint (or be tied to one that does): features of a half-random model are worthless."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(
            f"task {spec.task!r}: tensor {result.unexpected_keys[0]!r} of {spec.checkpoint} is not a "
            f"parameter of the {type(model).__name__} built for it (wrong architecture in config.json?)"
        )
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    params = dict(model.named_parameters(remove_duplicate=False))
    for key in result.missing_keys:
        p = params.get(key)
        if p is not None and p.data_ptr() not in loaded:
            raise CheckpointError(
                f"task {spec.task!r}: {spec.checkpoint} has no tensor {key!r}, a parameter of the "
                f"{type(model).__name__} built for it"
            )


# -------------------------------------------------------------------------------- hf


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "method.model: hf needs the transformers package; install mergeflow[hf] (pip install 'mergeflow[hf]')"
        ) from None
    return transformers


def _hf(spec: TaskModelSpec) -> TaskModel:
    transformers = _transformers()
    cp = open_checkpoint(spec.checkpoint, spec.storage)
    if cp.config_json is None:
        raise CheckpointError(
            f"task {spec.task!r}: {spec.checkpoint} has no config.json; method.model hf builds the model from it"
        )
    try:
        cfg = json.loads(storage_for(cp.config_json, spec.storage).read_bytes(cp.config_json))
        model_type = cfg.pop("model_type")
        config = transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"task {spec.task!r}: {cp.config_json} is not a usable transformers config ({e})"
        ) from None
    batches = _token_batches(spec, config)

    def build() -> nn.Module:
        arch = (cfg.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
        state = {
            k: v.float() if v.is_floating_point() else v for k, v in load_tensors(spec.checkpoint, spec.storage).items()
        }
        _load_strict(model.float(), state, spec)
        return model

    return TaskModel(batches, build)


def _token_batches(spec: TaskModelSpec, config) -> list[dict[str, torch.Tensor]]:
    where = f"method.exemplar_files.{spec.task}"
    if not spec.exemplar_file:
        raise ConfigError(f"{where}: method.model hf needs a token-id file for task {spec.task!r}")
    try:
        doc = json.loads(storage_for(spec.exemplar_file, spec.storage).read_bytes(spec.exemplar_file))
    except StorageError:
        raise ConfigError(f"{where}: {spec.exemplar_file} not found") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {spec.exemplar_file} is not JSON ({e})") from None
    ids, masks = (doc.get("input_ids"), doc.get("attention_mask")) if isinstance(doc, dict) else (doc, None)
    ok = (
        isinstance(ids, list)
        and ids
        and all(isinstance(r, list) and r and all(isinstance(i, int) for i in r) for r in ids)
    )
    if not ok:
        raise ConfigError(
            f'{where}: {spec.exemplar_file} must hold a non-empty list of token-id lists (or {{"input_ids": [...]}})'
        )
    vocab = getattr(config, "vocab_size", None)
    bad = [i for r in ids for i in r if i < 0 or (vocab is not None and i >= vocab)]
    if bad:
        raise ConfigError(
            f"{where}: token id {bad[0]} in {spec.exemplar_file} is outside the vocabulary (size {vocab})"
        )
    if masks is not None and [len(m) for m in masks] != [len(r) for r in ids]:
        raise ConfigError(f"{where}: attention_mask in {spec.exemplar_file} does not match input_ids in shape")
    pick = subset(len(ids), spec.exemplars, spec.seed).tolist()
    pad = getattr(config, "pad_token_id", None) or 0
    batches = []
    for lo in range(0, len(pick), HF_BATCH):
        rows = [ids[i] for i in pick[lo : lo + HF_BATCH]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for j, i in enumerate(pick[lo : lo + HF_BATCH]):
            input_ids[j, : len(ids[i])] = torch.tensor(ids[i])
            mask[j, : len(ids[i])] = torch.tensor(masks[i]) if masks is not None else 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


# ------------------------------------------------------------------------------ hook


def _hook(spec: TaskModelSpec) -> TaskModel:
    fn = resolve_hook(spec.model)
    try:
        module, batches = fn(spec.checkpoint, spec.task, spec.exemplars, spec.seed)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"method.model: hook {spec.model!r} must return (nn.Module, batches) for "
            f"fn(checkpoint, task, exemplars, seed); task {spec.task!r} failed: {e}"
        ) from None
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"method.model: hook {spec.model!r} returned a {type(module).__name__} for task "
            f"{spec.task!r}, not a torch.nn.Module"
        )
    batches = list(batches)
    if not batches:
        raise ConfigError(f"method.model: hook {spec.model!r} yielded no exemplar batches for task {spec.task!r}")
    return TaskModel(batches, lambda: module)


def call_module(module: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)
