"""Measure an artifact against its PyTorch source: pixels, token ids, embeddings, rankings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipfast.artifact.fidelity import (
    centred_relative_error,
    cosine,
    l2_normalize,
    pixel_levels,
    top1_agreement,
)
from clipfast.artifact.samples import sample_captions, sample_images
from clipfast.errors import ClipfastError, ImageLoadError
from clipfast.export.source import SourceModel
from clipfast.export.tokenization import PARITY_TEXTS
from clipfast.types import IMAGE_SUFFIXES

log = logging.getLogger("clipfast.export")



def images_from_dir(directory: str | Path, limit: int = 256) -> list[Path]:
    """Image files under ``directory`` (at most ``limit``), listed as ``clipfast encode`` and
    ``embed`` list folders (``clipfast.inputs.listing``: hidden entries left out, one order)."""
    from clipfast.inputs.listing import walk_images

    directory = Path(directory)
    if not directory.is_dir():
        raise ClipfastError(f"--images {str(directory)!r}: not a directory")
    files = [Path(p) for p in walk_images(str(directory))]
    if not files:
        raise ClipfastError(f"--images {str(directory)!r}: no image files "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return files[:limit]


def _torch_batches(fn, inputs: list[torch.Tensor], batch: int = 16) -> np.ndarray:
    out = []
    n = inputs[0].shape[0]
    with torch.inference_mode():
        for s in range(0, n, batch):
            out.append(fn(*[t[s:s + batch] for t in inputs]).float().cpu().numpy())
    return np.concatenate(out)


def measure(source: SourceModel, engine, images: list[Any] | None = None,
            texts: list[str] | None = None) -> dict[str, Any]:
    """Compare ``engine`` (the exported runtime path) with ``source`` (the PyTorch reference).

    images: paths / PIL / arrays; default the built-in generated set. texts: default built-in
    captions. Images that fail to load are left out and counted.
    """
    from clipfast.inputs.preprocess import load_image

    items = images if images is not None else sample_images()
    texts = texts if texts is not None else sample_captions(max(len(items), 2))
    rgb, skipped = [], 0
    for i, item in enumerate(items):
        try:
            rgb.append(load_image(item, index=i))
        except ImageLoadError as e:
            skipped += 1
            log.warning("verify: skipping image: %s", e)
    if len(rgb) < 2:
        raise ClipfastError("fidelity needs at least 2 readable images")

    pixels = engine.preprocess(rgb)
    ref_pixels = np.stack([np.asarray(source.reference_transform(im), dtype=np.float32)
                           for im in rgb])
    cfg = source.preprocess
    figures: dict[str, Any] = {
        "images": len(rgb),
        "images_skipped": skipped,
        "texts": len(texts),
        "token_texts": len(texts) + len(PARITY_TEXTS),
        "pixel_levels": pixel_levels(pixels, ref_pixels, cfg.std, cfg.rescale),
    }

    img = engine.encode_images(rgb, normalize=True)
    ref_img = l2_normalize(_torch_batches(source.image_tower, [torch.from_numpy(ref_pixels)]))
    # Tower alone: the same pixels through both, separating graph error from preprocessing.
    tower_img = l2_normalize(engine.run_image_tower(ref_pixels))

    # Token ids are compared on the captions plus an awkward corpus (empty, emoji, CJK, HTML
    # entities, control characters, 10k characters) where tokenizers usually drift.
    id_texts = list(texts) + list(PARITY_TEXTS)
    tokens = engine.tokenize(id_texts)
    ref_tokens = source.reference_tokenize(id_texts)
    identical = all(np.array_equal(np.asarray(tokens[k]), np.asarray(ref_tokens[k]))
                    for k in source.text_inputs)
    ref_tokens = {k: np.asarray(v)[: len(texts)] for k, v in ref_tokens.items()}
    txt = engine.encode_texts(texts, normalize=True)
    ref_txt = l2_normalize(_torch_batches(
        source.text_tower,
        [torch.from_numpy(np.asarray(ref_tokens[k], dtype=np.int32)) for k in source.text_inputs],
    ))

    figures.update({
        "token_ids_identical": bool(identical),
        "image_centred_rel_error": float(centred_relative_error(img, ref_img).max()),
        "image_tower_centred_rel_error": float(centred_relative_error(tower_img, ref_img).max()),
        "image_cosine": float(cosine(img, ref_img).min()),
        "text_centred_rel_error": float(centred_relative_error(txt, ref_txt).max()),
        "text_cosine": float(cosine(txt, ref_txt).min()),
        "top1_agreement": top1_agreement(img, txt, ref_img, ref_txt),
        # image-caption pairs the top-1 agreement is measured on (gated for int8)
        "retrieval_pairs": min(len(rgb), len(texts)),
    })
    return figures
