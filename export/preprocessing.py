"""Read a source model's image preprocessing into a ``PreprocessConfig``, plus its reference.

Each function returns ``(config, reference)`` where ``reference`` is the source's own eval
transform, ``PIL.Image (RGB) -> float32 (3, H, W)``, used to prove the runtime's parity.

open_clip: the config comes from ``model.visual.preprocess_cfg`` (what
``create_model_and_transforms`` merged from the architecture, the pretrained tag and any
``force_preprocess_cfg``); the reference is ``image_transform_v2(PreprocessCfg(...),
is_train=False)``, i.e. torchvision transforms on PIL images:
- "shortest", square size: ``Resize(size)`` (short side to size, long side
  ``int(size * long / short)``) + ``CenterCrop`` (crop offset ``int(round(d / 2))``, zero padding);
- "shortest", non-square size: ``ResizeKeepRatio(size)`` + ``CenterCrop``. ``ResizeKeepRatio``
  is built without the interpolation argument there, so it is always bicubic;
- "longest": ``ResizeKeepRatio(size, longest=1)`` + ``CenterCropOrPad(size, fill=fill_color)``;
- "squash": ``Resize((h, w))``.
open_clip converts to RGB *after* resizing (``MaybeConvertMode``): for RGB inputs, all the
runtime ever passes, the order makes no difference.

transformers: the reference is the PIL backend of the image processor (``*ImageProcessorPil``
classes: ``image_processing_pil_*.py``, the numpy / Pillow path of transformers 4's "slow"
processors). transformers 5 defaults to the torchvision backend (``CLIPImageProcessor`` is now
torchvision-based), which resizes tensors with its own antialiased kernels and does not match
Pillow pixel for pixel; the released checkpoints were trained with Pillow-style preprocessing,
so the PIL backend is the reference. A torchvision-backend processor is read for its settings
and its PIL twin is built from ``to_dict()`` as the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from clipfast.errors import ExportError
from clipfast.inputs.preprocess import INTERPOLATIONS, PreprocessConfig

logger = logging.getLogger(__name__)

Reference = Callable[[Image.Image], np.ndarray]

_PIL_FILTER_NAMES = {int(v): k for k, v in INTERPOLATIONS.items()}


# --------------------------------------------------------------------------- open_clip


def _open_clip_cfg_to_config(pp: dict[str, Any]) -> PreprocessConfig:
    """open_clip ``preprocess_cfg`` dict -> PreprocessConfig reproducing ``image_transform``."""
    from open_clip.transform import PreprocessCfg

    known = set(PreprocessCfg.__dataclass_fields__)
    cfg = PreprocessCfg(**{k: v for k, v in pp.items() if k in known})
    size = cfg.size
    image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    interpolation = cfg.interpolation or "bicubic"
    if interpolation not in ("bicubic", "bilinear", "random"):
        raise ExportError(
            f"open_clip preprocessing: interpolation {interpolation!r} is not one open_clip's "
            "eval transform accepts (bicubic, bilinear, random)"
        )
    # image_transform: anything but "bilinear" (including "random") is bicubic at eval time.
    interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"

    def _triple(v: Any, name: str) -> tuple[float, float, float]:
        v = tuple(v) if isinstance(v, (list, tuple)) else (v,) * 3
        if len(v) != 3:
            raise ExportError(f"open_clip preprocessing: {name} must have 3 values, got {v}")
        return tuple(float(x) for x in v)  # type: ignore[return-value]

    mean = _triple(cfg.mean, "mean")
    std = _triple(cfg.std, "std")
    resize_mode = cfg.resize_mode or "shortest"
    fill = cfg.fill_color
    if not isinstance(fill, int) or not 0 <= fill <= 255:
        raise ExportError(
            f"open_clip preprocessing: fill_color {fill!r} is not a single 0..255 integer"
        )

    common = {"rescale": 1.0 / 255.0, "offset": 0.0, "mean": mean, "std": std}
    if resize_mode == "shortest":
        square = image_size[0] == image_size[1]
        return PreprocessConfig(
            image_size=image_size,
            resize_mode="shortest",
            resize_size=image_size[0] if square else image_size,
            # Non-square targets go through ResizeKeepRatio, built without the interpolation.
            interpolation=interpolation if square else "bicubic",
            crop=True,
            crop_rounding="round",
            fill_color=0,  # torchvision CenterCrop pads with 0 (never needed after this resize)
            **common,
        )
    if resize_mode == "longest":
        return PreprocessConfig(
            image_size=image_size,
            resize_mode="longest",
            resize_size=image_size,
            interpolation=interpolation,
            crop=True,
            crop_rounding="round",
            fill_color=fill,
            **common,
        )
    if resize_mode == "squash":
        return PreprocessConfig(
            image_size=image_size,
            resize_mode="squash",
            resize_size=image_size,
            interpolation=interpolation,
            crop=False,
            **common,
        )
    raise ExportError(
        f"open_clip preprocessing: unknown resize_mode {resize_mode!r} "
        "(expected shortest, longest or squash)"
    )


def open_clip_transform_reference(pp: dict[str, Any]) -> Reference:
    """open_clip's own eval transform for a ``preprocess_cfg`` dict, returning numpy."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    known = set(PreprocessCfg.__dataclass_fields__)
    transform = image_transform_v2(
        PreprocessCfg(**{k: v for k, v in pp.items() if k in known}), is_train=False
    )

    def reference(img: Image.Image) -> np.ndarray:
        return transform(img).numpy().astype(np.float32, copy=False)

    return reference


def open_clip_preprocess_from_cfg(pp: dict[str, Any]) -> tuple[PreprocessConfig, Reference]:
    """(config, reference) from an open_clip ``preprocess_cfg`` dict (no model needed)."""
    return _open_clip_cfg_to_config(pp), open_clip_transform_reference(pp)


def open_clip_preprocess(model: Any) -> tuple[PreprocessConfig, Reference]:
    """(config, reference) for an open_clip model, from ``model.visual.preprocess_cfg``."""
    from open_clip import get_model_preprocess_cfg

    pp = dict(get_model_preprocess_cfg(model))
    if "size" not in pp:
        raise ExportError(
            "open_clip preprocessing: the model carries no image size (no "
            "visual.preprocess_cfg and no visual.image_size)"
        )
    return open_clip_preprocess_from_cfg(pp)


# --------------------------------------------------------------------------- transformers


def _known_preprocess_methods() -> set[Any]:
    """``_preprocess`` implementations whose steps this module knows how to represent."""
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend

    methods = {PilBackend._preprocess, TorchvisionBackend._preprocess}
    try:
        from transformers.models.efficientnet.image_processing_efficientnet import (
            EfficientNetImageProcessor,
        )
        from transformers.models.efficientnet.image_processing_pil_efficientnet import (
            EfficientNetImageProcessorPil,
        )

        methods |= {
            EfficientNetImageProcessor._preprocess,
            EfficientNetImageProcessorPil._preprocess,
        }
    except ImportError:  # a transformers without EfficientNet: nothing to add
        pass
    return methods


def _size_get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _hf_triple(v: Any, name: str, cls: str) -> tuple[float, float, float]:
    v = tuple(v) if isinstance(v, (list, tuple)) else (v,) * 3
    if len(v) != 3:
        raise ExportError(f"{cls}: {name} must have 3 values, got {v}")
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def hf_processor_config(proc: Any) -> PreprocessConfig:
    """PreprocessConfig from a transformers image processor's attributes (never its name)."""
    cls = type(proc).__name__
    if type(proc)._preprocess not in _known_preprocess_methods():
        raise ExportError(
            f"{cls}: custom preprocessing steps (_preprocess is overridden); only the generic "
            "resize / center crop / rescale / normalize pipeline (and EfficientNet's "
            "rescale_offset / include_top) can be represented"
        )
    unsupported = []
    if not getattr(proc, "do_resize", True):
        unsupported.append("do_resize=False (input size would follow the image)")
    if getattr(proc, "do_pad", None):
        unsupported.append(f"do_pad={proc.do_pad}")
    if unsupported:
        raise ExportError(f"{cls}: cannot represent {', '.join(unsupported)}")

    resample = getattr(proc, "resample", None)
    resample = Image.Resampling.BILINEAR if resample is None else resample
    try:
        interpolation = _PIL_FILTER_NAMES[int(resample)]
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{cls}: cannot represent resample={resample!r}") from exc

    size = proc.size
    shortest = _size_get(size, "shortest_edge")
    height, width = _size_get(size, "height"), _size_get(size, "width")
    others = {
        k: _size_get(size, k)
        for k in ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")
    }
    others = {k: v for k, v in others.items() if v}
    if others:
        raise ExportError(f"{cls}: cannot represent size with {others} (size={size})")
    if shortest and not (height or width):
        resize_mode, resize_size = "shortest", int(shortest)
    elif height and width and not shortest:
        resize_mode, resize_size = "squash", (int(height), int(width))
    else:
        raise ExportError(
            f"{cls}: cannot represent size={size} (expected shortest_edge or height/width)"
        )

    if getattr(proc, "do_center_crop", False):
        crop_size = proc.crop_size
        ch, cw = _size_get(crop_size, "height"), _size_get(crop_size, "width")
        if not (ch and cw):
            raise ExportError(f"{cls}: cannot represent crop_size={crop_size}")
        image_size, crop = (int(ch), int(cw)), True
    elif resize_mode == "squash":
        image_size, crop = resize_size, False  # type: ignore[assignment]
    else:
        raise ExportError(
            f"{cls}: shortest_edge resize without center crop gives a variable input size"
        )

    rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else 1.0
    offset = -1.0 if getattr(proc, "rescale_offset", False) else 0.0
    if getattr(proc, "do_normalize", False):
        mean = _hf_triple(proc.image_mean, "image_mean", cls)
        std = _hf_triple(proc.image_std, "image_std", cls)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if getattr(proc, "include_top", False):
        # EfficientNet divides by image_std a second time (mean 0). Folded into one division:
        # equal up to float32 rounding (about 1 ulp), not bit for bit.
        s = _hf_triple(proc.image_std, "image_std", cls)
        std = tuple(a * b for a, b in zip(std, s, strict=True))  # type: ignore[assignment]

    return PreprocessConfig(
        image_size=image_size,
        resize_mode=resize_mode,
        resize_size=resize_size,
        interpolation=interpolation,
        crop=crop,
        crop_rounding="floor",
        fill_color=0,  # transformers' center_crop pads with zeros
        rescale=rescale,
        offset=offset,
        mean=mean,
        std=std,
    )


def hf_pil_reference_processor(proc: Any) -> Any:
    """The PIL-backend twin of a transformers image processor (itself if already PIL)."""
    if getattr(proc, "backend", None) == "pil":
        return proc
    import transformers

    name = type(proc).__name__
    pil_cls = getattr(transformers, f"{name}Pil", None)
    if pil_cls is None:
        raise ExportError(
            f"{name}: transformers {transformers.__version__} has no PIL backend "
            f"({name}Pil) to serve as the pixel reference"
        )
    return pil_cls.from_dict(proc.to_dict())


def hf_preprocess(image_processor: Any) -> tuple[PreprocessConfig, Reference]:
    """(config, reference) for a transformers image processor.

    The reference is the processor's PIL backend (see module docstring), returning float32
    (3, H, W) for one RGB PIL image.
    """
    cfg = hf_processor_config(image_processor)
    ref_proc = hf_pil_reference_processor(image_processor)
    if ref_proc is not image_processor:
        logger.info(
            "%s uses the %s backend; pixel reference: %s",
            type(image_processor).__name__,
            getattr(image_processor, "backend", "?"),
            type(ref_proc).__name__,
        )

    def reference(img: Image.Image) -> np.ndarray:
        out = ref_proc(images=img, return_tensors="np")["pixel_values"]
        return np.asarray(out[0], dtype=np.float32)

    return cfg, reference
