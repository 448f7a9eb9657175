"""Backends: one module each behind one small protocol (see ``base.Backend``).

``auto`` tries them in ``AUTO_ORDER`` and records why each skipped one was skipped.
"""

from __future__ import annotations

import importlib

from clipfast.backends.base import Backend
from clipfast.errors import BackendUnavailable, ClipfastError

AUTO_ORDER = ("onnxruntime", "torch")
_MODULES = {
    "onnxruntime": "clipfast.backends.onnxruntime",
    "torch": "clipfast.backends.torch",
}


def available_backends() -> tuple[str, ...]:
    return tuple(_MODULES)


def load_backend(name: str, manifest, device: str, **options) -> Backend:
    """Instantiate backend ``name``; raises BackendUnavailable saying what is missing."""
    if name not in _MODULES:
        raise ClipfastError(
            f"backend {name!r} is unknown; choose one of: auto, {', '.join(_MODULES)}"
        )
    module = importlib.import_module(_MODULES[name])
    return module.load(manifest, device=device, **options)


def resolve_backend(name: str, manifest, device: str, *, fallback: bool = True, **options
                    ) -> tuple[Backend, list[tuple[str, str]]]:
    """Return ``(backend, fallbacks)`` where fallbacks lists ``(skipped_backend, reason)``."""
    if name != "auto":
        return load_backend(name, manifest, device, **options), []
    skipped: list[tuple[str, str]] = []
    for candidate in AUTO_ORDER:
        try:
            return load_backend(candidate, manifest, device, **options), skipped
        except BackendUnavailable as e:
            if not fallback:
                raise
            skipped.append((candidate, str(e)))
    reasons = "; ".join(f"{n}: {r}" for n, r in skipped)
    raise BackendUnavailable(f"no backend can run this artifact on {device!r}: {reasons}")


__all__ = ["AUTO_ORDER", "Backend", "available_backends", "load_backend", "resolve_backend"]
