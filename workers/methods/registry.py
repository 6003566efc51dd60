"""Merge methods by name.

Built-in methods are the modules of this package (each registers itself with `@register` when
imported); they are imported on the first lookup. A method defined elsewhere (a plugin, a
notebook, a test) registers the same way, through `mergeflow.register_method`; the engine sends
the method object itself to the workers, so a plugin needs no installation on Ray nodes beyond
what its own code imports (workflows/runtime.py ships its module by value).
"""

from __future__ import annotations

import importlib
import pkgutil

from mergeflow.errors import ConfigError
from mergeflow.workers.methods.base import Method

METHODS: dict[str, Method] = {}
_NOT_METHODS = {"base", "registry"}
_builtins_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance of `cls` under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: a merge method needs a name")
    known = METHODS.get(cls.name)
    if known is not None and type(known).__qualname__ != cls.__qualname__:
        raise ValueError(f"merge method {cls.name!r} registered twice ({type(known).__module__} and {cls.__module__})")
    METHODS[cls.name] = cls()
    if not cls.__module__.startswith(f"{__package__}."):
        _PLUGIN_MODULES.add(cls.__module__)
    return cls


_PLUGIN_MODULES: set[str] = set()


def plugin_modules() -> set[str]:
    """Modules of methods registered from outside mergeflow (workflows/runtime.py ships them by value)."""
    return set(_PLUGIN_MODULES)


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


def methods() -> dict[str, Method]:
    """Every registered method, built-in ones included."""
    _load_builtins()
    return dict(METHODS)


def get_method(name: str) -> Method:
    _load_builtins()
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name: unknown merge method {name!r}; choose one of {sorted(METHODS)}") from None


def is_builtin(method: Method) -> bool:
    return type(method).__module__.startswith(f"{__package__}.")
