"""The merge config: frozen pydantic models, validated once at the edge.

YAML (and so JSON) in, typed objects out. Unknown keys and wrong types are errors
that name the key. Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeflow.infra.storage import StorageOptions, is_s3, normalize
from mergeflow.errors import ConfigError
from mergeflow.workers.methods import METHODS, MethodParams, get_method

# \Z, not $: "$" also matches before a trailing newline, and task names become file names
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(value: int | str) -> int:
    """`1GiB`, `512MB`, `1048576` -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB or 2GB)")
    unit = (m.group(2) or "").upper().rstrip("B")
    return int(float(m.group(1)) * _UNITS[unit])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TaskConfig(_Model):
    name: str
    checkpoint: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TASK_NAME.fullmatch(v):
            raise ValueError(f"task name {v!r} must be letters, digits, '.', '_' or '-' (it names files)")
        return v


AUTO = "auto"
DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_LAMBDA = 0.4  # TALL masks / consensus, when lambda is not given
LAMBDA_METHODS = ("tall_masks", "consensus")  # methods whose per-task masks take a lambda


class MethodConfig(_Model):
    name: str
    alpha: float | Literal["auto"] | None = None
    density: float = 0.2
    scope: Literal["global", "tensor"] = "global"
    merge: Literal["mean", "sum"] | None = None
    # None: 0.4 for TALL masks / consensus, 1.0 for LOT (its model scale)
    lambda_: float | dict[str, float] | Literal["auto"] | None = Field(None, alias="lambda")
    base_merge: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    k: int = 2
    store_dtype: Literal["base", "float32"] = "base"
    # LOT (lambda is its model scale, default 1.0)
    model: str | None = None  # suite | hf | module:function (workers/lot/models.py)
    exemplars: int = 64
    exemplar_seed: int = 0
    exemplar_files: dict[str, str] | None = None  # hf: task -> token-id JSON file
    stats_cache: str | None = None  # default OUTPUT/.lot_stats; a shared place lets re-merges reuse it

    @field_validator("exemplars")
    @classmethod
    def _exemplars(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown merge method {v!r}; choose one of {sorted(METHODS)}")
        return v

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("k")
    @classmethod
    def _k(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("lambda_")
    @classmethod
    def _lambda(cls, v):
        if v is None or v == AUTO:
            return v
        values = v.values() if isinstance(v, dict) else [v]
        if any(not math.isfinite(x) or x < 0 for x in values):
            raise ValueError("lambda values must be finite and >= 0")
        return v


# Elements per task per compute step when the config does not say. On a CPU the T task rows
# of a chunk (T x chunk float32, ~8 MiB here) stay in the last-level cache between the dozen
# element-wise passes a method makes over them: measured 1.5-2x faster than 4M-element chunks.
# A GPU wants large chunks to amortise kernel launches and transfers.
CPU_CHUNK_FLOATS = 1 << 21
CPU_MIN_CHUNK = 1 << 16
GPU_CHUNK = 1 << 22


class ExecutionConfig(_Model):
    shard_size: int | str = "auto"  # input bytes per Ray task; "auto" sizes from the model
    chunk_elems: int = 1 << 18  # elements per task per compute step: memory is O(T x chunk); see chunk_for
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray_address: str | None = None
    # delta/: the unscaled merged vector in float32 (4 bytes per parameter, twice a bf16 model). "auto":
    # `mergeflow remerge` keeps it for Task Arithmetic, whose next re-merge adds new tasks to it.
    keep_delta: Literal["auto"] | bool = "auto"
    # Reuse input sha256 recorded by an earlier run on this machine when the file's size and
    # mtime (S3: size and ETag) are unchanged (infra/hash_cache.py).
    hash_cache: bool = True

    @field_validator("shard_size")
    @classmethod
    def _shard_size(cls, v):
        if v == "auto":
            return v
        size = parse_size(v)
        if size <= 0:
            raise ValueError("must be positive")
        return size

    @field_validator("chunk_elems")
    @classmethod
    def _chunk(cls, v: int) -> int:
        if v < 8:
            raise ValueError("must be at least 8")
        return v - v % 8  # masks are packed 8 to a byte: chunks must not split a byte

    def chunk_for(self, device: str, tasks: int) -> int:
        """chunk_elems as configured, or when it was not set, sized for the device and task count."""
        if "chunk_elems" in self.model_fields_set:
            return self.chunk_elems
        if device == "cuda":
            return GPU_CHUNK
        chunk = max(CPU_MIN_CHUNK, CPU_CHUNK_FLOATS // max(tasks, 1))
        return chunk - chunk % 8


class StorageConfig(_Model):
    endpoint_url: str | None = None  # for S3-compatible stores (MinIO, Ceph, SeaweedFS)
    region: str | None = None

    def options(self) -> StorageOptions:
        return StorageOptions(self.endpoint_url, self.region)


class SelectionConfig(_Model):
    """How `alpha: auto` / `lambda: auto` pick their values: on validation data, with the user's evaluator."""

    evaluator: str  # "package.module:function", see workers/evaluation.py for the contract
    split: str = "val"
    options: dict = {}  # keyword arguments passed to the evaluator
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS

    @field_validator("evaluator")
    @classmethod
    def _evaluator(cls, v: str) -> str:
        module, sep, fn = v.partition(":")
        if not (sep and module and fn):
            raise ValueError(f"{v!r} must look like 'package.module:function'")
        return v

    @field_validator("alphas", "lambdas")
    @classmethod
    def _grid(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not math.isfinite(x) or x < 0 for x in v):
            raise ValueError("must be a non-empty list of finite numbers >= 0")
        return v


class MergeConfig(_Model):
    base: str
    tasks: list[TaskConfig] = []
    tasks_from: str | None = None  # a folder or s3:// prefix whose sub-folders are task checkpoints
    output: str | None = None
    method: MethodConfig
    selection: SelectionConfig | None = None
    execution: ExecutionConfig = ExecutionConfig()
    storage: StorageConfig = StorageConfig()

    @property
    def select_alpha(self) -> bool:
        # LOT's lambda is its model scale, so `lambda: auto` there is alpha selection
        return self.method.alpha == AUTO or (self.method.name == "lot" and self.method.lambda_ == AUTO)

    @property
    def select_lambda(self) -> bool:
        return self.method.lambda_ == AUTO and self.method.name in LAMBDA_METHODS

    @model_validator(mode="after")
    def _tasks(self) -> "MergeConfig":
        if not self.tasks and self.tasks_from is None:
            raise ValueError("tasks: give at least one task (or tasks_from: a folder of task checkpoints)")
        seen: set[str] = set()
        for t in self.tasks:
            if t.name in seen:
                raise ValueError(f"tasks: duplicate task name {t.name!r}")
            seen.add(t.name)
        if (self.select_alpha or self.select_lambda) and self.selection is None:
            key = "alpha" if self.method.alpha == AUTO else "lambda"
            raise ValueError(f"method.{key}: auto needs a `selection:` section naming an evaluator "
                             "(selection: {evaluator: 'package.module:function'})")
        lam = self.method.lambda_
        if self.method.name == "lot":
            _check_lot(self.method, seen if self.tasks_from is None else None)
        elif isinstance(lam, dict) and self.tasks_from is None:  # discovered tasks are checked once resolved
            unknown = sorted(set(lam) - seen)
            missing = [t.name for t in self.tasks if t.name not in lam]
            if unknown:
                raise ValueError(f"method.lambda: names unknown task {unknown[0]!r}")
            if missing:
                raise ValueError(f"method.lambda: no value for task {missing[0]!r} (give every task one)")
        return self

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def method_params(self) -> MethodParams:
        m = self.method
        merge = m.merge or "mean"
        alpha = m.alpha
        lot: dict = {}
        if m.name == "lot":
            # LOT's lambda scales the merged vector: it is this method's alpha (default 1.0, the paper's)
            alpha = m.lambda_ if m.lambda_ is not None else (1.0 if alpha is None else alpha)
            files = m.exemplar_files or {}
            lot = {"exemplars": m.exemplars, "exemplar_seed": m.exemplar_seed, "model": m.model,
                   "exemplar_files": tuple(files[n] for n in self.task_names) if files else ()}
        if alpha is None:
            # A mean (plain TIES) is already on the scale of one task vector; sums of T vectors need scaling down.
            alpha = 1.0 if (m.name == "ties" and merge == "mean") else 0.3
        elif alpha == AUTO:
            alpha = 1.0  # stands in until selection picks one; no model is written with it
        lam = DEFAULT_LAMBDA if m.lambda_ is None else m.lambda_
        if lam == AUTO:
            lam = self.selection.lambdas[0] if self.selection else DEFAULT_LAMBDAS[0]  # likewise replaced
        lambdas = tuple(lam[n] for n in self.task_names) if isinstance(lam, dict) else (lam,) * len(self.tasks)
        get_method(m.name)
        return MethodParams(
            name=m.name,
            alpha=float(alpha),
            density=m.density,
            scope=m.scope,
            merge=merge,
            lambdas=tuple(float(x) for x in lambdas),
            base_merge=m.base_merge,
            k=m.k,
            store_dtype=m.store_dtype,
            **lot,
        )


def _check_lot(m: MethodConfig, tasks: set[str] | None) -> None:
    """`tasks` None: tasks are discovered later (tasks_from) and checked once resolved."""
    if isinstance(m.lambda_, dict):
        raise ValueError("method.lambda: LOT takes one number (the scale of the merged vector)")
    if m.alpha is not None and m.lambda_ is not None and m.alpha != m.lambda_:
        raise ValueError("method.alpha: LOT's scale is method.lambda; give one of the two")
    if not m.model:
        raise ValueError("method.model: LOT runs each task's model on its exemplars; give suite, hf or module:function")
    if m.model == "hf" and tasks is not None:
        files = m.exemplar_files or {}
        missing = sorted(tasks - set(files))
        if missing:
            raise ValueError(f"method.exemplar_files: no token-id file for task {missing[0]!r} (model hf needs one per task)")
        unknown = sorted(set(files) - tasks)
        if unknown:
            raise ValueError(f"method.exemplar_files: names unknown task {unknown[0]!r}")


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "lambda_") or "config"
    if "lambda_" in [str(p) for p in first["loc"]]:
        loc = ".".join([*(str(p) for p in first["loc"] if p != "lambda_"), "lambda"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see `mergeflow merge --help`)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    return f"{source}: {loc}: {msg}" if loc != "config" else f"{source}: {msg}"


def _resolve(path: str, root: Path) -> str:
    if is_s3(path):
        return path.rstrip("/")
    p = Path(path).expanduser()
    return normalize(str(p if p.is_absolute() else root / p))


def load_config(path: str | Path, output: str | None = None) -> MergeConfig:
    """Read and validate a YAML/JSON config; `output` overrides the file's `output`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping with base, tasks, method")
    return config_from_dict(raw, source=str(path), root=path.parent, output=output)


def config_from_dict(raw: dict, source: str = "config", root: Path | None = None, output: str | None = None) -> MergeConfig:
    root = (root or Path.cwd()).resolve()
    try:
        cfg = MergeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None
    if output:  # from the command line: relative to the working directory
        out = output if is_s3(output) else normalize(output)
    elif cfg.output:  # from the file: relative to the file, like every other path in it
        out = _resolve(cfg.output, root)
    else:
        raise ConfigError(f"{source}: output: required key is missing (or pass --output DIR)")
    method = cfg.method
    if method.exemplar_files or method.stats_cache:
        method = method.model_copy(update={
            "exemplar_files": {k: _resolve(v, root) for k, v in (method.exemplar_files or {}).items()} or None,
            "stats_cache": _resolve(method.stats_cache, root) if method.stats_cache else None,
        })
    return cfg.model_copy(
        update={
            "method": method,
            "base": _resolve(cfg.base, root),
            "tasks": [t.model_copy(update={"checkpoint": _resolve(t.checkpoint, root)}) for t in cfg.tasks],
            "tasks_from": _resolve(cfg.tasks_from, root) if cfg.tasks_from else None,
            "output": out.rstrip("/"),
        }
    )
