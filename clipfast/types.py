"""Small shared names with no dependencies inside clipfast: modules that need them import them
from here, not from each other (the CLI, the bench and the export side all list image files)."""

from __future__ import annotations

# File suffixes taken as images when a folder is listed (files with other suffixes are sniffed).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif",
                            ".tif", ".tiff"})
