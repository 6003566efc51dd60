"""A small real benchmark suite: tasks made from scikit-learn's digits by fixed transforms.

One MLP backbone (64 -> H -> H -> H, ReLU; tensors `backbone.0.weight` ... `backbone.4.bias`) is
pretrained on the identity digits with light augmentation (pixel noise and brightness, no geometric
changes) and a throw-away head. Per task, a linear head (H -> 10) is probed (a few epochs of Adam) on
the frozen base features, then kept FROZEN while the whole backbone is fine-tuned on that task's train
split (the protocol of the task-arithmetic papers). The heads are stored apart from the checkpoints
(`<task>/head.safetensors`), so a merge only ever sees the backbone in `<task>/model.safetensors`.

Every task uses the same 60/20/20 train/val/test split of the 1797 images (so no test image, in any
transform, is seen in pretraining). Everything is deterministic by seed: same seed, same bytes.

`evaluate(backbone, task, suite_dir, split)` scores one task's model with its stored head; it is the
evaluator interface (a module:function that scores one task's model).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergeflow.infra.storage import StorageOptions

NAME = "digits"
DEFAULT_DIR = "suite-out"
EVALUATOR = "mergeflow.dev.suite.models:evaluate"
ZERO_SHOT_OPTIONS: dict = {}  # the head is fixed during fine-tuning: the same head for the base
CODE_VERSION = 1  # bump when training or data change: invalidates cached suites
N_CLASSES = 10
TASK_COUNTS = (8, 14, 20)
SPLIT = (0.6, 0.2, 0.2)
PRETRAIN_EPOCHS = 30
FINETUNE_EPOCHS = 12
BATCH = 64
PRETRAIN_LR = 1e-3
FINETUNE_LR = 3e-4
PROBE_EPOCHS = 5
PROBE_LR = 1e-3
LOT_EXEMPLARS = 64  # the paper's recommendation, and method.exemplars' default


# --------------------------------------------------------------------------- transforms (8x8 images, 0..16)


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate with zero fill."""
    out = np.zeros_like(x)
    h, w = x.shape[1:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = x[:, ys, xs]
    return out


def _blur(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    return sum(p[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)) / 9.0


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _perm(name: str) -> Callable[[np.ndarray, int], np.ndarray]:
    def f(x: np.ndarray, seed: int) -> np.ndarray:
        p = _rng(seed, name).permutation(64)
        return x.reshape(len(x), 64)[:, p].reshape(x.shape)

    return f


def _shift_noise(name: str, dy: int, dx: int, sigma: float) -> Callable[[np.ndarray, int], np.ndarray]:
    def f(x: np.ndarray, seed: int) -> np.ndarray:
        noise = _rng(seed, name).normal(0.0, sigma, size=x.shape)
        return np.clip(_shift(x, dy, dx) + noise, 0.0, 16.0)

    return f


# name -> (description, fn(images, seed) -> images). The order fixes which tasks each variant has.
TRANSFORMS: dict[str, tuple[str, Callable[[np.ndarray, int], np.ndarray]]] = {
    # the 8-task suite
    "identity": ("the digits as they are", lambda x, s: x),
    "rot90": ("rotate 90 degrees counter-clockwise", lambda x, s: np.rot90(x, 1, axes=(1, 2))),
    "rot180": ("rotate 180 degrees", lambda x, s: np.rot90(x, 2, axes=(1, 2))),
    "hflip": ("mirror left-right", lambda x, s: x[:, :, ::-1]),
    "transpose": ("swap rows and columns", lambda x, s: np.transpose(x, (0, 2, 1))),
    "invert": ("16 - x", lambda x, s: 16.0 - x),
    "permute": ("a fixed pixel permutation (from the seed)", _perm("permute")),
    "shift_noise": ("shift down-right by 1, gaussian noise sigma 2", _shift_noise("shift_noise", 1, 1, 2.0)),
    # + 6 for the 14-task suite
    "rot270": ("rotate 270 degrees counter-clockwise", lambda x, s: np.rot90(x, 3, axes=(1, 2))),
    "vflip": ("mirror top-bottom", lambda x, s: x[:, ::-1, :]),
    "permute2": ("a second fixed pixel permutation", _perm("permute2")),
    "blur": ("3x3 box blur", lambda x, s: _blur(x)),
    "threshold": ("binarise at 8 (0 or 16)", lambda x, s: np.where(x > 8, 16.0, 0.0)),
    "shift_up_noise": ("shift up-left by 2, gaussian noise sigma 1", _shift_noise("shift_up_noise", -2, -2, 1.0)),
    # + 6 for the 20-task suite
    "antitranspose": (
        "transpose about the other diagonal",
        lambda x, s: np.rot90(np.transpose(x, (0, 2, 1)), 2, axes=(1, 2)),
    ),
    "invert_rot90": ("16 - x, rotated 90 degrees", lambda x, s: 16.0 - np.rot90(x, 1, axes=(1, 2))),
    "permute3": ("a third fixed pixel permutation", _perm("permute3")),
    "blur_hflip": ("3x3 box blur, mirrored left-right", lambda x, s: _blur(x)[:, :, ::-1]),
    "threshold_rot180": (
        "binarise at 8, rotated 180 degrees",
        lambda x, s: np.rot90(np.where(x > 8, 16.0, 0.0), 2, axes=(1, 2)),
    ),
    "noise_heavy": ("gaussian noise sigma 4", _shift_noise("noise_heavy", 0, 0, 4.0)),
}


def task_names(tasks: int) -> list[str]:
    if not 1 <= tasks <= len(TRANSFORMS):
        raise ValueError(f"tasks must be between 1 and {len(TRANSFORMS)} (the suites are {TASK_COUNTS}), got {tasks}")
    return list(TRANSFORMS)[:tasks]


# --------------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from mergeflow.errors import ConfigError

        raise ConfigError("the digits suite needs scikit-learn: pip install 'mergeflow[suite]'") from None

    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


@lru_cache(maxsize=8)
def split_indices(seed: int) -> dict[str, np.ndarray]:
    n = len(_digits()[1])
    order = np.random.default_rng([seed, 1]).permutation(n)
    a, b = int(round(SPLIT[0] * n)), int(round((SPLIT[0] + SPLIT[1]) * n))
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}


@lru_cache(maxsize=256)
def task_data(task: str, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 [N, 64] in [0, 1], y int64 [N]) for one task's split."""
    images, labels = _digits()
    x = np.ascontiguousarray(TRANSFORMS[task][1](images, seed)).reshape(len(images), 64) / 16.0
    idx = split_indices(seed)[split]
    return torch.from_numpy(x[idx].astype(np.float32)), torch.from_numpy(labels[idx])


# --------------------------------------------------------------------------- model


class SuiteMLP(nn.Module):
    def __init__(self, hidden: int = 512, inputs: int = 64, classes: int = N_CLASSES):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(inputs, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def backbone_state(model: SuiteMLP) -> dict[str, torch.Tensor]:
    return {f"backbone.{k}": v.detach().clone().contiguous() for k, v in model.backbone.state_dict().items()}


def head_state(model: SuiteMLP) -> dict[str, torch.Tensor]:
    return {f"head.{k}": v.detach().clone().contiguous() for k, v in model.head.state_dict().items()}


def load_backbone(source: dict[str, torch.Tensor] | Path | str) -> dict[str, torch.Tensor]:
    """A backbone state from a dict, a .safetensors file, or a checkpoint directory (single file or shards,
    e.g. a merge run's `model/`). Tensors are cast to float32; non-backbone tensors are ignored."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = (
                [path / "model.safetensors"]
                if (path / "model.safetensors").exists()
                else sorted(p for p in path.glob("*.safetensors") if p.name != "head.safetensors")
            )
            if not files:
                raise FileNotFoundError(f"{path}: no model safetensors")
            sd = {}
            for f in files:
                sd |= load_file(str(f))
        else:
            sd = load_file(str(path))
    else:
        sd = source
    return {k: v.float() for k, v in sd.items() if k.startswith("backbone.")}


def _model_from(backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> SuiteMLP:
    hidden = backbone["backbone.0.weight"].shape[0]
    m = SuiteMLP(hidden)
    m.load_state_dict(backbone | head)
    return m.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- training


@contextmanager
def _deterministic():
    """One thread, deterministic kernels; restores the caller's settings."""
    from threadpoolctl import threadpool_limits

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def _batches(n: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for i in range(0, n, BATCH):
        yield order[i : i + BATCH]


def _fit(forward, params, x, y, gen: torch.Generator, epochs: int, lr: float, augment=None) -> None:
    """Adam on cross-entropy over shuffled mini-batches; `augment(xb, gen)` perturbs a batch."""
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        for b in _batches(len(x), gen):
            xb = augment(x[b], gen) if augment else x[b]
            loss = nn.functional.cross_entropy(forward(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _light_augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # brightness and pixel noise only: no geometry, no inversion, so the tasks stay new to the base
    scale = 0.8 + 0.4 * torch.rand(len(xb), 1, generator=gen)
    return (xb * scale + 0.05 * torch.randn(xb.shape, generator=gen)).clamp(0, 1)


def _pretrain(hidden: int, seed: int, epochs: int) -> SuiteMLP:
    torch.manual_seed(seed)
    model = SuiteMLP(hidden)
    gen = torch.Generator().manual_seed(seed * 1000 + 7)
    x, y = task_data("identity", seed, "train")
    model.train()
    _fit(model, model.parameters(), x, y, gen, epochs, PRETRAIN_LR, augment=_light_augment)
    return model.eval()


def _probe_head(model: SuiteMLP, task: str, seed: int, epochs: int, task_index: int) -> dict[str, torch.Tensor]:
    """A linear probe on the frozen base features of the task's train split: a few epochs of Adam from a
    zero head (deliberately short, as a zero-shot head is not the best linear head: fine-tuning has room)."""
    x, y = task_data(task, seed, "train")
    with torch.no_grad():
        feats = model.backbone(x)
    head = nn.Linear(feats.shape[1], N_CLASSES)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    gen = torch.Generator().manual_seed(seed * 1000 + 500 + task_index)
    _fit(head, head.parameters(), feats, y, gen, epochs, PROBE_LR)
    return {f"head.{k}": v.detach().clone().contiguous() for k, v in head.state_dict().items()}


def _finetune(
    base: dict[str, torch.Tensor], head: dict[str, torch.Tensor], task: str, seed: int, epochs: int, task_index: int
) -> dict[str, torch.Tensor]:
    model = _model_from(base, head)
    for p in model.head.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed * 1000 + 100 + task_index)
    x, y = task_data(task, seed, "train")
    model.train()
    _fit(model, model.backbone.parameters(), x, y, gen, epochs, FINETUNE_LR)
    return backbone_state(model.eval())


def task_arithmetic(
    base: dict[str, torch.Tensor], finetuned: list[dict[str, torch.Tensor]], alpha: float = 0.3
) -> dict[str, torch.Tensor]:
    """base + alpha * sum_t (theta_t - base): plain Task Arithmetic, in memory."""
    return {k: base[k] + alpha * sum(ft[k] - base[k] for ft in finetuned) for k in base}


def backbone_module(backbone: dict[str, torch.Tensor]) -> SuiteMLP:
    """The backbone alone, under the checkpoint's tensor names (`backbone.N.*`): what LOT's feature
    pass runs. The head is left out: it lives apart from the checkpoint and does not change the
    backbone's features."""
    first = backbone["backbone.0.weight"]
    model = SuiteMLP(hidden=first.shape[0], inputs=first.shape[1])
    model.head = nn.Identity()
    model.load_state_dict({k: v.float() for k, v in backbone.items()})
    return model.eval()


def lot_exemplars(task: str, seed: int, exemplars: int = LOT_EXEMPLARS, exemplar_seed: int = 0) -> torch.Tensor:
    """LOT's exemplars for a task: a seeded choice of `exemplars` rows of its train split."""
    from mergeflow.workers.methods.lot.models import subset

    x, _ = task_data(task, seed, "train")
    return x[subset(len(x), exemplars, exemplar_seed)]


def lot_task_model(checkpoint: str, task: str, exemplars: int, seed: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """LOT's model source for the suite (`method.model: mergeflow.dev.suite.models:lot_task_model`):
    the task's backbone and a seeded choice of its train inputs. The data seed is the suite's
    (suite.json next to the checkpoints); the task is named by the task or its checkpoint folder."""
    from mergeflow.errors import CheckpointError, ConfigError
    from mergeflow.workers.methods.lot.models import load_tensors

    meta = Path(checkpoint).parent / "suite.json"
    try:
        data_seed = int(json.loads(meta.read_text())["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"task {task!r}: the digits suite's model source needs its suite.json at {meta} "
            "(build the suite with `mergeflow suite build`)"
        ) from None
    transform = task if task in TRANSFORMS else Path(checkpoint).name
    if transform not in TRANSFORMS:
        raise ConfigError(
            f"task {task!r}: not a digits-suite task (name the task or its checkpoint folder "
            f"after one of {sorted(TRANSFORMS)[:4]}...)"
        )
    batches = [lot_exemplars(transform, data_seed, exemplars, seed)]
    try:
        return backbone_module(load_tensors(checkpoint, StorageOptions())), batches
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"task {task!r}: {checkpoint} is not a digits-suite backbone ({str(e).splitlines()[0]})"
        ) from None


LOT_MODEL = f"{__name__}:lot_task_model"


def lot_method(suite_dir: Path, tasks: list[str]) -> dict:
    """LOT / RegMean's model source for this suite: the backbone hook on each task's train inputs."""
    return {"model": LOT_MODEL}


# --------------------------------------------------------------------------- suite files


def _write_checkpoint(
    sd: dict[str, torch.Tensor], out: Path, hidden: int, head: dict[str, torch.Tensor] | None = None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "mergeflow-digits-mlp",
        "architectures": ["SuiteMLP"],
        "input_size": 64,
        "hidden_size": hidden,
        "num_hidden_layers": 3,
        "num_labels": N_CLASSES,
        "torch_dtype": "float32",
        "note": "backbone only; the task head is in head.safetensors next to this file",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if head is not None:
        save_file(head, str(out / "head.safetensors"), metadata={"format": "pt"})


def _settings(tasks: int, seed: int, hidden: int, epochs_scale: float) -> dict:
    return {
        "code_version": CODE_VERSION,
        "tasks": tasks,
        "seed": seed,
        "hidden": hidden,
        "epochs_scale": epochs_scale,
        "training": {
            "pretrain_epochs": PRETRAIN_EPOCHS,
            "probe_epochs": PROBE_EPOCHS,
            "finetune_epochs": FINETUNE_EPOCHS,
            "batch": BATCH,
            "pretrain_lr": PRETRAIN_LR,
            "probe_lr": PROBE_LR,
            "finetune_lr": FINETUNE_LR,
        },
    }


def build_suite(
    out_dir: Path,
    tasks: int = 8,
    seed: int = 0,
    *,
    hidden: int = 512,
    epochs_scale: float = 1.0,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    quiet: bool = True,  # the suites' common signature; this one trains in-process, without bars
) -> dict:
    """Write out_dir/base/, out_dir/<task>/ (model.safetensors = backbone, config.json, head.safetensors),
    out_dir/suite.json and out_dir/config.yaml (a tall_masks merge over the backbones). Returns suite.json's
    content. When suite.json already records the same settings (and every checkpoint is there), nothing is
    retrained (`force` rebuilds)."""
    import yaml

    out_dir = Path(out_dir)
    names = task_names(tasks)
    settings = _settings(tasks, seed, hidden, epochs_scale)
    meta_path = out_dir / "suite.json"
    if meta_path.exists() and not force:
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("settings") == settings and all(
            (out_dir / d / f).exists() for d in ["base", *names] for f in ("model.safetensors", "config.json")
        ):
            meta["cached"] = True
            return meta
    say = log or (lambda s: None)
    t0 = time.perf_counter()
    pre_epochs = max(1, round(PRETRAIN_EPOCHS * epochs_scale))
    ft_epochs = max(1, round(FINETUNE_EPOCHS * epochs_scale))
    probe_epochs = max(1, round(PROBE_EPOCHS * epochs_scale))
    with _deterministic():
        meta_path.unlink(missing_ok=True)  # written last: its presence means a complete suite
        base_model = _pretrain(hidden, seed, pre_epochs)
        base = backbone_state(base_model)
        _write_checkpoint(base, out_dir / "base", hidden)
        say(f"pretrained base ({pre_epochs} epochs) in {time.perf_counter() - t0:.1f}s")
        results, finetuned = {}, []
        for i, name in enumerate(names):
            head = _probe_head(base_model, name, seed, probe_epochs, i)
            ft = _finetune(base, head, name, seed, ft_epochs, i)
            _write_checkpoint(ft, out_dir / name, hidden, head)
            finetuned.append(ft)
            zs, fm = _model_from(base, head), _model_from(ft, head)
            results[name] = {
                split: {
                    "zero_shot": _accuracy(zs, *task_data(name, seed, split)),
                    "finetuned": _accuracy(fm, *task_data(name, seed, split)),
                }
                for split in ("val", "test")
            }
            say(
                f"{name}: zero-shot val {results[name]['val']['zero_shot']:.3f} -> "
                f"fine-tuned {results[name]['val']['finetuned']:.3f}"
            )
        merged = task_arithmetic(base, finetuned, 0.3)
        for name in names:
            head = load_file(str(out_dir / name / "head.safetensors"))
            for split in ("val", "test"):
                results[name][split]["task_arithmetic_0.3"] = _accuracy(
                    _model_from(merged, head), *task_data(name, seed, split)
                )
    build_seconds = time.perf_counter() - t0
    average = {
        split: {
            k: float(np.mean([results[n][split][k] for n in names]))
            for k in ("zero_shot", "finetuned", "task_arithmetic_0.3")
        }
        for split in ("val", "test")
    }
    sizes = {k: int(len(v)) for k, v in split_indices(seed).items()}
    meta = {
        "suite": "digits",
        "settings": settings,
        "seed": seed,
        "tasks": [{"name": n, "transform": TRANSFORMS[n][0]} for n in names],
        "splits": sizes,
        "epochs": {"pretrain": pre_epochs, "probe": probe_epochs, "finetune": ft_epochs},
        "evaluator": "mergeflow.dev.suite.models:evaluate",
        "accuracy": results,
        "average": average,
        "build_seconds": round(build_seconds, 2),
    }
    config = {
        "base": "base",
        "tasks": [{"name": n, "checkpoint": n} for n in names],
        "output": "run",
        "method": {"name": "tall_masks", "alpha": "auto", "lambda": "auto"},
        "selection": {"evaluator": "mergeflow.dev.suite.models:evaluate", "split": "val"},
    }
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    meta["cached"] = False
    return meta


@lru_cache(maxsize=64)
def _suite_seed(suite_json: str, mtime: float) -> int:
    return int(json.loads(Path(suite_json).read_text())["seed"])


def evaluate(
    backbone: dict[str, torch.Tensor] | Path | str,
    task: str,
    suite_dir: Path | str | None = None,
    split: str = "test",
    checkpoint: str | None = None,
) -> float:
    """Accuracy of `backbone` (a state dict, a .safetensors file or a checkpoint dir such as a merge run's
    model/) on `task`'s `split` ("val" or "test") of the suite in suite_dir, with the task's stored head.

    This is the suite's evaluator for `selection.evaluator: mergeflow.dev.suite.models:evaluate`: without
    suite_dir, the suite is the folder holding the task's checkpoint (`checkpoint`)."""
    if split not in ("val", "test", "train"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if suite_dir is None:
        if checkpoint is None:
            raise ValueError("evaluate: give suite_dir or the task's checkpoint")
        suite_dir = Path(checkpoint).parent
    suite_dir = Path(suite_dir)
    meta = suite_dir / "suite.json"
    seed = _suite_seed(str(meta), meta.stat().st_mtime)
    head = load_file(str(suite_dir / task / "head.safetensors"))
    with _deterministic():
        return _accuracy(_model_from(load_backbone(backbone), head), *task_data(task, seed, split))
