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
            output_name: str, opset: int, *, sequence: bool = False) -> None:
    dynamic_axes: dict[str, dict[int, str]] = {
        name: {0: "batch"} for name in [*input_names, output_name]}
    if sequence:
        for name in input_names:
            dynamic_axes[name][1] = "sequence"
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


# Texts the padding check runs (one token of content up to past the context, so truncated).
PADDING_CHECK_TEXTS = ("a", "a photo of a cat", "two dogs playing in the snow on a sunny day",
                       " ".join(["a long caption about many things"] * 20))
# Largest relative difference (to the largest |value|) between a row padded to the context and
# the same row padded to its own length that still counts as "the same result": fp32 kernels
# reorder sums with the shape (1e-6 seen on random ViT-B-32), a padding-dependent tower differs
# by 1e-2 and more.
PADDING_CHECK_TOL = 1e-4


def source_tokenizer(source: SourceModel):
    """The runtime tokenizer (``clipfast.inputs.tokenizer.Tokenizer``) of ``source``."""
    from clipfast.inputs.tokenizer import Tokenizer

    return Tokenizer.from_str(source.tokenizer, source.tokenizer_json)


def _padding_difference(source: SourceModel, module: torch.nn.Module) -> float:
    """Max relative difference between ``module``'s outputs on ``PADDING_CHECK_TEXTS`` padded
    to the context length and the same texts each padded only to its own length."""
    tok = source_tokenizer(source)
    full, lengths = tok.encode(list(PADDING_CHECK_TEXTS))
    with torch.no_grad():
        ref = module(*(torch.from_numpy(full[n].astype(np.int32))
                       for n in source.text_inputs)).float().numpy()
        worst = 0.0
        for i, length in enumerate(lengths):
            got = module(*(torch.from_numpy(full[n][i:i + 1, :int(length)].astype(np.int32))
                           for n in source.text_inputs)).float().numpy()
            scale = max(float(np.abs(ref[i]).max()), 1e-12)
            worst = max(worst, float(np.abs(got[0] - ref[i]).max()) / scale)
    return worst


def text_sequence_plan(source: SourceModel) -> tuple[bool, str]:
    """``(dynamic, reason)``: whether the text tower gets a dynamic sequence axis.

    Dynamic when the family declares the tower's result independent of trailing padding
    (``FamilySpec.text_padding_free``), the tokenizer pads on the right, and the source tower
    itself gives the same embeddings for texts of 1 to context_length tokens padded only to
    their own length (a wrong declaration is caught here, before any graph is written).
    """
    from clipfast.export import families

    spec = families.for_tower(source.text_tower)
    if spec is None:
        return False, "text tower of no registered family: fixed length"
    ok, why = spec.text_padding_free(source.text_tower)
    if not ok:
        return False, why
    if source.tokenizer.padding_side != "right":
        return False, f"tokenizer pads on the {source.tokenizer.padding_side}: fixed length"
    try:
        diff = _padding_difference(source, source.text_tower)
    except Exception as e:  # a tower that cannot take a shorter input at all
        return False, f"{why}, but the source tower rejects shorter inputs " \
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not diff <= PADDING_CHECK_TOL:
        return False, (f"{why} declared, but the source tower's output changes with the padding "
                       f"(max relative difference {diff:.2e} > {PADDING_CHECK_TOL}): fixed length")
    return True, f"{why}; checked on the source tower (max relative difference {diff:.1e})"


def export_text_tower(source: SourceModel, path: Path, opset: int = DEFAULT_OPSET, *,
                      fusable: bool = True, dynamic: bool = False) -> str | None:
    """Export the text tower to ``path``; return value as ``export_image_tower``.

    dynamic: give the inputs a dynamic sequence axis (``text_sequence_plan``). The tower is then
    traced on texts shorter than the context, so a length that the graph holds as a constant
    (a positional embedding or mask not sliced to the input) fails the trace or the check in
    ``check_dynamic_text_graph`` instead of passing unnoticed.
    """
    # nn.MultiheadAttention's traced graph holds the traced length in its reshapes: a dynamic
    # export always goes through the eager rewrite (the same maths, any length)
    module, note = _export_module(source, "text", fusable or dynamic)
    feed = example_text_inputs(source)
    if dynamic:
        _, lengths = source_tokenizer(source).encode(
            ["a photo of a cat", "two dogs playing in the snow"])
        feed = {k: v[:, :int(lengths.max())] for k, v in feed.items()}
    args = tuple(torch.from_numpy(feed[n]) for n in source.text_inputs)
    _export(module, args, path, list(source.text_inputs), TEXT_OUTPUT, opset, sequence=dynamic)
    return note


def check_dynamic_text_graph(source: SourceModel, path: Path) -> float:
    """Max relative difference between the exported text graph at ``path``, run by ONNX
    Runtime on ``PADDING_CHECK_TEXTS`` each padded only to its own length (1 token of content
    up to the full context), and the source tower on the same texts padded to the context."""
    import onnxruntime as ort

    tok = source_tokenizer(source)
    full, lengths = tok.encode(list(PADDING_CHECK_TEXTS))
    with torch.no_grad():
        ref = source.text_tower(*(torch.from_numpy(full[n].astype(np.int32))
                                  for n in source.text_inputs)).float().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, length in enumerate(lengths):
        feed = {n: full[n][i:i + 1, :int(length)].astype(np.int32) for n in source.text_inputs}
        got = np.asarray(session.run(None, feed)[0], dtype=np.float32)
        scale = max(float(np.abs(ref[i]).max()), 1e-12)
        worst = max(worst, float(np.abs(got[0] - ref[i]).max()) / scale)
    return worst
