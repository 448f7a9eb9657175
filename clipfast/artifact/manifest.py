"""The artifact manifest: a versioned JSON file that carries everything the runtime needs.

The runtime never re-derives preprocessing, tokenization or logit settings from model names:
they are read from here. Every file the runtime opens (the towers, the external-data files
their graphs reference, the tokenizer, the golden outputs) must be listed in the manifest's
``files`` with its size and sha256, and must resolve (symbolic links included) inside the
artifact directory; :func:`load_manifest` checks all of it, and :meth:`Manifest.path` is the
one way the runtime turns a file name of the manifest into a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from clipfast.artifact.onnx_proto import onnx_external_data
from clipfast.artifact.spec import FORMAT, FORMAT_VERSION, TOWERS, ArtifactSpec
from clipfast.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256": ..., "bytes": ...}}`` for the given files of ``directory``."""
    out = {}
    for name in sorted(names):
        p = directory / name
        out[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def tower_input_dims(manifest: Manifest, tower: str) -> dict[str, tuple[int, ...]]:
    """``{input name: dims after the batch}`` of a tower, from the manifest: the image input's
    ``(C, H, W)``, every text input's ``(context_length,)``. What a backend that builds for
    fixed shapes (TensorRT optimization profiles) needs beyond the batch range."""
    spec = manifest.spec
    if tower == "image":
        return {spec.image.input: tuple(spec.image.shape)}
    length = int(spec.tokenizer.context_length)
    return {name: (length,) for name in spec.text.inputs}


def artifact_digest(manifest) -> str:
    """16 hex digits identifying an artifact's content (its files' checksums): the name of its
    cache folders (TensorRT engines, ONNX Runtime's TensorRT provider) outside the artifact."""
    h = hashlib.sha256()
    for name, entry in sorted(manifest.spec.files.items()):
        h.update(f"{name}:{entry['sha256']}\n".encode())
    return h.hexdigest()[:16]


def write_manifest(directory: str | os.PathLike, data: ArtifactSpec | dict[str, Any],
                   files: list[str]) -> Path:
    """Write ``manifest.json`` into ``directory`` from an ArtifactSpec (or its dict form), with
    checksums of ``files`` (relative names). A spec read from a manifest keeps that file's key
    order: rewritten unchanged, the file is byte-identical."""
    directory = Path(directory)
    data = data.to_dict() if isinstance(data, ArtifactSpec) else dict(data)
    data["format"] = FORMAT
    data["format_version"] = FORMAT_VERSION
    data["files"] = file_entries(directory, files)
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- file names


def _path_syntax(name: str) -> str | None:
    """What makes ``name`` unusable as a relative '/'-separated file name (NUL or backslash
    characters, an absolute path or drive), or None."""
    if "\x00" in name or "\\" in name:
        return "uses NUL or backslash characters (file names use '/')"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "is an absolute path"
    return None


def _plain_name(name: Any, field: str, where: Path) -> str:
    """``name`` as a normalised relative POSIX name, or ArtifactError naming ``field``: absolute
    paths, drive letters, backslashes, NUL bytes and ``..`` components are refused."""
    if not isinstance(name, str) or not name.strip():
        raise ArtifactError(f"{where}: {field} must be a file name (a non-empty string), "
                            f"got {name!r}")
    problem = _path_syntax(name)
    if problem:
        raise ArtifactError(f"{where}: {field} {name!r} {problem}; artifact files are named "
                            "relative to the artifact directory")
    p = PurePosixPath(name)
    if ".." in p.parts:
        raise ArtifactError(f"{where}: {field} {name!r} leaves the artifact directory ('..')")
    norm = str(p)
    if norm in (".", ""):
        raise ArtifactError(f"{where}: {field} {name!r} names the artifact directory, not a file")
    return norm


def _contained(root: Path, path: Path, field: str, name: str, where: Path) -> Path:
    """``path`` resolved (symbolic links followed); ArtifactError unless it lies inside the
    resolved ``root``."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ArtifactError(f"{where}: {field} {name!r} cannot be resolved ({e})") from e
    if resolved == root or not resolved.is_relative_to(root):
        raise ArtifactError(f"{where}: {field} {name!r} resolves to {resolved}, outside the "
                            f"artifact directory {root}")
    return resolved


def _check_listed(directory: Path, files: Any, name: Any, field: str, where: Path) -> Path:
    """The resolved path of ``name`` (a reference from ``field``) after checking that it is a
    plain relative name listed in ``files`` that resolves inside ``directory``."""
    norm = _plain_name(name, field, where)
    if norm not in files:
        raise ArtifactError(f"{where}: {field} {name!r} is not listed in 'files' (every file the "
                            "runtime opens must be listed with its sha256)")
    root = Path(os.path.realpath(directory))
    return _contained(root, root / norm, field, str(name), where)


# --------------------------------------------------------------------------- the manifest


@dataclass
class Manifest:
    """A loaded, validated manifest: the artifact directory and its typed ``spec``. Fields are
    read as ``manifest.spec.<section>.<field>``; this class adds file access (``path``)."""

    directory: Path
    spec: ArtifactSpec

    @property
    def where(self) -> str:
        """The manifest file, as errors name it."""
        return str(self.directory / MANIFEST_NAME)

    def path(self, name: str) -> Path:
        """The path of the artifact file ``name``: the one gate between a name read from the
        manifest and a file the runtime opens. ArtifactError unless ``name`` is a relative name
        listed in ``files`` that resolves (symbolic links followed) inside the artifact
        directory. The returned path is the resolved one."""
        return _check_listed(self.directory, self.spec.files, name, "file",
                             self.directory / MANIFEST_NAME)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entries(files: dict, path: Path) -> None:
    for name, entry in files.items():
        _plain_name(name, "files key", path)
        if str(PurePosixPath(name)) != name:
            raise ArtifactError(f"{path}: files key {name!r} is not a plain relative name "
                                f"(write it as {str(PurePosixPath(name))!r})")
        if not isinstance(entry, dict):
            raise ArtifactError(f"{path}: files[{name!r}] must be an object with 'sha256' and "
                                f"'bytes', got {type(entry).__name__}")
        for key in ("sha256", "bytes"):
            if key not in entry:
                raise ArtifactError(f"{path}: files[{name!r}] lacks {key!r}")
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            raise ArtifactError(f"{path}: files[{name!r}].sha256 must be 64 lowercase hex "
                                f"digits, got {entry['sha256']!r}")
        if not _is_int(entry["bytes"]) or entry["bytes"] < 0:
            raise ArtifactError(f"{path}: files[{name!r}].bytes must be a non-negative integer, "
                                f"got {entry['bytes']!r}")


def referenced_files(spec: ArtifactSpec) -> dict[str, str]:
    """``{field: file name}`` of every file a validated manifest points the runtime at (the
    external-data files of the towers aside: those are named inside the ONNX graphs)."""
    refs = {f"{t}.file": spec.tower(t).file for t in TOWERS}
    refs["tokenizer.file"] = spec.tokenizer.file
    if spec.golden is not None:
        refs["golden.file"] = spec.golden.file
    return refs


def _check_external_data(directory: Path, files: dict, tower: str, onnx_path: Path,
                         where: Path) -> None:
    """Every external-data file the tower's graph references must be a listed file inside the
    artifact directory. ONNX Runtime resolves a ``location`` against the model file's folder;
    the check resolves it the same way (symbolic links followed) and compares it with the
    resolved listed files, so no runtime-version-specific path check is relied upon."""
    root = Path(os.path.realpath(directory))
    listed = {Path(os.path.realpath(root / name)) for name in files}
    for location in onnx_external_data(onnx_path):
        field = f"{tower} graph external data"
        problem = _path_syntax(location) if location else "is empty"
        if problem:
            raise ArtifactError(f"{onnx_path}: {field} {location!r} {problem}; external data "
                                "must lie beside the graph in the artifact")
        target = _contained(root, onnx_path.parent / PurePosixPath(location), field, location,
                            onnx_path)
        if target not in listed:
            raise ArtifactError(f"{onnx_path}: {field} {location!r} is not listed in the "
                                f"'files' of {where} (every file the runtime opens must be "
                                "listed with its sha256)")


def _check_file(root: Path, directory: Path, name: str, entry: dict, where: Path,
                verify_checksums: bool) -> None:
    """One listed file: inside the directory, a regular file, its size and (optionally) sha256."""
    shown = directory / name
    fp = _contained(root, root / name, "listed file", name, where)
    try:
        if not fp.is_file():
            raise ArtifactError(f"{shown}: listed in {MANIFEST_NAME} but missing (or not a "
                                "regular file)")
        size = fp.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(
                f"{shown}: size {size} bytes, manifest says {entry['bytes']}: the file is "
                "truncated or was replaced; re-export the artifact"
            )
        if verify_checksums and sha256_file(fp) != entry["sha256"]:
            raise ArtifactError(
                f"{shown}: sha256 does not match {MANIFEST_NAME}: the file was modified after "
                "export; re-export the artifact"
            )
    except OSError as e:
        raise ArtifactError(f"{shown}: listed in {MANIFEST_NAME} but cannot be read ({e})"
                            ) from e


def load_manifest(directory: str | os.PathLike, *, verify_checksums: bool = True) -> Manifest:
    """Read and validate ``DIR/manifest.json``; raise ArtifactError naming the file and problem.

    Checked always: the fields and their types (``ArtifactSpec.from_dict``); that every listed
    file is a plain relative name resolving (symbolic links followed) inside the directory,
    present, of its recorded size; that every file the manifest references (towers, tokenizer,
    golden outputs) and every external-data file the tower graphs reference is listed. With
    ``verify_checksums`` every listed file is also hashed and compared (a tampered or truncated
    ONNX file is caught here, not as a confusing runtime error later).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(
            f"artifact directory {str(directory)!r} does not exist; create one with "
            "`clipfast export --model ... --out DIR`"
        )
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {directory} is not a clipfast artifact directory")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, deep nesting
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read it ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a clipfast manifest (expected format {FORMAT!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ArtifactError(
            f"{path}: format_version {version!r} is not supported by this clipfast "
            f"(expects {FORMAT_VERSION}); re-export the model with this version"
        )
    spec = ArtifactSpec.from_dict(data, str(path))
    files = spec.files
    _check_entries(files, path)
    root = Path(os.path.realpath(directory))
    for name, entry in files.items():
        _check_file(root, directory, name, entry, path, verify_checksums)
    for field, name in referenced_files(spec).items():
        _check_listed(directory, files, name, field, path)
    for tower in TOWERS:
        onnx_path = _check_listed(directory, files, spec.tower(tower).file, f"{tower}.file",
                                  path)
        _check_external_data(directory, files, tower, onnx_path, path)
    return Manifest(directory=directory, spec=spec)
