"""Small shared names with no dependencies inside clipfast: modules that need them import them
from here, not from each other (the CLI, the bench and the export side all list image files; the
Engine and the GPU preprocessing both report per-item failures as ``Failure``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# File suffixes taken as images when a folder is listed (files with other suffixes are sniffed).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif",
                            ".tif", ".tiff"})


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, with an ``s`` unless ``n`` is 1 ("1 file", "3 files", "0 files")."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass
class Failure:
    """One input that could not be used: its batch position, a short description, the reason."""

    index: int
    item: str
    error: str


@dataclass
class BatchResult:
    """What ``errors="skip"`` returns: the rows that worked and the inputs that did not.

    embeddings: float32 ``(M, D)`` for the M good inputs, in input order.
    indices: int64 ``(M,)`` position of each row in the input batch.
    failures: one Failure per bad input.
    """

    embeddings: np.ndarray
    indices: np.ndarray
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def lazy_exports(package: str, exports: dict[str, str], *, needs: tuple[str, str] | None = None):
    """``(__getattr__, __dir__)`` for a package whose names are imported from their modules on
    first use (PEP 562), so that importing the package (``clipfast --help`` imports every
    front end's CLI) pulls in none of its heavy dependencies. ``exports``: name -> module.
    ``needs``: (top-level module, extra); an ImportError of that module names the extra to
    install instead of failing deep inside it."""
    import importlib

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError as e:
            if needs is None or (e.name or "").split(".")[0] != needs[0]:
                raise
            raise ImportError(f"{package}.{name} needs {needs[0]}: pip install "
                              f"'clipfast[{needs[1]}]' ({e})") from e

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
