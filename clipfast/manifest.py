"""The artifact manifest: a versioned JSON file that carries everything the runtime needs.

The runtime never re-derives preprocessing, tokenization or logit settings from model names:
they are read from here. Every file of the artifact is listed with its sha256 and checked at load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfast.errors import ArtifactError

FORMAT = "clipfast-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 1 << 20


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


def tower_input_dims(manifest, tower: str) -> dict[str, tuple[int, ...]]:
    """``{input name: dims after the batch}`` of a tower, from the manifest: the image input's
    ``(C, H, W)``, every text input's ``(context_length,)``. What a backend that builds for
    fixed shapes (TensorRT optimization profiles) needs beyond the batch range."""
    if tower == "image":
        return {manifest["image"]["input"]: tuple(int(d) for d in manifest["image"]["shape"])}
    length = int(manifest["tokenizer"]["context_length"])
    return {name: (length,) for name in manifest["text"]["inputs"]}


def artifact_digest(manifest) -> str:
    """16 hex digits identifying an artifact's content (its files' checksums): the name of its
    cache folders (TensorRT engines, ONNX Runtime's TensorRT provider) outside the artifact."""
    h = hashlib.sha256()
    for name, entry in sorted((manifest.get("files") or {}).items()):
        h.update(f"{name}:{entry['sha256']}\n".encode())
    return h.hexdigest()[:16]


def write_manifest(directory: str | os.PathLike, data: dict[str, Any], files: list[str]) -> Path:
    """Write ``manifest.json`` into ``directory`` with checksums of ``files`` (relative names)."""
    directory = Path(directory)
    data = dict(data)
    data["format"] = FORMAT
    data["format_version"] = FORMAT_VERSION
    data["files"] = file_entries(directory, files)
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


@dataclass
class Manifest:
    """A loaded, validated manifest. ``data`` is the raw JSON; accessors give typed views."""

    directory: Path
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def embed_dim(self) -> int:
        return int(self.data["embed_dim"])

    @property
    def precision(self) -> str:
        return str(self.data["precision"])

    @property
    def preprocess(self):
        from clipfast.preprocess import PreprocessConfig

        return self._section("preprocess", PreprocessConfig.from_dict)

    @property
    def tokenizer(self):
        from clipfast.tokenizer import TokenizerConfig

        return self._section("tokenizer", TokenizerConfig.from_dict)

    def _section(self, key: str, parse):
        try:
            return parse(self.data[key])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{self.directory / MANIFEST_NAME}: invalid {key!r} section: {e}"
                                ) from e

    def path(self, name: str) -> Path:
        return self.directory / name


_REQUIRED = ("source", "family", "embed_dim", "precision", "image", "text", "preprocess",
             "tokenizer", "logits", "files")


def load_manifest(directory: str | os.PathLike, *, verify_checksums: bool = True) -> Manifest:
    """Read and validate ``DIR/manifest.json``; raise ArtifactError naming the file and problem.

    With ``verify_checksums`` every listed file is hashed and compared (a tampered or truncated
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
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a clipfast manifest (expected format {FORMAT!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {version!r} is not supported by this clipfast "
            f"(expects {FORMAT_VERSION}); re-export the model with this version"
        )
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ArtifactError(f"{path}: missing keys {missing}")
    for name, entry in data["files"].items():
        fp = directory / name
        if not fp.is_file():
            raise ArtifactError(f"{fp}: listed in {MANIFEST_NAME} but missing")
        if fp.stat().st_size != entry["bytes"]:
            raise ArtifactError(
                f"{fp}: size {fp.stat().st_size} bytes, manifest says {entry['bytes']}: the file "
                "is truncated or was replaced; re-export the artifact"
            )
        if verify_checksums and sha256_file(fp) != entry["sha256"]:
            raise ArtifactError(
                f"{fp}: sha256 does not match {MANIFEST_NAME}: the file was modified after export; "
                "re-export the artifact"
            )
    return Manifest(directory=directory, data=data)
