"""The work one timed call does: an artifact's inputs at the largest batch (generated sample
images and captions, or a folder of images for end-to-end rows), the callable for each row, and
the engine behind it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfast.bench.config import BASELINE, TEXT_LENGTHS, BenchConfig
from clipfast.errors import ClipfastError
from clipfast.types import IMAGE_SUFFIXES


def model_label(manifest) -> str:
    """A short, stable name for an artifact's source model (rows of one source share the torch
    baseline): the open_clip name (with its tag unless random), or the transformers id / dir."""
    src = manifest.spec.source
    model = str(src.get("model", "?"))
    if model.startswith("transformers:"):
        ref = model[len("transformers:"):]
        if os.path.isabs(ref) or os.path.exists(ref):
            arch = manifest.spec.architecture or {}
            ref = arch.get("name") or Path(ref).name
        return f"transformers:{ref}"
    tag = src.get("pretrained")
    return model if tag in (None, "", "none") else f"{model}:{tag}"


def image_files(directory: Path) -> list[Path]:
    """The image files under ``directory``, listed as ``clipfast encode`` and ``embed`` list
    folders (``clipfast.inputs.listing``); a ClipfastError when none."""
    from clipfast.inputs.listing import walk_images

    files = [Path(p) for p in walk_images(str(directory))]
    if not files:
        raise ClipfastError(f"--images {str(directory)!r}: no image files "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return files


def _cycle(items: Sequence[Any], n: int) -> list[Any]:
    return [items[i % len(items)] for i in range(n)]


@dataclass
class Inputs:
    """Inputs of one artifact at the largest batch; rows slice them. pixels: float32
    (B, 3, H, W) of generated sample images; tokens: {name: int64 (B, L)}; paths / captions
    for the end-to-end rows."""

    pixels: Any
    tokens: dict[str, Any]
    captions: list[str]
    paths: list[str]
    # text tower rows: {tokens per text: ({name: int64 (B, context)}, lengths int64 (B,))}
    texts_by_length: dict[int, tuple[dict[str, Any], Any]] | None = None


def texts_of_length(tokenizer, length: int, count: int) -> tuple[dict[str, Any], Any]:
    """``count`` texts of ``length`` tokens each (special tokens included; fewer only where the
    tokenizer cannot make exactly that many), tokenized: ``(ids, lengths)``. Words are taken
    from the sample captions in turn and added one at a time until the text is that long."""
    import numpy as np

    from clipfast.artifact.samples import CAPTIONS

    words = " ".join(CAPTIONS).split()
    length = min(int(length), tokenizer.context_length)
    texts = []
    for i in range(count):
        n, best = 1, ""
        while n <= 4 * length:
            text = " ".join(words[(i + k) % len(words)] for k in range(n))
            if int(tokenizer.encode([text])[1][0]) > length:
                break
            best, n = text, n + 1
        texts.append(best)
    ids, lengths = tokenizer.encode(texts)
    return ids, np.asarray(lengths)


def prepare_inputs(manifest, max_batch: int, images: Path | None, towers: Iterable[str]
                   ) -> Inputs:
    """The artifact's inputs at ``max_batch`` for ``towers`` (and the end-to-end rows)."""
    import numpy as np

    from clipfast.artifact.samples import CAPTIONS, sample_images
    from clipfast.inputs.preprocess import preprocess_batch
    from clipfast.inputs.tokenizer import Tokenizer

    towers = set(towers)
    pixels = tokens = None
    if "image" in towers:
        # Real preprocessed pixels (not zeros): value-dependent paths (denormals) stay honest.
        base = preprocess_batch(sample_images(min(max_batch, 12)), manifest.spec.preprocess)
        pixels = np.ascontiguousarray(np.resize(base, (max_batch, *base.shape[1:])))
    captions = _cycle(CAPTIONS, max_batch)
    by_length = None
    if "text" in towers:
        tok_cfg = manifest.spec.tokenizer
        tokenizer = Tokenizer(tok_cfg, manifest.path(tok_cfg.file))
        tokens = tokenizer(captions)
        lengths = sorted({min(n, tokenizer.context_length) for n in TEXT_LENGTHS})
        by_length = {n: texts_of_length(tokenizer, n, min(max_batch, 16)) for n in lengths}
        by_length = {n: ({k: np.resize(v, (max_batch, v.shape[1])) for k, v in ids.items()},
                         np.resize(lens, max_batch)) for n, (ids, lens) in by_length.items()}
    paths = [str(p) for p in _cycle(image_files(images), max_batch)] if images else []
    return Inputs(pixels, tokens or {}, captions, paths, by_length)


def _source_of(engine) -> Any:
    """The torch backend's loaded SourceModel (its reference transform and tokenizer make the
    PyTorch end-to-end pipeline), or None."""
    return engine.backend_info().source_model


def row_callable(engine, tower: str, mode: str, batch: int, inputs: Inputs,
                 text_length: int | None = None) -> Callable[[], Any]:
    """The work one timed call does. ``text_length``: text tower rows run texts of that many
    tokens (``Inputs.texts_by_length``); the torch baseline pads them to the context, as
    open_clip does, the other backends as the artifact's text path does (only to the longest
    text on the dynamic path)."""
    if mode == "tower":
        if tower == "image":
            pix = inputs.pixels[:batch]
            return lambda: engine.run_image_tower(pix)
        if text_length is not None and inputs.texts_by_length:
            import numpy as np

            ids, lengths = inputs.texts_by_length[text_length]
            tok = {k: v[:batch] for k, v in ids.items()}
            lens = lengths[:batch]
            if engine.backend == BASELINE:
                lens = np.full(batch, next(iter(tok.values())).shape[1], dtype=np.int64)
            return lambda: engine.run_text_tower(tok, lens)
        tok = {k: v[:batch] for k, v in inputs.tokens.items()}
        return lambda: engine.run_text_tower(tok)
    source = _source_of(engine) if engine.backend == BASELINE else None
    if tower == "image":
        paths = inputs.paths[:batch]
        if source is None:
            return lambda: engine.encode_images(paths)
        # PyTorch users' pipeline: PIL decode + the source's own transform + eager model.
        import numpy as np
        from PIL import Image

        from clipfast.artifact.fidelity import l2_normalize

        def torch_images():
            arrays = []
            for p in paths:
                with Image.open(p) as im:
                    arrays.append(source.reference_transform(im.convert("RGB")))
            return l2_normalize(engine.run_image_tower(np.stack(arrays)))

        return torch_images
    captions = inputs.captions[:batch]
    if source is None:
        return lambda: engine.encode_texts(captions)
    from clipfast.artifact.fidelity import l2_normalize

    return lambda: l2_normalize(engine.run_text_tower(source.reference_tokenize(captions)))


def cuda_sync(device: str) -> Callable[[], Any] | None:
    """What to call after each timed call so queued GPU work is counted (None on CPU)."""
    if device != "cuda":
        return None
    try:
        import torch
    except ImportError:
        return None  # onnxruntime returns host arrays: each call has synchronised already
    return torch.cuda.synchronize if torch.cuda.is_available() else None


# Bench paths beyond the backend names: a backend with the options that select a precision,
# and auto (the host's measured choice, clipfast.backends.tune) with what it may lower to.
PATHS = {
    "openvino-bf16": ("openvino", {"backend_options": {"ov_precision": "bf16"}}),
    "auto": ("auto", {"allow_precisions": ()}),
    "auto-bf16": ("auto", {"allow_precisions": ("bf16",)}),
}


def load_engine(artifact: Path, backend: str, config: BenchConfig, verify: bool):
    """The artifact on one backend (or a path of ``PATHS``), no fallback: a backend that cannot
    run is skipped."""
    import clipfast

    name, extra = PATHS.get(backend, (backend, {}))
    return clipfast.Engine(artifact, backend=name, device=config.device, fallback=False,
                           batch_size=max(config.batch_sizes), threads=config.threads,
                           verify_checksums=verify, **extra)
