"""Image files in a folder: the one listing ``clipfast encode`` and ``clipfast embed`` share.

Order: a depth-first walk with each folder's entries sorted by name and subfolders entered where
they sort, i.e. paths sorted by their components (``sorted(paths, key=Path)``), independent of
the filesystem's own order (``os.walk`` and ``scandir`` return whatever the filesystem does).
``clipfast embed`` keys its resumable outputs by this order: it must not change.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from clipfast.types import IMAGE_SUFFIXES

# on_skip(path, reason, rank): rank 0 for entries os.walk lists as folders, 1 for files
SkipFn = Callable[[str, str, int], None]


def sniff_image(path: str | os.PathLike) -> str | None:
    """None when Pillow recognises the file's header as an image (nothing decoded), else why
    not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):  # parses the header, decodes nothing
            return None
    except Image.DecompressionBombError:
        return None  # an image: embedding it reports the refusal as that input's failure
    except UnidentifiedImageError:
        return "not an image Pillow can identify"
    except Exception as e:  # Pillow raises assorted errors on odd headers
        return f"not a readable image ({type(e).__name__}: {e})"


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links, as os.walk classifies entries
    except OSError:
        return False


def _entries(folder: str, on_skip: SkipFn | None) -> list[tuple[str, bool]]:
    """(path, is a folder to enter) of the folder's entries worth keeping, sorted by path;
    the others are reported to ``on_skip``."""
    found: list[tuple[str, bool]] = []
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return []  # an unreadable folder lists nothing (as os.walk)
    for e in entries:
        as_dir = _is_dir(e)
        rank = 0 if as_dir else 1
        if e.name.startswith("."):
            if on_skip is not None:
                on_skip(e.path, "hidden directory" if as_dir else "hidden file", rank)
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                found.append((e.path, True))
                continue
            regular = stat.S_ISREG(e.stat().st_mode)
        except OSError as err:
            if on_skip is not None:
                on_skip(e.path, f"cannot be read ({err.strerror or err})", rank)
            continue
        if regular:
            found.append((e.path, False))
        elif on_skip is not None:
            on_skip(e.path, "symbolic link to a directory, not followed" if as_dir
                    else "not a regular file", rank)
    return sorted(found)


def walk_images(root: str, on_skip: SkipFn | None = None) -> Iterator[str]:
    """Image files under ``root``, recursively, in the module's order (paths joined to
    ``root`` as given): files with an image suffix, and files with another suffix or none
    whose content Pillow recognises. Left out, each reported to ``on_skip(path, reason, rank)``
    when given: hidden files and folders (names starting with '.'), symbolic links to folders
    (not followed), anything not a regular file, files that cannot be read or are not images.
    """
    pending = _entries(root, on_skip)[::-1]
    while pending:
        path, is_dir = pending.pop()
        if is_dir:
            pending.extend(_entries(path, on_skip)[::-1])
            continue
        if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
            yield path
            continue
        reason = sniff_image(path)
        if reason is None:
            yield path
        elif on_skip is not None:
            on_skip(path, reason, 1)


def expand_images(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Command-line inputs -> (image paths, ``(path, reason)`` for each file of a folder left
    out). A file is taken as given (a missing or broken one becomes that input's failure); a
    folder is listed by ``walk_images``. Skipped entries come folder by folder (a folder's
    own before its subfolders'), folders before files, by name."""
    out: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        root = Path(item)
        if not root.is_dir():
            out.append(item)
            continue
        mine: list[tuple[tuple, str, str]] = []

        def skip(path: str, reason: str, rank: int, _mine=mine) -> None:
            p = Path(path)
            _mine.append(((p.parent.parts, rank, p.name), str(p), reason))

        out.extend(str(Path(path)) for path in walk_images(str(root), skip))
        skipped.extend((path, reason) for _, path, reason in sorted(mine, key=lambda t: t[0]))
    return out, skipped


__all__ = ["expand_images", "sniff_image", "walk_images"]
