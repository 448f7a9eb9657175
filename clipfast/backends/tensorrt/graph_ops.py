"""The ONNX operators of a tower graph that TensorRT's parser cannot read (ONNX Runtime's fused
contrib operators), from the export's manifest record or from the graph itself."""

from __future__ import annotations

import os
from pathlib import Path

from clipfast.errors import ArtifactError, BackendUnavailable

# Operator domains TensorRT's ONNX parser reads: the default ONNX domain under both spellings.
STANDARD_DOMAINS = ("", "ai.onnx")
# Recorded per tower in manifest["graph"] when `clipfast export --tensorrt` turns fusion off.
FUSION_OFF_NOTE = "off (--tensorrt: TensorRT parses standard ONNX operators only)"


def _graph_ops(graph, out: set[str]) -> None:
    for node in graph.node:
        if node.domain not in STANDARD_DOMAINS:
            out.add(f"{node.domain}:{node.op_type}")
        for attr in node.attribute:  # control-flow bodies (If / Loop / Scan)
            if attr.g is not None and len(attr.g.node):
                _graph_ops(attr.g, out)
            for sub in attr.graphs:
                _graph_ops(sub, out)


def contrib_ops(onnx_path: str | os.PathLike) -> list[str]:
    """``["com.microsoft:Attention", ...]``: the operators of ``onnx_path`` outside the standard
    ONNX domain (ONNX Runtime's fused contrib operators), which TensorRT's parser rejects.

    Reads the graph only (``load_external_data=False``): a multi-GiB tower costs milliseconds.
    """
    try:
        import onnx
    except ImportError as e:
        raise BackendUnavailable(f"checking {onnx_path} needs the onnx package "
                                 f"(`pip install onnx`): {e}") from e
    path = Path(onnx_path)
    if not path.is_file():
        raise ArtifactError(f"{path}: tower graph not found")
    model = onnx.load(str(path), load_external_data=False)
    found: set[str] = set()
    _graph_ops(model.graph, found)
    return sorted(found)


def has_contrib_ops(onnx_path: str | os.PathLike) -> bool:
    """True when ``onnx_path`` uses operators TensorRT's ONNX parser cannot read (see
    ``contrib_ops``)."""
    return bool(contrib_ops(onnx_path))


def recorded_contrib_ops(manifest, tower: str) -> list[str] | None:
    """``manifest.spec.graph.<tower>.contrib_ops``, the export's record of the op types of the
    tower graph outside the standard ONNX domain (sorted), or None when the manifest predates
    that record."""
    ops = manifest.spec.graph.contrib_ops(tower)  # a list of names (ArtifactSpec checks it)
    return None if ops is None else sorted(ops)


def tower_contrib_ops(manifest, tower: str) -> list[str]:
    """The operators of ``tower``'s graph TensorRT's parser cannot read: from the manifest's
    record (no onnx needed, as in a ``clipfast[tensorrt]`` install), else, for an artifact
    exported before that record existed, read from the graph with onnx when it is installed.
    Without either, BackendUnavailable says to re-export the artifact."""
    recorded = recorded_contrib_ops(manifest, tower)
    if recorded is not None:
        return recorded
    try:
        import onnx  # noqa: F401 - only whether it is there; contrib_ops reads the graph
    except ImportError:
        raise BackendUnavailable(
            f"{manifest.directory}: this artifact's manifest does not record which operators "
            f"its {tower} tower graph uses (graph.{tower}.contrib_ops: it was exported by an "
            "older clipfast), and the onnx package that could read them from the graph is not "
            "installed; re-export the artifact with this clipfast (`clipfast export ... "
            "--tensorrt`), or `pip install onnx`") from None
    return contrib_ops(manifest.path(manifest.spec.tower(tower).file))


def contrib_ops_message(tower: str, path: Path, ops: list[str]) -> str:
    shown = ", ".join(ops[:6]) + (" ..." if len(ops) > 6 else "")
    return (f"the {tower} tower graph {path.name} uses ONNX Runtime fused operators TensorRT "
            f"cannot parse ({shown}); re-export the artifact with `clipfast export ... --tensorrt` "
            "(or --no-fuse) to get plain ONNX graphs")


__all__ = ["FUSION_OFF_NOTE", "STANDARD_DOMAINS", "contrib_ops", "contrib_ops_message",
           "has_contrib_ops", "recorded_contrib_ops", "tower_contrib_ops"]
