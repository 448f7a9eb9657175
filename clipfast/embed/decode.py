"""Per-batch work of ``clipfast embed`` and Ray Data around the Engine's image pipeline, and
the fast-decode measurement.

Images are prepared by the Engine's own pipeline (``engine.images``,
``clipfast.inputs.pipeline``: the Engine's loading policy, decode path and pool), so embed rows
equal ``Engine.encode_images`` rows. ``--fast-decode`` adds two Pillow shortcuts, both not
pixel-exact, whose cost is measured on the job's own inputs (``measure_fast_decode``) and
recorded in the output manifest:

- JPEG draft: the decoder downscales in the DCT domain by 1/2, 1/4 or 1/8 while each side stays
  at least ``DRAFT_FACTOR`` times the size the resize step produces;
- ``reducing_gap``: Pillow first shrinks by an integer factor with a box filter while the image
  stays at least ``REDUCING_GAP`` times the target, then applies the model's filter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipfast.artifact.fidelity import centred_relative_error, cosine, l2_normalize
from clipfast.embed.sources import Item
from clipfast.inputs.pipeline import (
    DRAFT_FACTOR,
    REDUCING_GAP,
    LoadPolicy,
    PreparedImages,
    draft_size,
)
from clipfast.inputs.preprocess import (
    PreprocessConfig,
    load_image,
    normalize,
    resize_and_crop,
)
from clipfast.types import Failure


@dataclass(frozen=True)
class ImagePolicy:
    """How images are loaded: the Engine's loading policy plus the fast-decode switch."""

    cfg: PreprocessConfig
    exif_transpose: bool = True
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    max_bytes: int | None = None
    fast: bool = False

    @classmethod
    def of(cls, engine, fast: bool = False) -> ImagePolicy:
        pol = engine.images.policy
        return cls(engine.preprocess_config, pol.exif_transpose, tuple(pol.alpha_background),
                   pol.max_bytes, fast)

    def kwargs(self) -> dict[str, Any]:
        return LoadPolicy(self.exif_transpose, self.alpha_background,
                          self.max_bytes).kwargs(self.cfg, self.fast)


@dataclass
class Prepared:
    """A batch ready for a tower: ``inputs`` (float32 (M, 3, H, W) pixels, or token arrays),
    the M good items, and ``failures`` as (item, reason)."""

    inputs: Any
    good: list[Item]
    failures: list[tuple[Item, str]]


def split_images(items: list[Item]) -> tuple[list[Item], list[tuple[Item, str]]]:
    """The items to decode (paths and bytes), and (item, reason) for the others."""
    ok: list[Item] = []
    failures: list[tuple[Item, str]] = []
    for item in items:
        if item.kind == "error":
            failures.append((item, str(item.value)))
        elif item.kind not in ("path", "bytes"):
            failures.append((item, f"expected an image, got {item.kind}"))
        else:
            ok.append(item)
    return ok, failures


def _reason(f: Failure) -> str:
    # The pipeline's messages start "image <index> (<what>): "; the failures table's key and
    # ordinal say that.
    msg = f.error
    prefix = f"image {f.index} ({f.item}): "
    if msg.startswith(prefix):
        msg = msg[len(prefix):]
    return msg or "failed"


def item_results(ok: list[Item], p: PreparedImages, failures: list[tuple[Item, str]]
                 ) -> tuple[list[Item], list[tuple[Item, str]]]:
    """The good items of a prepared batch of ``ok`` (its positions count from ``p.offset``)
    and every failure: ``failures`` (items never decoded) plus the batch's own."""
    good = [ok[i - p.offset] for i in p.indices]
    return good, failures + [(ok[f.index - p.offset], _reason(f)) for f in p.failures]


def prepare_texts(items: list[Item], tokenizer) -> Prepared:
    good = [it for it in items if it.kind == "text" and isinstance(it.value, str)]
    failures = [(it, str(it.value) if it.kind == "error" else f"expected text, got {it.kind}")
                for it in items if not (it.kind == "text" and isinstance(it.value, str))]
    tokens = tokenizer([it.value for it in good]) if good else None
    return Prepared(tokens, good, failures)


# --------------------------------------------------------------------------- fidelity


def _uint8_pixels(value: Any, policy: ImagePolicy, fast: bool) -> np.ndarray:
    kw = ImagePolicy(policy.cfg, policy.exif_transpose, policy.alpha_background,
                     policy.max_bytes, fast).kwargs()
    gap = kw.pop("reducing_gap")
    img = load_image(value, **kw)
    return resize_and_crop(img, policy.cfg, reducing_gap=gap)


def measure_fast_decode(engine, values: list[Any], policy: ImagePolicy) -> dict[str, Any]:
    """What --fast-decode costs on ``values`` (paths or bytes of the job's own images): pixel
    difference in uint8 levels before normalisation, and the embeddings' centred relative error
    and cosine against the exact path (the measures of clipfast.artifact.fidelity)."""
    t0 = time.perf_counter()
    exact, fast = [], []
    for v in values:
        try:
            a = _uint8_pixels(v, policy, False)
            b = _uint8_pixels(v, policy, True)
        except Exception:
            continue  # an input that fails is reported by the job itself
        exact.append(a)
        fast.append(b)
    doc: dict[str, Any] = {"draft_factor": DRAFT_FACTOR, "reducing_gap": REDUCING_GAP,
                           "sample": len(exact)}
    if len(exact) < 2:
        doc["note"] = "fewer than 2 decodable images in the sample: not measured"
        return doc
    diff = np.abs(np.stack(exact).astype(np.int16) - np.stack(fast).astype(np.int16))
    ex = np.stack([normalize(a, policy.cfg) for a in exact])
    fa = np.stack([normalize(b, policy.cfg) for b in fast])
    e_ref = l2_normalize(engine.run_image_tower(ex))
    e_fast = l2_normalize(engine.run_image_tower(fa))
    err = centred_relative_error(e_fast, e_ref)
    cos = cosine(e_fast, e_ref)
    doc.update({
        "pixel_max_levels": int(diff.max()),
        "pixel_mean_abs_levels": round(float(diff.mean()), 4),
        "centred_rel_error_max": float(err.max()),
        "centred_rel_error_mean": float(err.mean()),
        "cosine_min": float(cos.min()),
        "seconds": round(time.perf_counter() - t0, 3),
    })
    return doc


def sample_values(items, n: int) -> list[Any]:
    """The first ``n`` image payloads (paths or bytes) of an item stream."""
    out = []
    for item in items:
        if item.kind in ("path", "bytes") and item.value is not None:
            out.append(item.value)
            if len(out) >= n:
                break
    return out


__all__ = ["DRAFT_FACTOR", "REDUCING_GAP", "ImagePolicy", "Prepared", "draft_size",
           "item_results", "measure_fast_decode", "prepare_texts", "sample_values",
           "split_images"]
