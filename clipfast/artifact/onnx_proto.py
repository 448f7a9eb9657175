"""Which external-data files an ONNX model references, read from its serialized bytes.

A minimal reader of the protobuf wire format, enough to find every TensorProto of an ONNX model
and the "location" of its external data, without the onnx package (the runtime does not depend
on it). Field numbers are those of onnx.proto.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from clipfast.errors import ArtifactError

__all__ = ["onnx_external_data"]

_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNC, _TRAIN, _ENTRY = range(9)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAIN, 25: _FUNC},  # graph, training_info, functions
    _TRAIN: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _FUNC: {7: _NODE, 11: _ATTR},  # node, attribute_proto
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTR},  # attribute
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _TENSOR: {13: _ENTRY},  # external_data
}
_MAX_DEPTH = 64


class _WireError(ValueError):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _WireError(f"truncated or overlong varint at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, start, end) of each length-delimited field of one message; other wire
    types are skipped."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _WireError(f"field {number} at byte {pos} runs past its message")
            yield number, pos, pos + length
            pos += length
        else:
            raise _WireError(f"unsupported wire type {wire} at byte {pos}")
        if pos > end:
            raise _WireError(f"field {number} runs past its message")


def _external_locations(buf) -> list[str]:
    """Every external-data ``location`` of the serialized ModelProto ``buf``."""
    found: list[str] = []
    stack = [(_MODEL, 0, len(buf), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _WireError("messages nested too deeply")
        if kind == _ENTRY:
            key = value = b""
            for number, s, e in _fields(buf, start, end):
                if number == 1:
                    key = bytes(buf[s:e])
                elif number == 2:
                    value = bytes(buf[s:e])
            if key == b"location":
                try:
                    found.append(value.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise _WireError(f"external data location {value!r} is not UTF-8") from err
            continue
        children = _CHILDREN[kind]
        for number, s, e in _fields(buf, start, end):
            child = children.get(number)
            if child is not None:
                stack.append((child, s, e, depth + 1))
    return found


def onnx_external_data(path: str | os.PathLike) -> list[str]:
    """The external-data file locations (as written in the graph, relative to the model's
    folder) that the ONNX model at ``path`` references, from initializers, sparse
    initializers, node attribute tensors, subgraphs and functions. Reads the protobuf wire
    format directly (no onnx package) and skips tensor payloads without reading them."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return sorted(set(_external_locations(buf)))
    except _WireError as e:
        raise ArtifactError(f"{path}: not a readable ONNX model ({e}); re-export the artifact"
                            ) from e
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read the ONNX model ({e})") from e
