"""Measuring candidate tower graphs against the fp32 PyTorch source: ONNX Runtime sessions as
the runtime opens them, the source towers' reference outputs, the calibration inputs for int8,
the per-tower fidelity the precision fallbacks use (``TowerFidelity``), the golden self-check
data, and the gates of one tower."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.artifact.fidelity import centred_relative_error, cosine, l2_normalize, top1_agreement
from clipfast.cpu import host_cpu
from clipfast.errors import ExportError

log = logging.getLogger("clipfast.export")

__all__ = ["CALIBRATION_BATCH", "TowerFidelity", "calibration_inputs", "embedding_gates",
           "golden_data", "load_rgb", "ort_session", "run_graph", "tower_gates",
           "tower_reference"]

CALIBRATION_BATCH = 8


def ort_session(path: Path, precision: str | None = None):
    """A CPU session of ``path`` as the runtime would open it on this host: a full-range int8
    graph on a CPU whose integer kernels saturate runs its Q/DQ pairs as float
    (clipfast.backends.onnxruntime.int8_plan), and an fp16 graph (``precision="fp16"``) runs
    without the optimizers the runtime disables for fp16, so the export measures what users will
    get."""
    import onnxruntime as ort

    from clipfast.backends.onnxruntime import precision_disabled_optimizers

    so = ort.SessionOptions()
    so.log_severity_level = 3  # fp16 / QDQ graphs log harmless CPU fallback warnings
    if host_cpu().int8_saturates:
        from clipfast.export.quant_graph import int8_weight_abs_max
        from clipfast.export.quant_options import SAFE_WEIGHT_MAX

        if (int8_weight_abs_max(path) or 0) > SAFE_WEIGHT_MAX:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(precision_disabled_optimizers(precision))
                                or None)


def run_graph(session, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Run ``session`` on each feed (cast to the graph's input dtypes); float32 (N, D)."""
    from clipfast.backends.onnxruntime import ORT_NUMPY_DTYPES

    types = {i.name: ORT_NUMPY_DTYPES.get(i.type, np.float32) for i in session.get_inputs()}
    out = []
    for feed in feeds:
        cast = {k: np.ascontiguousarray(v, dtype=types[k]) for k, v in feed.items()}
        out.append(session.run(None, cast)[0].astype(np.float32))
    return np.concatenate(out)


def tower_reference(source, which: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The source (PyTorch, fp32) tower on ``feed``: float32 (N, D), not normalised."""
    import torch

    tower = source.image_tower if which == "image" else source.text_tower
    names = ["pixel_values"] if which == "image" else list(source.text_inputs)
    with torch.inference_mode():
        return tower(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names]
                     ).float().numpy()


def load_rgb(items: list[Any]) -> list[Any]:
    """The readable images of ``items`` as RGB (unreadable ones are skipped, with a warning)."""
    from clipfast.errors import ImageLoadError
    from clipfast.inputs.preprocess import load_image

    rgb = []
    for i, item in enumerate(items):
        try:
            rgb.append(load_image(item, index=i))
        except ImageLoadError as e:
            log.warning("export: skipping image: %s", e)
    return rgb


def calibration_inputs(source, images_dir: Path | None = None, *, batch: int = CALIBRATION_BATCH
                       ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]],
                                  dict[str, Any]]:
    """Calibration feeds for int8: ``(image feeds, text feeds, description)``.

    Image feeds: ``{"pixel_values": float32 (B, 3, H, W)}`` preprocessed exactly as the runtime
    does, from ``images_dir`` or the built-in generated set (seed 1: not the seed-0 images the
    fidelity is measured on). Text feeds: ``{name: int32 (B, L)}`` from the built-in captions.
    """
    from clipfast.artifact.samples import CAPTIONS, sample_images
    from clipfast.export.tokenization import PARITY_TEXTS
    from clipfast.export.verify import images_from_dir
    from clipfast.inputs.preprocess import normalize, resize_and_crop

    if images_dir is not None:
        items: list[Any] = [str(p) for p in images_from_dir(images_dir)]
        where = str(images_dir)
    else:
        items = sample_images(32, seed=1)
        where = "built-in generated images (seed 1)"
    rgb = load_rgb(items)
    if not rgb:
        raise ExportError(f"--calibration-images {where}: no readable images")
    cfg = source.preprocess
    pixels = np.stack([normalize(resize_and_crop(im, cfg), cfg) for im in rgb])
    texts = list(CAPTIONS) + [t for t in PARITY_TEXTS if len(t) < 200]
    tokens = source.reference_tokenize(texts)
    tokens = {k: np.asarray(tokens[k], dtype=np.int32) for k in source.text_inputs}
    image_feeds = [{"pixel_values": pixels[s:s + batch]} for s in range(0, len(pixels), batch)]
    text_feeds = [{k: v[s:s + batch] for k, v in tokens.items()}
                  for s in range(0, len(texts), batch)]
    return image_feeds, text_feeds, {"images_from": where, "images": len(pixels),
                                     "texts": len(texts)}


class TowerFidelity:
    """Fidelity of candidate tower graphs against the fp32 PyTorch source, tower by tower (the
    int8 guard's ``measure``): the same images / captions as the export's final measurement,
    fed as the reference transform's pixels and the reference tokenizer's ids; ``precision`` is
    the candidates' (sessions open as the runtime opens that precision)."""

    def __init__(self, source, images: list[Any] | None = None, precision: str | None = None):
        from clipfast.artifact.samples import sample_captions, sample_images

        self.source = source
        self.precision = precision
        rgb = load_rgb(images if images is not None else sample_images())
        texts = sample_captions(max(len(rgb), 2))
        pixels = np.stack([np.asarray(source.reference_transform(im), dtype=np.float32)
                           for im in rgb])
        tokens = source.reference_tokenize(texts)
        tokens = {k: np.asarray(tokens[k], dtype=np.int32) for k in source.text_inputs}
        b = CALIBRATION_BATCH
        self.image_feeds = [{"pixel_values": pixels[s:s + b]} for s in range(0, len(pixels), b)]
        self.text_feeds = [{k: v[s:s + b] for k, v in tokens.items()}
                           for s in range(0, len(texts), b)]
        self.ref_img = l2_normalize(np.concatenate(
            [tower_reference(source, "image", f) for f in self.image_feeds]))
        self.ref_txt = l2_normalize(np.concatenate(
            [tower_reference(source, "text", f) for f in self.text_feeds]))
        self.pairs = min(len(rgb), len(texts))
        self.img: np.ndarray | None = None  # the accepted image tower's embeddings

    def image(self, path: Path) -> dict[str, Any]:
        img = l2_normalize(run_graph(ort_session(path, self.precision), self.image_feeds))
        return {
            "image_centred_rel_error": float(centred_relative_error(img, self.ref_img).max()),
            "image_cosine": float(cosine(img, self.ref_img).min()),
            "top1_agreement": top1_agreement(img, self.ref_txt, self.ref_img, self.ref_txt),
            "retrieval_pairs": self.pairs,
        }

    def text(self, path: Path) -> dict[str, Any]:
        txt = l2_normalize(run_graph(ort_session(path, self.precision), self.text_feeds))
        img = self.img if self.img is not None else self.ref_img
        return {
            "text_centred_rel_error": float(centred_relative_error(txt, self.ref_txt).max()),
            "text_cosine": float(cosine(txt, self.ref_txt).min()),
            "top1_agreement": top1_agreement(img, txt, self.ref_img, self.ref_txt),
            "retrieval_pairs": self.pairs,
        }


def tower_gates(gates: dict[str, Any], which: str) -> dict[str, Any]:
    """The gates one tower's graph is held to on its own: its embedding gates and the shared
    retrieval gates."""
    shared = ("top1_agreement_min", "retrieval_pairs_min")
    return {k: v for k, v in gates.items() if k.startswith(f"{which}_") or k in shared}


def embedding_gates(gates: dict[str, Any], which: str) -> dict[str, Any]:
    """The gates on one tower's embeddings alone (``image_*`` / ``text_*``)."""
    return {k: v for k, v in gates.items() if k.startswith(f"{which}_")}


def golden_data(source):
    """Golden inputs and the fp32 source's outputs (clipfast.artifact.selfcheck): the first
    generated
    images of the fidelity set as the reference transform's pixels, and captions as the
    reference tokenizer's ids."""
    from clipfast.artifact.samples import sample_images
    from clipfast.artifact.selfcheck import GOLDEN_IMAGES, Golden, golden_texts

    rgb = load_rgb(sample_images()[:GOLDEN_IMAGES])
    pixels = np.stack([np.asarray(source.reference_transform(im), dtype=np.float32)
                       for im in rgb])
    tokens = source.reference_tokenize(golden_texts())
    tokens = {k: np.asarray(tokens[k], dtype=np.int32) for k in source.text_inputs}
    return Golden(pixels, tokens, tower_reference(source, "image", {"pixel_values": pixels}),
                  tower_reference(source, "text", tokens))

