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


def export_image_tower(source: SourceModel, path: Path, opset: int = DEFAULT_OPSET) -> None:
    h, w = source.preprocess.image_size
    example = torch.zeros(2, 3, h, w)
    _export(source.image_tower, (example,), path, [IMAGE_INPUT], IMAGE_OUTPUT, opset)


def export_text_tower(source: SourceModel, path: Path, opset: int = DEFAULT_OPSET) -> None:
    batch = source.reference_tokenize(["a photo of a cat", "two dogs playing in the snow"])
    args = tuple(torch.from_numpy(np.asarray(batch[n], dtype=np.int32)) for n in source.text_inputs)
    _export(source.text_tower, args, path, list(source.text_inputs), TEXT_OUTPUT, opset)
