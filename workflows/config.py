"""The merge config: frozen pydantic models, validated once at the edge.

YAML (and so JSON) in, typed objects out. Unknown keys and wrong types are errors
that name the key. Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from mergeflow.errors import ConfigError, MergeflowError
from mergeflow.infra.storage import StorageOptions, is_local, normalize
from mergeflow.workers import chunking
from mergeflow.workers.methods import Method, get_method, methods

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


def _field_name(key: str) -> str:
    return key + "_" if keyword.iskeyword(key) else key  # `lambda` is a Python keyword: params use lambda_


def _key_name(field_name: str) -> str:
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


def parse_params(method: Method, raw: dict) -> Any:
    """The method's own parameters from the config's `method:` block (less `name`), validated by
    pydantic against the method's Params dataclass. ValueError("key: what is wrong") otherwise."""
    fields = [f.name for f in dataclasses.fields(method.Params)]
    values = {}
    for key, value in raw.items():
        name = _field_name(str(key))
        if name not in fields:
            known = ", ".join(_key_name(f) for f in fields)
            raise ValueError(f"{key}: unknown key for method {method.name} (its parameters: {known or 'none'})")
        values[name] = value
    try:
        return _adapter(method.Params).validate_python(values)
    except ValidationError as e:
        first = e.errors()[0]
        loc = _key_name(str(first["loc"][0])) if first["loc"] else ""  # the key, not pydantic's union branch
        msg = first["msg"].removeprefix("Value error, ")
        raise ValueError(f"{loc}: {msg}" if loc and not msg.startswith(f"{loc}:") else msg) from None


_adapters: dict[type, TypeAdapter] = {}


def _adapter(params_type: type) -> TypeAdapter:
    if params_type not in _adapters:
        _adapters[params_type] = TypeAdapter(params_type)
    return _adapters[params_type]


class MethodChoice(BaseModel):
    """The config's `method:` block: a registered method's name and its validated parameters."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    params: Any

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, raw):
        if isinstance(raw, MethodChoice):
            return raw
        if not isinstance(raw, dict):
            raise ValueError("must be a mapping: {name: METHOD, ...its parameters}")
        if set(raw) == {"name", "params"} and dataclasses.is_dataclass(raw["params"]):
            return raw  # already parsed
        if "name" not in raw:
            raise ValueError(f"name: required key is missing (one of {sorted(methods())})")
        try:
            method = get_method(str(raw["name"]))
        except MergeflowError as e:
            raise ValueError(str(e).removeprefix("method.")) from None
        return {"name": method.name, "params": parse_params(method, {k: v for k, v in raw.items() if k != "name"})}

    @model_serializer
    def _dump(self) -> dict:
        return {
            "name": self.name,
            **{_key_name(f.name): getattr(self.params, f.name) for f in dataclasses.fields(self.params)},
        }

    @property
    def method(self) -> Method:
        return get_method(self.name)

    def auto(self) -> list[str]:
        """The config keys set to auto: chosen on validation data."""
        m = self.method
        return [_key_name(k) for k in (m.scale, *m.selectable) if getattr(self.params, k, None) == AUTO]


class ExecutionConfig(_Model):
    shard_size: int | str = "auto"  # input bytes per Ray task; "auto" sizes from the model
    chunk_elems: int = chunking.DEFAULT_CHUNK  # elements per task per compute step: memory is O(T x chunk)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray_address: str | None = None
    # delta/: the unscaled merged vector in float32 (4 bytes per parameter, twice a bf16 model). "auto":
    # `mergeflow remerge` keeps it for Task Arithmetic, whose next re-merge adds new tasks to it.
    keep_delta: Literal["auto"] | bool = "auto"
    # Reuse input sha256 recorded by an earlier run on this machine when the file's size and
    # mtime (S3: size and ETag) are unchanged (infra/hash_cache.py).
    hash_cache: bool = True
    # model/ as one model.safetensors when the merged weights fit (transformers' default shard size),
    # else an indexed set of parts, one per shard; 0: always parts.
    max_file_size: int | str = 5 * 10**9  # 5GB

    @field_validator("max_file_size")
    @classmethod
    def _max_file_size(cls, v):
        size = parse_size(v)
        if size < 0:
            raise ValueError("must be a size (e.g. 5GB), or 0 for parts always")
        return size

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
        return chunking.chunk_for(device, tasks)


class StorageConfig(_Model):
    endpoint_url: str | None = None  # for S3-compatible stores (MinIO, Ceph, SeaweedFS)
    region: str | None = None

    def options(self) -> StorageOptions:
        from mergeflow.infra.storage import registered

        return StorageOptions(self.endpoint_url, self.region, plugins=registered())


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


class RegisterConfig(_Model):
    """A version of an MLflow registered model per merge, whose source is the run's model/."""

    name: str
    alias: str | None = "candidate"  # moved to the new version (after the gate, when there is one)
    copy_weights: bool = False  # also upload model/ as run artifacts (and make that the source)


class TrackingConfig(_Model):
    register_: RegisterConfig | None = Field(None, alias="register")  # `register` would shadow BaseModel's


class GateConfig(_Model):
    """When a re-merge may replace the published one: scored against its parent on validation data."""

    max_task_drop: float = 0.005  # per task, in the evaluator's units (0.5 point of an accuracy in [0, 1])
    mean_must_not_drop: bool = True
    split: str = "val"
    evaluator: str | None = None  # default: selection.evaluator
    options: dict | None = None  # default: selection.options

    @field_validator("max_task_drop")
    @classmethod
    def _drop(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError("must be a finite number >= 0")
        return v


class LoraOutConfig(_Model):
    """`output: {format: lora, rank: R | energy: E | concat: true}`: model/ also written as a PEFT
    adapter (lora/)."""

    rank: int | None = None  # singular triplets kept per weight (a cap when energy is given too)
    energy: float | None = None  # or the fewest whose squared singular values reach this fraction
    concat: bool = False  # Task Arithmetic over adapters: the tasks' factors side by side, no SVD

    @field_validator("rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be a positive integer")
        return v

    @field_validator("energy")
    @classmethod
    def _energy(cls, v: float | None) -> float | None:
        if v is not None and not (0 < v <= 1):
            raise ValueError("must be in (0, 1]: the fraction of each weight's squared singular values kept")
        return v

    @model_validator(mode="after")
    def _some(self) -> LoraOutConfig:
        if self.concat and (self.rank is not None or self.energy is not None):
            raise ValueError("concat: the concatenated adapter keeps every task's rank; drop rank and energy")
        if not self.concat and self.rank is None and self.energy is None:
            raise ValueError(
                "format lora needs a rank (e.g. rank: 16), an energy fraction (e.g. energy: 0.99) or "
                "concat: true (Task Arithmetic over adapters, exact)"
            )
        return self


OUTPUT_FORMATS = ("model", "lora")


class MergeConfig(_Model):
    base: str
    tasks: list[TaskConfig] = []
    tasks_from: str | None = None  # a folder or s3:// prefix whose sub-folders are task checkpoints
    output: str | None = None
    lora_out: LoraOutConfig | None = None  # from `output: {path, format: lora, ...}`
    method: MethodChoice
    selection: SelectionConfig | None = None
    execution: ExecutionConfig = ExecutionConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    gate: GateConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _output_spec(cls, data: Any) -> Any:
        """`output` is a location, or a mapping {path, format: model | lora, rank, energy}."""
        if not isinstance(data, dict) or not isinstance(data.get("output"), dict):
            return data
        spec = dict(data["output"])
        fmt = spec.pop("format", "model")
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output.format: must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
        path = spec.pop("path", None)
        if path is not None and not isinstance(path, str):
            raise ValueError("output.path: must be a folder or an s3:// (or other store's) URI")
        if fmt == "model" and spec:
            raise ValueError(f"output.{next(iter(spec))}: unknown key for format model (rank and energy are lora's)")
        return {**data, "output": path} | ({"lora_out": spec} if fmt == "lora" else {})

    @property
    def select_scale(self) -> bool:
        """The model scale (alpha; LOT's lambda) is chosen on validation data after the map."""
        m = self.method
        return getattr(m.params, m.method.scale) == AUTO

    @model_validator(mode="after")
    def _tasks(self) -> MergeConfig:
        if not self.tasks and self.tasks_from is None:
            raise ValueError("tasks: give at least one task (or tasks_from: a folder of task checkpoints)")
        seen: set[str] = set()
        for t in self.tasks:
            if t.name in seen:
                raise ValueError(f"tasks: duplicate task name {t.name!r}")
            seen.add(t.name)
        auto = self.method.auto()
        if auto and self.selection is None:
            raise ValueError(
                f"method.{auto[0]}: auto needs a `selection:` section naming an evaluator "
                "(selection: {evaluator: 'package.module:function'})"
            )
        if self.gate is not None and not (self.gate.evaluator or self.selection):
            raise ValueError("gate: needs an evaluator (gate.evaluator, or selection.evaluator)")
        if self.tasks_from is None:  # discovered tasks are checked once resolved
            try:
                self.method.method.check(self.method.params, self.task_names)
            except ValueError as e:
                raise ValueError(f"method.{e}") from None
        return self

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int) or p) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see `mergeflow merge --help`)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif loc == "method" and (m := re.match(r"^([\w.]+): (.*)$", msg)):  # the method's own key, named by it
        loc, msg = f"method.{m.group(1)}", m.group(2)
    return f"{source}: {loc}: {msg}" if loc != "config" else f"{source}: {msg}"


def _resolve(path: str, root: Path) -> str:
    if not is_local(path):  # an object store's URI is absolute as it is
        return normalize(path)
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


def config_from_dict(
    raw: dict, source: str = "config", root: Path | None = None, output: str | None = None
) -> MergeConfig:
    root = (root or Path.cwd()).resolve()
    try:
        cfg = MergeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None
    if output:  # from the command line: relative to the working directory
        out = normalize(output)
    elif cfg.output:  # from the file: relative to the file, like every other path in it
        out = _resolve(cfg.output, root)
    else:
        raise ConfigError(f"{source}: output: required key is missing (or pass --output DIR)")
    method = cfg.method
    paths = {}
    for name in method.method.path_params:  # relative to the config file, like every other path in it
        value = getattr(method.params, name)
        if isinstance(value, dict):
            paths[name] = {k: _resolve(v, root) for k, v in value.items()}
        elif value:
            paths[name] = _resolve(value, root)
    if paths:
        method = MethodChoice(name=method.name, params=dataclasses.replace(method.params, **paths))
    return cfg.model_copy(
        update={
            "method": method,
            "base": _resolve(cfg.base, root),
            "tasks": [t.model_copy(update={"checkpoint": _resolve(t.checkpoint, root)}) for t in cfg.tasks],
            "tasks_from": _resolve(cfg.tasks_from, root) if cfg.tasks_from else None,
            "output": out.rstrip("/"),
        }
    )
