"""The runtime Engine: preprocessing, tokenization and the two towers behind one object."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from clipfast.artifact.fidelity import l2_normalize
from clipfast.artifact.manifest import Manifest, load_manifest
from clipfast.backends import BackendInfo, resolve_backend
from clipfast.backends.batching import chunk_size
from clipfast.errors import ClipfastError, InputError
from clipfast.inputs.pipeline import ImagePipeline, LoadPolicy, PreparedImages, embeddings_result
from clipfast.types import BatchResult, Failure

log = logging.getLogger("clipfast")

__all__ = ["DEFAULT_TEMPLATE", "BatchResult", "Engine", "Failure", "PreparedImages"]

_ERROR_MODES = ("raise", "skip")
DEFAULT_TEMPLATE = "a photo of a {}."


def _check_errors_mode(errors: str) -> None:
    if errors not in _ERROR_MODES:
        raise ValueError(f"errors={errors!r}: expected one of {_ERROR_MODES}")


def _as_list(items: Any, what: str) -> list:
    # A 2-D or 3-D array is one image (whatever its dtype: a float (H, W, 3) or (3, H, W) array
    # would otherwise be iterated as rows); a 4-D array is a batch of images.
    if isinstance(items, (str, bytes, os.PathLike)) or isinstance(items, np.ndarray) and (
        items.ndim in (0, 2, 3)
    ):
        shape = f" of shape {items.shape}" if isinstance(items, np.ndarray) else ""
        raise InputError(f"{what}: expected a list of items, got a single {type(items).__name__}"
                         f"{shape}; wrap it in a list")
    if not isinstance(items, Iterable):
        raise InputError(f"{what}: expected a list, got {type(items).__name__}")
    return list(items)


class Engine:
    """Run an exported artifact.

    >>> engine = Engine("artifacts/vit-b-32")          # doctest: +SKIP
    >>> engine.encode_images(["cat.jpg"]).shape          # doctest: +SKIP
    (1, 512)

    backend: "auto", "tensorrt", "onnxruntime", "openvino" or "torch". "auto" tries, on device
        "cuda", tensorrt, onnxruntime (CUDA, then CPU), torch; on "cpu" it measures onnxruntime
        and openvino on this host and keeps the fastest that passes the gates (cached per host,
        ``clipfast.backends.tune``), torch when neither runs; each
        skipped one is listed with its reason in ``fallbacks``. ``fallback=False`` makes "auto"
        raise at the first backend that cannot run instead of trying the next.
    device: "cpu" (default) or "cuda". ``backend_device`` says where the towers really run.
        With the towers on CUDA, images are preprocessed on the GPU (the csrc kernel, driven
        through PyTorch: torch is imported whatever the backend) when the kernel library and
        torch with CUDA are there, else on the CPU with Pillow; ``describe()["preprocess"]``
        names the path taken and ``fallbacks`` why the GPU one was skipped.
    batch_size: inputs per tower call; any number of inputs is accepted and chunked (to the
        backend's largest batch too, e.g. a TensorRT profile's max).
    backend_options: passed to the backend (see each backend module), e.g.
        ``{"profile": {"min": 1, "opt": 64, "max": 256}, "build": "never"}`` for tensorrt,
        ``{"dtype": "fp16", "cuda_graphs": True, "compile": False}`` for torch.
    exif_transpose / alpha_background: image loading policy (see ``clipfast.inputs.preprocess``).
    max_image_bytes: the most bytes read from one image path or file object; None (default)
        follows ``clipfast.inputs.image_io.MAX_IMAGE_BYTES`` (256 MiB).
    decode_workers: threads of the engine's one image decode pool (default: ``threads``, else
        the CPU count); it lives as long as the engine (``close()`` shuts it down).
    allow_precisions: precisions below the artifact's that ``backend="auto"`` may pick on the
        CPU when measured faster: ``("bf16",)`` (OpenVINO on AVX512_BF16 / AMX CPUs, held to the
        bf16 gates). None (default) reads ``CLIPFAST_ALLOW_PRECISIONS`` (unset: none, so the
        artifact's precision is never lowered unasked). ``describe()["compute_precision"]``
        names what runs, ``describe()["auto"]`` the measured choice.
    self_check: run the artifact's golden inputs through the chosen backend and compare with the
        fp32 source's outputs stored at export, with the artifact's gates
        (``clipfast.artifact.selfcheck``). Below the gate, "auto" moves on to the next
        backend (``fallbacks`` holds the figures) and an explicit backend raises FidelityError.
        ``self_check_figures`` holds the chosen backend's figures.

    Images go through one input pipeline, ``engine.images`` (``clipfast.inputs.pipeline``):
    the loading policy, the decode path (Pillow on CPU threads, or the GPU), the decode pool,
    per-item failures and normalisation. A server or any caller that groups requests itself
    uses its two steps:

    ``prepare_images(items, *, offset=0) -> PreparedImages``: decode and preprocess one
        request's images (never raises for a bad item): ``pixels`` (what the image tower
        takes: numpy on the CPU path, a device tensor on the GPU path), ``indices`` (absolute:
        ``offset`` + position) and ``failures``.
    ``embed_prepared(prepared, *, normalize=True) -> BatchResult``: run several prepared
        batches through the image tower as one batch (chunked to ``batch_size``); the rows
        come in the order of ``prepared``, ``len(p)`` rows per batch, with their indices, and
        all their failures.
    """

    def __init__(
        self,
        artifact: str | os.PathLike,
        backend: str = "auto",
        device: str | None = None,
        *,
        fallback: bool = True,
        batch_size: int = 32,
        threads: int | None = None,
        verify_checksums: bool = True,
        exif_transpose: bool = True,
        alpha_background: tuple[int, int, int] = (255, 255, 255),
        max_image_bytes: int | None = None,
        prompt_template: str = DEFAULT_TEMPLATE,
        backend_options: dict[str, Any] | None = None,
        self_check: bool = True,
        allow_precisions: Sequence[str] | str | None = None,
        decode_workers: int | None = None,
    ):
        from clipfast.artifact.selfcheck import load_golden, run_self_check
        from clipfast.inputs.tokenizer import Tokenizer

        device = (device or "cpu").lower()
        if device.startswith("cuda:"):
            index = device.split(":", 1)[1]
            if index != "0":
                # One GPU per Engine, the process's first visible one: every backend and the
                # GPU preprocessing would otherwise each need the index threaded through.
                raise ClipfastError(
                    f"device={device!r}: clipfast runs on the first visible GPU; select this one "
                    f"with CUDA_VISIBLE_DEVICES={index} and pass device='cuda'")
            device = "cuda"
        if device not in ("cpu", "cuda"):
            raise ClipfastError(f"device={device!r}: expected 'cpu' or 'cuda'")
        if batch_size < 1:
            raise ClipfastError(f"batch_size={batch_size}: must be at least 1")
        if max_image_bytes is not None and (isinstance(max_image_bytes, bool) or not isinstance(
                max_image_bytes, (int, np.integer)) or max_image_bytes < 0):
            raise ClipfastError(f"max_image_bytes={max_image_bytes!r}: expected a number of "
                                "bytes (a non-negative int) or None")
        if decode_workers is not None and (isinstance(decode_workers, bool) or not isinstance(
                decode_workers, (int, np.integer)) or decode_workers < 1):
            raise ClipfastError(f"decode_workers={decode_workers!r}: expected a number of "
                                "threads (an int of at least 1) or None")
        self.manifest: Manifest = load_manifest(artifact, verify_checksums=verify_checksums)
        self.device = device
        self.batch_size = int(batch_size)
        self.exif_transpose = exif_transpose
        self.alpha_background = tuple(alpha_background)
        self.max_image_bytes = None if max_image_bytes is None else int(max_image_bytes)
        self.prompt_template = prompt_template
        self.preprocess_config = self.manifest.spec.preprocess
        tok_cfg = self.manifest.spec.tokenizer
        self.tokenizer = Tokenizer(tok_cfg, self.manifest.path(tok_cfg.file))
        self.self_check_figures: dict[str, Any] | None = None
        golden = load_golden(self.manifest) if self_check else None
        if self_check and golden is None:
            log.info("clipfast: %s has no golden outputs (exported before they existed); "
                     "self-check skipped", self.manifest.directory)

        def check(candidate, label: str) -> None:
            self.self_check_figures = run_self_check(candidate, self.manifest, golden, label)

        from clipfast.backends.tune import parse_allow

        if allow_precisions is None:
            from clipfast import settings

            allow_precisions = settings.CLIPFAST_ALLOW_PRECISIONS
        self._backend, self.fallbacks = resolve_backend(
            backend, self.manifest, device, fallback=fallback, threads=threads,
            check=check if golden is not None else None, golden=golden,
            allow_precisions=parse_allow(allow_precisions), **(backend_options or {}))
        if self.backend_device != device:
            log.warning("clipfast: device %r was asked for; the %s backend runs on %r (%s)",
                        device, self._backend.name, self.backend_device,
                        "; ".join(f"{n}: {r}" for n, r in self.fallbacks) or "no reason given")
        self._chunk = chunk_size(self.batch_size, self._backend.max_batch)
        self._threads = threads or os.cpu_count() or 1
        gpu_preprocess = None
        self._preprocess_path = "cpu (Pillow): the towers run on the CPU"
        if self.backend_device == "cuda":
            from clipfast.errors import BackendUnavailable
            from clipfast.inputs.gpu_preprocess import GpuPreprocessor

            # GPU preprocessing runs the csrc kernel through torch, whatever the backend.
            try:
                gpu_preprocess = GpuPreprocessor(
                    self.preprocess_config, self.backend_device, exif_transpose=exif_transpose,
                    alpha_background=self.alpha_background, max_bytes=self.max_image_bytes)
                self._preprocess_path = gpu_preprocess.describe()
            except BackendUnavailable as e:
                self.fallbacks.append(("gpu-preprocess", str(e)))
                self._preprocess_path = f"cpu (Pillow): {e}"
        # the one image input pipeline: loading policy, decode path, decode pool
        self.images = ImagePipeline(
            self.preprocess_config,
            LoadPolicy(exif_transpose, self.alpha_background, self.max_image_bytes),
            workers=decode_workers or self._threads, gpu=gpu_preprocess)
        for name, reason in self.fallbacks:
            log.info("clipfast: %s skipped: %s", name, reason)

    # -- facts -------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def backend_device(self) -> str:
        """Where the towers run: "cuda", or "cpu" (also when "cuda" was asked for and the chain
        fell back to a CPU backend; ``fallbacks`` says why)."""
        return self._backend.device

    @property
    def embed_dim(self) -> int:
        return self.manifest.spec.embed_dim

    def backend_info(self) -> BackendInfo:
        """The backend's facts (``clipfast.backends.BackendInfo``): name, device, the precision
        the towers really compute in (the artifact's unless the backend says otherwise),
        providers, batch limits, ``backend="auto"``'s measured choice, its ``describe()``."""
        info = self._backend.info()
        return dataclasses.replace(info, precision=info.precision or self.manifest.spec.precision)

    def describe(self) -> dict[str, Any]:
        info = self.backend_info()
        return {
            **info.details,
            "artifact": str(self.manifest.directory),
            "family": self.manifest.spec.family,
            "precision": self.manifest.spec.precision,
            # what the towers compute in (a backend may run bf16 on an fp32 artifact when
            # asked to; never unsaid)
            "compute_precision": info.precision,
            "requested_device": self.device,
            "batch_size": self._chunk,
            "preprocess": self._preprocess_path,
            "embed_dim": self.embed_dim,
            "fallbacks": list(self.fallbacks),
            "self_check": self.self_check_figures,
            # backend="auto" on the CPU: the measured choice (clipfast.backends.tune)
            "auto": info.tuning,
        }

    def check_golden(self) -> dict[str, Any] | None:
        """Run the self-check again on the engine's backend: the figures, or None for an
        artifact without golden outputs; FidelityError below the gate."""
        from clipfast.artifact.selfcheck import load_golden, run_self_check

        return run_self_check(self._backend, self.manifest, load_golden(self.manifest),
                              f"backend {self.backend} ({self.backend_device})")

    def close(self) -> None:
        """Shut the image decode pool down (the engine stays usable: a later call makes a new
        one)."""
        self.images.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Engine({str(self.manifest.directory)!r}, backend={self.backend!r}, "
                f"device={self.device!r})")

    # -- images ------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Any], errors: str = "raise") -> np.ndarray:
        """Images -> float32 ``(N, 3, H, W)`` as the CPU path prepares them (Pillow decode,
        resize, normalise): what the image tower receives when the Engine preprocesses on the
        CPU. With GPU preprocessing (``describe()["preprocess"]`` says which path runs),
        ``encode_images`` prepares its pixels on the device instead (nvJPEG and the fused
        kernel), which may differ from these slightly.

        With ``errors="skip"`` returns a BatchResult whose ``embeddings`` holds the pixels.
        """
        _check_errors_mode(errors)
        items = _as_list(images, "images")
        p = self.images.prepare(items, 0, errors=errors, gpu=False)
        if errors == "skip":
            return BatchResult(p.pixels, np.asarray(p.indices, dtype=np.int64), p.failures)
        return p.pixels

    def prepare_images(self, items: Sequence[Any], *, offset: int = 0) -> PreparedImages:
        """Decode and preprocess images on the engine's path (the GPU one when it runs) for
        ``embed_prepared``. A bad item never raises: it is a Failure with its absolute position
        (``offset`` + its place in ``items``)."""
        return self.images.prepare(_as_list(items, "images"), offset, errors="skip")

    def embed_prepared(self, prepared: Sequence[PreparedImages], *,
                       normalize: bool = True) -> BatchResult:
        """Run prepared batches through the image tower as one batch (chunked to the engine's
        batch size): float32 rows in the order of ``prepared`` (``len(p)`` per batch), their
        indices and every batch's failures (sorted by index)."""
        prepared = list(prepared)
        indices = [i for p in prepared for i in p.indices]
        failures = [f for p in prepared for f in p.failures]
        parts = [p.pixels for p in prepared if len(p)]
        if not parts:
            emb = np.zeros((0, self.embed_dim), dtype=np.float32)
        elif all(isinstance(x, np.ndarray) for x in parts):
            emb = self.run_image_tower(parts[0] if len(parts) == 1 else np.concatenate(parts))
        else:  # device tensors (the GPU path): stacked and chunked where they are
            import torch

            pixels = parts[0] if len(parts) == 1 else torch.cat(
                [torch.as_tensor(x, device=parts[0].device) for x in parts])
            emb = self._run_image_chunked(pixels)
        if emb.shape[0] != len(indices):
            raise ClipfastError(f"backend {self.backend} returned {emb.shape[0]} image rows for "
                                f"{len(indices)} images")
        return embeddings_result(emb, indices, failures, normalize)

    def run_image_tower(self, pixels: np.ndarray) -> np.ndarray:
        """float32 ``(N, 3, H, W)`` -> float32 ``(N, D)``, not normalised; chunked."""
        pixels = np.asarray(pixels, dtype=np.float32)
        h, w = self.preprocess_config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, h, w):
            raise InputError(f"pixels: expected shape (N, 3, {h}, {w}), got {pixels.shape}")
        if pixels.shape[0] == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self._run_image_chunked(pixels)

    def _run_image_chunked(self, pixels) -> np.ndarray:
        """Pixels ``(N, 3, H, W)`` (host array or device tensor, N >= 1) through the image
        tower in chunks of the engine's batch size -> float32 ``(N, D)``."""
        out = self._run_chunks("image", [pixels[s:s + self._chunk]
                                         for s in range(0, pixels.shape[0], self._chunk)])
        return np.concatenate(out).astype(np.float32, copy=False)

    def _run_chunks(self, tower: str, chunks: list) -> list[np.ndarray]:
        """Run chunks through one tower; a backend that overlaps copies and compute across
        batches (``run_image_batches`` / ``run_text_batches``) gets them all at once."""
        backend = self._backend
        run = backend.run_image_batches if tower == "image" else backend.run_text_batches
        return list(run(chunks))

    def encode_images(self, images: Sequence[Any], *, normalize: bool = True,
                      errors: str = "raise", progress: bool = False):
        """PIL images, paths, bytes or uint8 HWC arrays -> float32 ``(N, D)``.

        ``errors="raise"`` (default): the first bad image raises ImageLoadError naming its index.
        ``errors="skip"``: returns a BatchResult with the good rows and a Failure per bad image.

        Images are preprocessed and run chunk by chunk. On a GPU backend the next chunk is
        decoded and resized (CPU threads, or the GPU preprocessing) while the tower runs the
        current one, and a backend that overlaps copies and compute across batches
        (``run_image_batches``) receives the chunks as a lazy stream; at most about two chunks
        of pixels are alive at a time. On the CPU both would compete for the same cores, so
        there it is sequential.
        """
        _check_errors_mode(errors)
        items = _as_list(images, "images")
        indices: list[int] = []
        failures: list[Failure] = []
        size = self._chunk
        n_chunks = -(-len(items) // size)
        bar = None
        if progress and len(items) > size:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), unit="img", desc="encode images")
        # chunk k+1 is prepared while the tower runs chunk k, on a GPU backend only
        prefetch = 1 if self.backend_device == "cuda" and n_chunks > 1 else 0
        prepared = self.images.stream((items[s:s + size] for s in range(0, len(items), size)),
                                      prefetch=prefetch, errors=errors)

        def pixel_chunks():
            """Pixels of each chunk with at least one good image, in order; their positions and
            the chunk's failures are recorded as each is produced."""
            for p in prepared:
                failures.extend(p.failures)
                if len(p):
                    indices.extend(p.indices)
                    yield p.pixels
                n = p.size
                p = None  # the consumer holds this chunk as long as it needs it
                if bar is not None:
                    bar.update(n)

        stream = pixel_chunks()
        try:
            outs = self._backend.run_image_batches(stream)
        finally:
            stream.close()  # a backend that stopped early leaves it suspended
            prepared.close()  # on an error or Ctrl-C, the chunk being prefetched is cancelled
            if bar is not None:
                bar.close()
        emb = (np.concatenate([o.astype(np.float32, copy=False) for o in outs]) if len(outs)
               else np.zeros((0, self.embed_dim), dtype=np.float32))
        if emb.shape[0] != len(indices):
            raise ClipfastError(f"backend {self.backend} returned {emb.shape[0]} image rows for "
                                f"{len(indices)} images")
        res = embeddings_result(emb, indices, failures, normalize)
        return res if errors == "skip" else res.embeddings

    # -- texts -------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Texts -> ``{name: int64 (N, L)}``, exactly what the text tower receives."""
        return self.tokenizer(_as_list(texts, "texts"))

    @property
    def text_dynamic(self) -> bool:
        """Whether text batches are padded only to their longest text (the artifact's text
        tower takes any length and its result does not depend on padding) rather than to the
        full context length."""
        return self.manifest.spec.text.dynamic and self.tokenizer.config.padding_side == "right"

    def run_text_tower(self, inputs: dict[str, np.ndarray],
                       lengths: np.ndarray | None = None) -> np.ndarray:
        """``{name: int (N, L)}`` -> float32 ``(N, D)``, not normalised; chunked.

        On the dynamic path (``text_dynamic``) the rows are grouped by length
        (``clipfast.inputs.text_batching``) and each batch is cut to its longest row (or the next
        length the backend accepts); rows come back in input order. ``lengths``: tokens per
        row before padding (``Tokenizer.encode``), else read from the padding.
        """
        n = len(next(iter(inputs.values())))
        if n == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        if self.text_dynamic:
            from clipfast.backends.batching import plan_text_batches, run_planned

            if lengths is None:
                lengths = self.tokenizer.lengths(inputs)
            plan = plan_text_batches(lengths, self._chunk,
                                     context=self.tokenizer.context_length,
                                     allowed=self._backend.text_lengths)
            return run_planned(lambda chunks: self._run_chunks("text", chunks), inputs, plan,
                               self.embed_dim)
        out = self._run_chunks("text", [{k: v[s:s + self._chunk] for k, v in inputs.items()}
                                        for s in range(0, n, self._chunk)])
        return np.concatenate(out).astype(np.float32, copy=False)

    def encode_texts(self, texts: Sequence[str], *, normalize: bool = True,
                     errors: str = "raise"):
        """Strings -> float32 ``(N, D)``. A non-string raises TextInputError naming its index,
        or with ``errors="skip"`` becomes a Failure in the returned BatchResult."""
        _check_errors_mode(errors)
        items = _as_list(texts, "texts")
        failures = []
        if errors == "skip":
            good = [i for i, t in enumerate(items) if isinstance(t, str)]
            failures = [Failure(i, type(t).__name__, f"texts[{i}]: expected str, got "
                                f"{type(t).__name__}") for i, t in enumerate(items)
                        if not isinstance(t, str)]
            items = [items[i] for i in good]
        # lengths read from the padding, as for the server's and embed's token batches: the
        # same texts in the same batch then run at the same shape through every front door
        emb = self.run_text_tower(self.tokenizer(items))
        if normalize:
            emb = l2_normalize(emb)
        if errors == "skip":
            return BatchResult(emb, np.asarray(good, dtype=np.int64), failures)
        return emb

    # -- zero-shot ---------------------------------------------------------------------------
    def logits(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """L2-normalised ``(N, D)`` and ``(L, D)`` -> logits ``(N, L)`` with the model's scale
        (and bias for sigmoid models)."""
        cfg = self.manifest.spec.logits
        out = cfg.scale * (l2_normalize(image_embeds) @ l2_normalize(text_embeds).T)
        if cfg.bias is not None:
            out = out + cfg.bias
        return out.astype(np.float32)

    def classify(self, images: Sequence[Any], labels: Sequence[str], *,
                 template: str | None = None) -> np.ndarray:
        """Zero-shot probabilities ``(N, L)``: softmax over labels for CLIP/ALIGN, independent
        sigmoids for SigLIP. ``template`` (default the engine's ``prompt_template``) must contain
        ``{}``, which is replaced by each label."""
        template = template or self.prompt_template
        if "{}" not in template:
            raise InputError(f"template {template!r} must contain '{{}}' for the label")
        labels = _as_list(labels, "labels")
        if not labels:
            raise InputError("labels: at least one label is needed")
        text = self.encode_texts([template.format(label) for label in labels])
        img = self.encode_images(images)
        return self.manifest.spec.logits.probabilities(self.logits(img, text))
