"""Tower -> ONNX: one file per tower, dynamic batch axis, checked by ONNX and onnxruntime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from clipfast.errors import ExportError
from clipfast.export.source import SourceModel

DEFAULT_OPSET = 17
IMAGE_INPUT = "pixel_values"
IMAGE_OUTPUT = "image_embeds"
TEXT_OUTPUT = "text_embeds"


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
            output_name: str, opset: int) -> None:
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, output_name]}
    # The TorchScript-based exporter is used on purpose: it handles these towers (dynamic batch,
    # causal masks, ArgMax pooling) in seconds, and its graphs are what ONNX Runtime's transformer
    # fusions match; its deprecation warning is not actionable for users.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, args, str(path), input_names=input_names, output_names=[output_name],
                dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                dynamo=False,
            )
        except Exception as e:  # the exporter raises many unrelated types
            raise ExportError(f"ONNX export of {path.name} failed: {type(e).__name__}: {e}") from e
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ExportError(f"{path.name}: exported graph does not pass onnx.checker: {e}") from e


def _export_module(source: SourceModel, which: str, fusable: bool) -> tuple[torch.nn.Module,
                                                                            str | None]:
    """The module to trace for tower ``which``: with ``fusable``, an open_clip tower's export
    copy whose attention ONNX Runtime can fuse (``fusion.fusable_tower``; the source's own tower,
    the reference, is never modified). Returns ``(module, why_not_rewritten or None)``."""
    tower = source.image_tower if which == "image" else source.text_tower
    if not fusable or source.loader != "open_clip":
        # transformers towers are loaded with eager attention, already the fusable pattern
        return tower, None
    from clipfast.export.fusion import fusable_tower

    return fusable_tower(tower, which)


def example_image_inputs(source: SourceModel) -> dict[str, np.ndarray]:
    """``{"pixel_values": float32 (2, 3, H, W)}``: what the image tower is traced with."""
    h, w = source.preprocess.image_size
    return {IMAGE_INPUT: np.zeros((2, 3, h, w), dtype=np.float32)}


def example_text_inputs(source: SourceModel) -> dict[str, np.ndarray]:
    """``{name: int32 (2, L)}`` for ``source.text_inputs``: what the text tower is traced with."""
    batch = source.reference_tokenize(["a photo of a cat", "two dogs playing in the snow"])
    return {n: np.asarray(batch[n], dtype=np.int32) for n in source.text_inputs}


def export_image_tower(source: SourceModel, path: Path, opset: int = DEFAULT_OPSET, *,
                       fusable: bool = True) -> str | None:
    """Export the image tower to ``path``; return why its attention was not rewritten for
    ONNX Runtime's fusion (None when it was, or needed no rewrite)."""
    module, note = _export_module(source, "image", fusable)
    example = torch.from_numpy(example_image_inputs(source)[IMAGE_INPUT])
    _export(module, (example,), path, [IMAGE_INPUT], IMAGE_OUTPUT, opset)
    return note


def export_text_tower(source: SourceModel, path: Path, opset: int = DEFAULT_OPSET, *,
                      fusable: bool = True) -> str | None:
    """Export the text tower to ``path``; return value as ``export_image_tower``."""
    module, note = _export_module(source, "text", fusable)
    feed = example_text_inputs(source)
    args = tuple(torch.from_numpy(feed[n]) for n in source.text_inputs)
    _export(module, args, path, list(source.text_inputs), TEXT_OUTPUT, opset)
    return note
