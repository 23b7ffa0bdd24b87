"""The tables that samplers, objectives, model families, recipes and modalities register into.

Each entry is registered where it is defined, with a decorator::

    from ditkit.registry import SAMPLERS

    @SAMPLERS.register("euler_a", family="flow", summary="Euler ancestral (k-diffusion)")
    def euler_ancestral(velocity, x, ts, *, generator=None, callback=None): ...

and everything that lists or dispatches on them (the config's allowed values, the CLI's
``choices``, the pipelines, docs/reference.md) reads the table. A table fills on its first lookup:
``SAMPLERS.names()`` imports every module in ``ditkit/samplers/`` first (``import_submodules``), so
a new file registers itself with no other edit.

This module imports only ``ditkit.errors`` (no torch), so ``models/``, ``samplers/`` and
``diffusion/`` may import it without breaking the layering (tests/test_layering.py).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from ditkit.errors import ConfigError

__all__ = [
    "Entry", "Registry", "SAMPLERS", "OBJECTIVES", "MODEL_FAMILIES", "MODEL_BUILDERS", "RECIPES", "PIPELINES", "COMMANDS",
    "import_submodules",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing: its ``name``, the object (function or class), a one-line ``summary``
    and free-form ``meta`` (e.g. a sampler's ``family`` and ``options``)."""

    name: str
    obj: T
    summary: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:  # entry.family reads meta["family"]
        try:
            return self.meta[key]
        except KeyError:
            raise AttributeError(key) from None


class Registry(Generic[T]):
    """A named table. ``kind`` names the things in messages ("sampler"); ``package`` is imported
    before any lookup so that every module that registers into the table has run."""

    def __init__(self, kind: str, package: Optional[str] = None, flag: Optional[str] = None) -> None:
        self.kind = kind
        self.package = package
        self.flag = flag or f"--{kind.replace(' ', '-')}"
        self._entries: dict[str, Entry[T]] = {}
        self._loading = False

    def register(self, name: str, *, summary: str = "", **meta: Any) -> Callable[[T], T]:
        """Decorator: add ``obj`` under ``name``. The summary defaults to the first line of the
        docstring. Registering a taken name raises ``ValueError`` (two definitions of one thing)."""

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            self._entries[name] = Entry(name, obj, summary or (doc[0] if doc else ""), dict(meta))
            return obj

        return add

    def _load(self) -> None:
        if self.package and not self._loading:
            self._loading = True  # importing the package may look names up while it registers
            try:
                package = importlib.import_module(self.package)
                if hasattr(package, "__path__"):
                    import_submodules(self.package, package.__path__)
            finally:
                self._loading = False

    def get(self, name: str, **where: Any) -> Entry[T]:
        """The entry ``name``; ``ConfigError`` naming the flag and the choices (those matching
        ``where``, e.g. ``family="gaussian"``) when it is unknown or does not match."""
        self._load()
        choices = self.names(**where)
        entry = self._entries.get(name)
        if entry is None or name not in choices:
            close = difflib.get_close_matches(name, choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            listed = ", ".join(choices) or "(none)"
            if entry is None:
                raise ConfigError(f"unknown {self.kind} {name!r} ({self.flag}){hint}; choose one of: {listed}")
            raise ConfigError(f"{self.flag} {name} does not fit here{hint}: choose one of {listed}")
        return entry

    def names(self, **where: Any) -> list[str]:
        """Registered names (in registration order) whose meta matches every ``where`` item; a
        meta value that is a tuple/list/set matches when it contains the wanted value."""
        self._load()
        return [e.name for e in self._entries.values() if all(_matches(e.meta.get(k), v) for k, v in where.items())]

    def entries(self, **where: Any) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names(**where)]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def _matches(have: Any, want: Any) -> bool:
    if isinstance(have, (tuple, list, set, frozenset)):
        return want in have
    return have == want


def import_submodules(package_name: str, package_path: Any) -> None:
    """Import every module of a package (its ``__path__``; names starting with ``_`` excepted), so
    that each registers its entries: a new file in the folder needs no other edit."""
    import pkgutil

    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")


# ---- the tables --------------------------------------------------------------------------------
# samplers: meta family (the objective family whose denoiser it takes: "gaussian", "flow", "edm",
# "masked", "autoregressive") and options (names of the keyword options it accepts, e.g. ("eta",)).
SAMPLERS: Registry[Callable[..., Any]] = Registry("sampler", "ditkit.samplers")
# objectives: classes with from_config(cfg) -> objective; meta modality ("image" | "text" | ...)
# and family (the sampler family their denoiser serves).
OBJECTIVES: Registry[Any] = Registry("objective", "ditkit.diffusion", flag="objective.kind")
# model families: meta presets (dict preset name -> kwargs) and modality.
MODEL_FAMILIES: Registry[Any] = Registry("model family", "ditkit.models", flag="--model")
# recipes: functions returning a full Config.
RECIPES: Registry[Callable[[], Any]] = Registry("recipe", "ditkit.recipes")
# pipelines: one class per modality ("image", "text", ...), from_checkpoint(...).
PIPELINES: Registry[Any] = Registry("modality", "ditkit.pipelines")
# model builders: functions kwargs(cfg) -> constructor kwargs of a model family (same names as
# MODEL_FAMILIES); they read the config, so they live in ditkit.builders, not in models/.
MODEL_BUILDERS: Registry[Callable[..., Any]] = Registry("model builder", "ditkit.builders", flag="--model")
# CLI commands: functions register(subparsers) that add one subcommand.
COMMANDS: Registry[Callable[..., Any]] = Registry("command", "ditkit.cli")
