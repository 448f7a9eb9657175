"""One spec per model family, in one registry (optimum's OnnxConfig-per-model-type, ONNX
Runtime's ``MODEL_TYPES`` table).

Every module of this package (except ``base``, ``offline``, ``cli`` and private ones) defines
one family: a ``FamilySpec`` subclass decorated with ``@register``, or, for an open_clip family
that differs from the generic one only in its attributes and the configs it claims, a
declaration through ``_openclip.open_clip_family`` / ``timm_family``, which register it. The
registry discovers the modules on first use, so adding a family is adding one module; the
export's call sites (``sources_hf.build_towers``, ``sources_openclip``,
``fusion.attention_spec``, ``quant_graph.layer_of``) ask the registry instead of keeping their
own tables.

Importing this package does not import torch or open_clip.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import TYPE_CHECKING, Any

from clipfast.errors import ExportError
from clipfast.export.families.base import AttentionSpec, FamilySpec, TowerParts

if TYPE_CHECKING:
    from torch import nn

__all__ = ["AttentionSpec", "FamilySpec", "TowerParts", "all_families", "discover",
           "family_for_open_clip_name", "for_open_clip", "for_tower", "for_transformers",
           "get", "layer_regex", "register", "supported_model_types", "unregister"]

_NOT_FAMILIES = {"base", "offline", "cli"}
_REGISTRY: dict[str, FamilySpec] = {}
_DISCOVERED: set[str] = set()


def register(cls: type[FamilySpec]) -> type[FamilySpec]:
    """Class decorator: instantiate and register a family spec under ``cls.name``."""
    spec = cls()
    if not spec.name or spec.loader not in ("transformers", "open_clip"):
        raise ExportError(f"family spec {cls.__name__}: needs a name and a loader "
                          f"('transformers' or 'open_clip'), got {spec.name!r}, {spec.loader!r}")
    old = _REGISTRY.get(spec.name)
    if old is not None and type(old).__qualname__ != cls.__qualname__:
        raise ExportError(f"family {spec.name!r} is registered twice ({type(old).__module__} and "
                          f"{cls.__module__})")
    _REGISTRY[spec.name] = spec
    _layer_regex_cache.clear()
    return cls


def unregister(name: str) -> None:
    """Remove a family (tests that register throwaway families clean up with this)."""
    _REGISTRY.pop(name, None)
    _layer_regex_cache.clear()


def discover() -> None:
    """Import every family module of this package not imported yet (all ``__path__`` entries,
    so a directory appended to ``__path__`` contributes its modules too)."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name in _NOT_FAMILIES or mod.name.startswith("_") or mod.name in _DISCOVERED:
            continue
        importlib.import_module(f"{__name__}.{mod.name}")
        _DISCOVERED.add(mod.name)


def all_families() -> list[FamilySpec]:
    discover()
    return sorted(_REGISTRY.values(), key=lambda s: (s.loader, s.name))


def get(name: str) -> FamilySpec:
    discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ExportError(f"unknown model family {name!r}; known: "
                          f"{', '.join(sorted(_REGISTRY))}") from None


def _best(candidates: list[FamilySpec]) -> FamilySpec | None:
    return max(candidates, key=lambda s: s.priority) if candidates else None


def supported_model_types() -> tuple[str, ...]:
    """transformers ``model_type`` values some family builds, sorted."""
    discover()
    return tuple(sorted({t for s in _REGISTRY.values() for t in s.model_types}))


def for_transformers(model_type: str, config: Any = None, name: str = "") -> FamilySpec:
    """The family that builds a transformers model of ``model_type`` (``name``: hub id or
    directory, for families told apart by name, e.g. MetaCLIP v1 repos of model_type clip)."""
    discover()
    spec = _best([s for s in _REGISTRY.values() if s.loader == "transformers"
                  and s.claims_transformers(model_type, config, name)])
    if spec is None:
        raise ExportError(f"transformers model_type {model_type!r} is not supported; supported "
                          f"model types: {', '.join(supported_model_types())}")
    return spec


def for_open_clip(model_name: str, cfg: dict[str, Any] | None) -> FamilySpec:
    """The family of an open_clip config (the generic open_clip family when no specific one
    claims it)."""
    discover()
    cfg = cfg or {}
    spec = _best([s for s in _REGISTRY.values() if s.loader == "open_clip"
                  and s.claims_open_clip(model_name, cfg)])
    if spec is None:
        raise ExportError(f"no model family claims open_clip config {model_name!r}")
    return spec


def family_for_open_clip_name(model_name: str) -> str:
    """Family name of a registered open_clip config (``open_clip.get_model_config``)."""
    import open_clip

    base = model_name.split("@", 1)[0]
    return for_open_clip(base, open_clip.get_model_config(model_name)).name


def for_tower(tower: nn.Module) -> FamilySpec | None:
    """The family that built a SourceModel tower, or None."""
    discover()
    return _best([s for s in _REGISTRY.values() if s.owns_tower(tower)])


_layer_regex_cache: list[re.Pattern[str]] = []


def layer_regex() -> re.Pattern[str]:
    """One regex for the block names of every registered family ("resblocks.3", "layers.3",
    "blocks.3", ...) in exported node names; longer names are tried first."""
    if not _layer_regex_cache:
        discover()
        names = sorted({n for s in _REGISTRY.values() for n in s.layer_names},
                       key=lambda n: (-len(n), n))
        _layer_regex_cache.append(
            re.compile(r"(?:" + "|".join(map(re.escape, names)) + r")[./_]\d+(?=[./_]|$)"))
    return _layer_regex_cache[0]
