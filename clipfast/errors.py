"""Exceptions raised by clipfast. Every message names the input and the problem."""

from __future__ import annotations


class ClipfastError(Exception):
    """Base class of every error clipfast raises on purpose."""


class ArtifactError(ClipfastError):
    """An artifact directory is missing, incomplete, tampered with or of another format."""


class InputError(ClipfastError, ValueError):
    """A user input (image, text, argument) cannot be used.

    ``index`` is the position of the offending item in the batch (or None), ``item`` a short
    printable description of it (a path, a type name, a truncated string).
    """

    def __init__(self, message: str, *, index: int | None = None, item: str | None = None):
        super().__init__(message)
        self.index = index
        self.item = item


class ImageLoadError(InputError):
    """One image of a batch could not be decoded or converted."""


class TextInputError(InputError):
    """One text of a batch is not a string."""


class BackendUnavailable(ClipfastError):
    """A backend cannot run here; the message says what is missing and how to get it."""


class ExportError(ClipfastError):
    """Exporting a model failed; the message names the stage and the cause."""


class FidelityError(ClipfastError):
    """Measured fidelity is below the gate for the requested precision."""
