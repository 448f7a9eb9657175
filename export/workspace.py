"""Where an export is assembled: a lock per output, a temporary directory beside it, and the
move into place.

- One export per ``--out`` at a time: an exclusive ``flock`` on ``.NAME.lock`` beside it,
  removed when the export ends. The kernel drops the lock when the process dies, ``kill -9``
  included, so a lock left behind never blocks the next export.
- The artifact is built in ``.NAME.<random>`` beside ``--out`` (same filesystem: the final
  ``rename`` is atomic) and moved into place only when complete. A directory left by a killed
  export carries a marker file; the next export to the same ``--out``, holding the lock, removes
  it and says so. A work directory kept on purpose (a fidelity refusal, for inspection) carries a
  second marker and is only reported.
- ``--out`` then holds either nothing, the previous artifact, or the new complete one: an
  existing artifact is renamed aside, the new one renamed in, then the old one removed.
- The artifact directory gets the permissions the umask gives a new directory
  (``tempfile.mkdtemp`` makes it 0700, unreadable to a service account).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from clipfast.errors import ExportError

log = logging.getLogger("clipfast.export")

WORK_MARKER = ".clipfast-export-work"
KEPT_MARKER = ".clipfast-export-kept"


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class ExportWorkspace:
    """The lock and the work directory of one export to ``out`` (a context manager).

    >>> with ExportWorkspace(out, overwrite=False) as ws:   # doctest: +SKIP
    ...     build(ws.work)
    ...     ws.commit()
    """

    def __init__(self, out: Path, overwrite: bool):
        self.out = Path(out).resolve()
        self.overwrite = overwrite
        self.lock_path = self.out.parent / f".{self.out.name}.lock"
        self.work: Path | None = None
        self.keep = False
        self._lock_fd: int | None = None

    # -- lock ------------------------------------------------------------------------------------
    def _acquire(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ExportError(
                    f"another export to {self.out} is running (process {holder}, lock "
                    f"{self.lock_path}); wait for it to finish or choose another --out"
                ) from None
            # The holder before us unlinks the file as it finishes: a lock on a file no longer
            # at the path locks nothing, so take the lock again on the current file.
            try:
                if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            self.lock_path.unlink()  # while still holding it (see _acquire)
        except OSError:
            pass
        os.close(self._lock_fd)  # closing drops the flock
        self._lock_fd = None

    # -- work directories --------------------------------------------------------------------------
    def _siblings(self) -> list[Path]:
        prefix = f".{self.out.name}."
        return [p for p in self.out.parent.iterdir() if p.name.startswith(prefix)
                and p.is_dir() and not p.is_symlink() and (p / WORK_MARKER).is_file()]

    def clean_stale(self) -> list[Path]:
        """Remove work directories of earlier exports to this ``out`` that died (we hold the
        lock, so no live export owns one); report the kept ones. Returns what was removed."""
        removed = []
        for p in self._siblings():
            if (p / KEPT_MARKER).is_file():
                log.warning("export: %s holds a refused export kept for inspection; remove it "
                            "when done", p)
                continue
            size = _size(p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log.warning("export: removed %s (%.0f MB) left by an export to %s that was "
                        "interrupted", p, size / 1e6, self.out)
        return removed

    def __enter__(self) -> ExportWorkspace:
        self._acquire()
        try:
            if self.out.exists() and not self.overwrite and (
                    not self.out.is_dir() or any(self.out.iterdir())):
                raise ExportError(f"--out {str(self.out)!r} exists and is not empty; pass "
                                  "--overwrite to replace it")
            self.clean_stale()
            self.work = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
            (self.work / WORK_MARKER).write_text(f"{os.getpid()}\n")
        except BaseException:
            self._release()
            raise
        return self

    def keep_for_inspection(self) -> None:
        """Leave the work directory in place after the export fails (a fidelity refusal)."""
        self.keep = True
        if self.work is not None:
            (self.work / KEPT_MARKER).write_text("kept for inspection\n")

    def commit(self) -> Path:
        """Move the complete artifact into ``out`` (atomically; an old one is replaced only
        with ``overwrite``) and give it the umask's directory permissions."""
        assert self.work is not None
        (self.work / WORK_MARKER).unlink()
        os.chmod(self.work, 0o777 & ~_umask())
        old = None
        if self.out.exists():
            if not self.overwrite:
                raise ExportError(f"--out {str(self.out)!r} appeared during the export; pass "
                                  "--overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
            (old / WORK_MARKER).write_text("replaced artifact\n")
            os.replace(self.out, old / "artifact")
        os.replace(self.work, self.out)
        self.work = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.work is not None and not self.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self._release()
