"""Per-batch work of ``clipfast embed`` (run in decode threads) and the fast-decode settings.

The exact path is the Engine's own preprocessing (``clipfast.inputs.preprocess.preprocess_image``
with
the Engine's loading policy), so embed rows equal ``Engine.encode_images`` rows. ``--fast-decode``
adds two Pillow shortcuts, both not pixel-exact, whose cost is measured on the job's own
inputs (``measure_fast_decode``) and recorded in the output manifest:

- JPEG draft: the decoder downscales in the DCT domain by 1/2, 1/4 or 1/8 while each side stays
  at least ``DRAFT_FACTOR`` times the size the resize step produces;
- ``reducing_gap``: Pillow first shrinks by an integer factor with a box filter while the image
  stays at least ``REDUCING_GAP`` times the target, then applies the model's filter.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipfast.artifact.fidelity import centred_relative_error, cosine, l2_normalize
from clipfast.embed.sources import Item
from clipfast.inputs.preprocess import (
    PreprocessConfig,
    load_image,
    normalize,
    preprocess_image,
    resize_and_crop,
    resized_size,
)

# Each side of the drafted image is at least this many times the resized (pre-crop) size; 2 is
# what Pillow's own thumbnail() uses, and keeps the model's filter doing the last 2x or more.
DRAFT_FACTOR = 2.0
# Pillow's default for thumbnail(); only bites where draft could not shrink enough (PNG, WebP,
# JPEGs larger than 16x the target).
REDUCING_GAP = 2.0


def draft_size(cfg: PreprocessConfig):
    """The ``draft`` callable for ``load_image``: stored (w, h) -> the smallest size to decode.

    The scale is the larger of the two axes' resize scales, so it holds whatever EXIF rotation
    is applied after decoding."""

    def wanted(size: tuple[int, int]) -> tuple[int, int] | None:
        w, h = size
        new_h, new_w = resized_size(h, w, cfg)
        scale = max(new_h / h, new_w / w) * DRAFT_FACTOR
        if scale >= 0.5:
            return None  # the draft could not shrink by even 1/2
        return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))

    return wanted


@dataclass(frozen=True)
class ImagePolicy:
    """How images are loaded: the Engine's policy plus the fast-decode switch."""

    cfg: PreprocessConfig
    exif_transpose: bool = True
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    max_bytes: int | None = None
    fast: bool = False

    @classmethod
    def of(cls, engine, fast: bool = False) -> ImagePolicy:
        return cls(engine.preprocess_config, engine.exif_transpose,
                   tuple(engine.alpha_background), engine.max_image_bytes, fast)

    def kwargs(self) -> dict[str, Any]:
        return {
            "exif_transpose": self.exif_transpose,
            "alpha_background": self.alpha_background,
            "max_bytes": self.max_bytes,
            "draft": draft_size(self.cfg) if self.fast else None,
            "reducing_gap": REDUCING_GAP if self.fast else None,
        }


@dataclass
class Prepared:
    """A batch ready for a tower: ``inputs`` (float32 (M, 3, H, W) pixels, or token arrays),
    the M good items, and ``failures`` as (item, reason)."""

    inputs: Any
    good: list[Item]
    failures: list[tuple[Item, str]]


def prepare_images(items: list[Item], policy: ImagePolicy) -> Prepared:
    """Decode and preprocess one batch (in a worker thread: Pillow releases the GIL)."""
    h, w = policy.cfg.image_size
    out = np.empty((len(items), 3, h, w), dtype=np.float32)
    good: list[Item] = []
    failures: list[tuple[Item, str]] = []
    kw = policy.kwargs()
    for item in items:
        if item.kind == "error":
            failures.append((item, str(item.value)))
            continue
        if item.kind not in ("path", "bytes"):
            failures.append((item, f"expected an image, got {item.kind}"))
            continue
        try:
            preprocess_image(item.value, policy.cfg, out=out[len(good)], **kw)
        except Exception as e:  # every fault of one input is that input's failure
            failures.append((item, _reason(e, item)))
            continue
        good.append(item)
    return Prepared(out[:len(good)], good, failures)


def _reason(exc: BaseException, item: Item) -> str:
    msg = str(exc)
    # ImageLoadError messages start "image <what>: "; the failures table's key says that.
    prefix = f"image {getattr(exc, 'item', None)}: "
    if msg.startswith(prefix):
        msg = msg[len(prefix):]
    return msg or type(exc).__name__


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
           "measure_fast_decode", "prepare_images", "prepare_texts", "sample_values"]
