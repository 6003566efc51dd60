"""Scoring candidate models with a user's evaluator, for hyper-parameter selection.

The evaluator contract (a `module:function` named in the config's `selection.evaluator`):

    def evaluate(model, *, task: str, split: str, checkpoint: str, **options) -> float

- `model`: the model to score, as a state dict {tensor name: tensor} with the checkpoint's names and
  dtypes (or a checkpoint URI, for the fine-tuned models themselves);
- `task`: the task's name from the config; `split`: "val" (selection) or "test" (reports);
- `checkpoint`: that task's fine-tuned checkpoint URI, to find task-specific assets (heads, tokenizers);
- `options`: the config's `selection.options`, passed through as keyword arguments.
Higher is better. The digits suite ships one: `mergeflow.dev.suite.models:evaluate`.

Each candidate model is built here exactly as the merge or rebuild would write it (the same float32
formula, then a cast to the stored dtype), so a selected value scores the same on the written model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors

from mergeflow.errors import ConfigError
from mergeflow.infra.storage import StorageOptions, storage_for
from mergeflow.workers.bits import unpack

Evaluator = Callable[..., float]


def load_evaluator(ref: str) -> Evaluator:
    """`package.module:function` -> the function; one-line ConfigError when it cannot be found."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"selection.evaluator: {ref!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"selection.evaluator: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"selection.evaluator: module {module_name!r} has no function {attr!r}")
    return fn


def load_tensors(files: list[str] | tuple[str, ...], storage: StorageOptions) -> dict[str, torch.Tensor]:
    """Every tensor of some safetensors files (local or s3://), whole: candidate models must fit in memory."""
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_safetensors(storage_for(f, storage).read_bytes(f)))
    return out


def scaled_model(
    base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """theta_0 + alpha * delta, as merge_shard writes it (tensors without a delta are copied)."""
    return {n: (b.float() + alpha * delta[n]).to(b.dtype) if n in delta else b for n, b in base.items()}


def masked_model(
    base: dict[str, torch.Tensor], tau: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """theta_0 + m_t * tau_MTL, as rebuild_part writes it; masks are packed bits (np.packbits order)."""
    out = {}
    for n, b in base.items():
        if n not in tau:
            out[n] = b
            continue
        bits = unpack(masks[n], b.numel()).reshape(b.shape)
        out[n] = (b.float() + torch.where(bits, tau[n].float(), torch.zeros((), dtype=torch.float32))).to(b.dtype)
    return out


@dataclass(frozen=True)
class Scoring:
    """How to score: the evaluator, the split, and what it needs to find each task's assets."""

    evaluator: str
    split: str
    checkpoints: dict[str, str]  # task -> fine-tuned checkpoint URI
    options: dict = field(default_factory=dict)

    def score(self, model, task: str) -> float:
        fn = load_evaluator(self.evaluator)
        value = fn(model, task=task, split=self.split, checkpoint=self.checkpoints[task], **self.options)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"selection.evaluator {self.evaluator!r} returned {value!r} for task {task!r}; "
                "it must return a number (higher is better)"
            ) from None


def score_finetuned(scoring: Scoring, task: str, storage: StorageOptions) -> float:
    """The task's own fine-tuned model: the denominator of normalized accuracy."""
    return score_checkpoint(scoring, scoring.checkpoints[task], task, storage)


def score_scaled(
    scoring: Scoring,
    base_files: tuple[str, ...],
    delta_files: tuple[str, ...],
    alpha: float,
    tasks: tuple[str, ...],
    storage: StorageOptions,
) -> dict[str, float]:
    """One alpha trial: build theta_0 + alpha * delta once, score it on every task."""
    model = scaled_model(load_tensors(base_files, storage), load_tensors(delta_files, storage), alpha)
    return {t: scoring.score(model, t) for t in tasks}


def score_masked(
    scoring: Scoring,
    base_files: tuple[str, ...],
    tau_files: tuple[str, ...],
    mask_files: tuple[str, ...],
    task: str,
    storage: StorageOptions,
) -> float:
    """One lambda trial: the rebuilt model theta_0 + m_t(lambda) * tau_MTL, scored on its own task."""
    model = masked_model(
        load_tensors(base_files, storage), load_tensors(tau_files, storage), load_tensors(mask_files, storage)
    )
    return scoring.score(model, task)


def score_checkpoint(scoring: Scoring, uri: str, task: str, storage: StorageOptions) -> float:
    """Any checkpoint (base, a fine-tuned model, a run's model/) scored on `task`."""
    from mergeflow.workers.checkpoint import open_checkpoint

    return scoring.score(load_tensors(open_checkpoint(uri, storage).files, storage), task)


def score_rebuilt(scoring: Scoring, run: str, base_files: tuple[str, ...], task: str, storage: StorageOptions) -> float:
    """Task `task`'s model rebuilt from a run's compressed bundle (theta_0 + m_t * tau_MTL), scored on it."""
    import json

    from mergeflow.infra.storage import join

    index = json.loads(storage_for(run, storage).read_bytes(join(run, "compressed/index.json")))
    tau = tuple(join(run, f) for f in index["tau_mtl"]["files"])
    masks = tuple(join(run, f) for f in index["masks"][task])
    return score_masked(scoring, base_files, tau, masks, task, storage)
