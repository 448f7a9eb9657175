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
from functools import cached_property
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from clipfast.artifact.onnx_proto import onnx_external_data
from clipfast.artifact.spec import (
    TOWERS,
    ArtifactSpec,
    GoldenSection,
    ImageTower,
    LogitsConfig,
    TextTower,
    parse_golden,
    parse_image,
    parse_text,
)
from clipfast.errors import ArtifactError

FORMAT = "clipfast-artifact"
FORMAT_VERSION = 1
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
    if tower == "image":
        return {manifest.image.input: tuple(manifest.image.shape)}
    length = int(manifest.tokenizer.context_length)
    return {name: (length,) for name in manifest.text.inputs}


def artifact_digest(manifest) -> str:
    """16 hex digits identifying an artifact's content (its files' checksums): the name of its
    cache folders (TensorRT engines, ONNX Runtime's TensorRT provider) outside the artifact."""
    h = hashlib.sha256()
    for name, entry in sorted(manifest.files.items()):
        h.update(f"{name}:{entry['sha256']}\n".encode())
    return h.hexdigest()[:16]


def write_manifest(directory: str | os.PathLike, data: ArtifactSpec | dict[str, Any],
                   files: list[str]) -> Path:
    """Write ``manifest.json`` into ``directory`` from an ArtifactSpec (or its dict form), with
    checksums of ``files`` (relative names)."""
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


def _files_section(files: Any, where: Path) -> dict[str, dict[str, Any]]:
    if not isinstance(files, dict):
        raise ArtifactError(f"{where}: 'files' must be an object mapping file names to "
                            f"{{'sha256', 'bytes'}}, got {type(files).__name__}")
    return files


def _check_listed(directory: Path, files: Any, name: Any, field: str, where: Path) -> Path:
    """The resolved path of ``name`` (a reference from ``field``) after checking that it is a
    plain relative name listed in ``files`` that resolves inside ``directory``."""
    files = _files_section(files, where)
    norm = _plain_name(name, field, where)
    if norm not in files:
        raise ArtifactError(f"{where}: {field} {name!r} is not listed in 'files' (every file the "
                            "runtime opens must be listed with its sha256)")
    root = Path(os.path.realpath(directory))
    return _contained(root, root / norm, field, str(name), where)


# --------------------------------------------------------------------------- the manifest


@dataclass
class Manifest:
    """A loaded, validated manifest. ``data`` is the raw JSON; accessors give typed views."""

    directory: Path
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    # -- typed views (clipfast.artifact.spec), parsed from ``data`` when first asked for
    # --------------
    @property
    def where(self) -> str:
        return str(self.directory / MANIFEST_NAME)

    @cached_property
    def spec(self) -> ArtifactSpec:
        """The whole manifest, typed (what ``write_manifest`` takes back)."""
        return ArtifactSpec.from_dict(self.data, self.where)

    @property
    def embed_dim(self) -> int:
        return int(self.data["embed_dim"])

    @property
    def precision(self) -> str:
        return str(self.data.get("precision") or "")

    @property
    def family(self) -> str:
        return str(self.data.get("family", ""))

    @property
    def source(self) -> dict[str, Any]:
        return dict(self.data.get("source") or {})

    @property
    def io_dtype(self) -> str:
        return str(self.data.get("io_dtype") or "fp32")

    @cached_property
    def image(self) -> ImageTower:
        return parse_image(self.data.get("image"), self.where)

    @cached_property
    def text(self) -> TextTower:
        return parse_text(self.data.get("text"), self.where)

    def tower(self, name: str) -> ImageTower | TextTower:
        """The ``image`` or ``text`` tower's section."""
        if name not in TOWERS:
            raise ValueError(f"tower {name!r}: expected one of {TOWERS}")
        return self.image if name == "image" else self.text

    @cached_property
    def logits(self) -> LogitsConfig:
        return LogitsConfig.from_dict(self.data.get("logits"), self.where)

    @cached_property
    def golden(self) -> GoldenSection | None:
        return parse_golden(self.data.get("golden"), self.where)

    @property
    def gates(self) -> dict[str, Any]:
        return dict(self.data.get("gates") or {})

    def precision_gates(self, precision: str) -> dict[str, Any] | None:
        """The gates the artifact states for running its towers at ``precision`` other than its
        own (``precision_gates``, e.g. ``{"bf16": {...}}`` in an fp32 artifact), or None."""
        section = self.data.get("precision_gates") or {}
        gates = section.get(precision)
        return dict(gates) if isinstance(gates, dict) else None

    @property
    def graph(self) -> dict[str, Any]:
        return dict(self.data.get("graph") or {})

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.data.get("quantization")

    @property
    def exported_on(self) -> dict[str, Any] | None:
        return self.data.get("exported_on")

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.data.get("files") or {})

    @property
    def preprocess(self):
        from clipfast.inputs.preprocess import PreprocessConfig

        return self._section("preprocess", PreprocessConfig.from_dict)

    @property
    def tokenizer(self):
        from clipfast.inputs.tokenizer import TokenizerConfig

        return self._section("tokenizer", TokenizerConfig.from_dict)

    def _section(self, key: str, parse):
        try:
            return parse(self.data[key])
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{self.directory / MANIFEST_NAME}: invalid {key!r} section: {e}"
                                ) from e

    def path(self, name: str) -> Path:
        """The path of the artifact file ``name``: the one gate between a name read from the
        manifest and a file the runtime opens. ArtifactError unless ``name`` is a relative name
        listed in ``files`` that resolves (symbolic links followed) inside the artifact
        directory. The returned path is the resolved one."""
        return _check_listed(self.directory, self.data.get("files"), name, "file",
                             self.directory / MANIFEST_NAME)


_REQUIRED = ("source", "family", "embed_dim", "precision", "image", "text", "preprocess",
             "tokenizer", "logits", "files")
_DICTS = ("source", "image", "text", "preprocess", "tokenizer", "logits")
_OPTIONAL_DICTS = ("graph", "gates", "quantization", "tensorrt", "architecture", "fidelity",
                   "exported_on", "precision_gates")


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


def _check_types(data: dict, path: Path) -> None:
    """The types of the fields the runtime reads, so that a malformed manifest is reported here
    naming the field, not as a KeyError or TypeError deep in a backend."""
    for key in _DICTS:
        if not isinstance(data[key], dict):
            raise ArtifactError(f"{path}: {key!r} must be an object, got "
                                f"{type(data[key]).__name__}")
    for key in _OPTIONAL_DICTS:
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ArtifactError(f"{path}: {key!r} must be an object (or absent), got "
                                f"{type(data[key]).__name__}")
    for precision, gates in (data.get("precision_gates") or {}).items():
        if not isinstance(gates, dict):
            raise ArtifactError(f"{path}: precision_gates.{precision} must be an object of "
                                f"gates, got {type(gates).__name__}")
    if not isinstance(data["family"], str):
        raise ArtifactError(f"{path}: 'family' must be a string, got {data['family']!r}")
    if not isinstance(data["precision"], str):
        raise ArtifactError(f"{path}: 'precision' must be a string, got {data['precision']!r}")
    if not _is_int(data["embed_dim"]) or data["embed_dim"] < 1:
        raise ArtifactError(f"{path}: 'embed_dim' must be a positive integer, got "
                            f"{data['embed_dim']!r}")
    image, text = data["image"], data["text"]
    for tower, keys in (("image", ("file", "input", "output")), ("text", ("file", "output"))):
        for key in keys:
            if key not in data[tower]:
                raise ArtifactError(f"{path}: '{tower}' section lacks {key!r}")
            if not isinstance(data[tower][key], str):
                raise ArtifactError(f"{path}: {tower}.{key} must be a string, got "
                                    f"{data[tower][key]!r}")
        for key in ("dtype", "output_dtype"):
            if data[tower].get(key) is not None and not isinstance(data[tower][key], str):
                raise ArtifactError(f"{path}: {tower}.{key} must be a string, got "
                                    f"{data[tower][key]!r}")
    shape = image.get("shape")
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
        raise ArtifactError(f"{path}: image.shape must be a list of positive integers, got "
                            f"{shape!r}")
    inputs = text.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(n, str) for n in inputs):
        raise ArtifactError(f"{path}: text.inputs must be a non-empty list of input names, got "
                            f"{inputs!r}")
    tok_file = data["tokenizer"].get("file", "tokenizer.json")
    if not isinstance(tok_file, str):
        raise ArtifactError(f"{path}: tokenizer.file must be a string, got {tok_file!r}")
    golden = data.get("golden")
    if golden and (not isinstance(golden, dict) or not isinstance(golden.get("file"), str)):
        raise ArtifactError(f"{path}: 'golden' must be an object with a 'file' string, got "
                            f"{golden!r}")


def referenced_files(data: dict[str, Any]) -> dict[str, str]:
    """``{field: file name}`` of every file a validated manifest points the runtime at (the
    external-data files of the towers aside: those are named inside the ONNX graphs)."""
    refs = {f"{t}.file": data[t]["file"] for t in TOWERS}
    refs["tokenizer.file"] = data["tokenizer"].get("file", "tokenizer.json")
    if data.get("golden"):
        refs["golden.file"] = data["golden"]["file"]
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

    Checked always: the types of the fields the runtime reads; that every listed file is a
    plain relative name resolving (symbolic links followed) inside the directory, present, of
    its recorded size; that every file the manifest references (towers, tokenizer, golden
    outputs) and every external-data file the tower graphs reference is listed. With
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
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ArtifactError(f"{path}: missing keys {missing}")
    files = _files_section(data["files"], path)
    _check_entries(files, path)
    _check_types(data, path)
    root = Path(os.path.realpath(directory))
    for name, entry in files.items():
        _check_file(root, directory, name, entry, path, verify_checksums)
    for field, name in referenced_files(data).items():
        _check_listed(directory, files, name, field, path)
    for tower in TOWERS:
        onnx_path = _check_listed(directory, files, data[tower]["file"], f"{tower}.file", path)
        _check_external_data(directory, files, tower, onnx_path, path)
    manifest = Manifest(directory=directory, data=data)
    manifest.spec  # noqa: B018 - every typed section parses, or ArtifactError now
    return manifest
