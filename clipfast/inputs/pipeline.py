"""The Engine's image input pipeline: items in, pixels the image tower takes out.

One ``ImagePipeline`` per Engine (``engine.images``) holds, in one place:

- the loading policy (EXIF rotation, alpha background, the byte limit; Pillow's pixel limit is
  the loader's own, ``clipfast.inputs.image_io``);
- the decode path: Pillow on CPU threads (exact, the reference), Pillow's fast decode (JPEG
  draft and ``reducing_gap``: not pixel-exact, asked for per call), or the GPU (nvJPEG and the
  fused kernel, ``clipfast.inputs.gpu_preprocess``) when the Engine's towers run on CUDA and the
  kernels are there;
- one long-lived thread pool for decoding (Pillow's decode and resize release the GIL), made on
  first use and shut down by ``close()`` (``Engine.close``);
- per-item failures as ``clipfast.types.Failure`` with the item's absolute position;
- streaming: ``stream`` takes an iterable of item batches and yields prepared batches in order,
  preparing up to ``prefetch`` batches ahead while the consumer runs the tower.

Every front door (``Engine.encode_images``, ``clipfast encode``, ``clipfast embed``, Ray Data
and the servers through ``Engine.prepare_images`` / ``Engine.embed_prepared``) prepares images
here, so the same input gets the same pixels whichever door it comes through.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipfast.artifact.fidelity import l2_normalize
from clipfast.errors import InputError
from clipfast.inputs.image_io import item_failure
from clipfast.inputs.preprocess import PreprocessConfig, preprocess_image, resized_size
from clipfast.types import BatchResult, Failure

# Fast decode. Each side of the drafted image is at least this many times the resized (pre-crop)
# size; 2 is what Pillow's own thumbnail() uses, and keeps the model's filter doing the last 2x
# or more.
DRAFT_FACTOR = 2.0
# Pillow's default for thumbnail(); only bites where draft could not shrink enough (PNG, WebP,
# JPEGs larger than 16x the target).
REDUCING_GAP = 2.0


def draft_size(cfg: PreprocessConfig):
    """The ``draft`` callable for ``load_image``: stored (w, h) -> the smallest size to decode.

    The scale is the larger of the two axes' resize scales, so it holds whatever EXIF rotation
    is applied after decoding."""
    import math

    def wanted(size: tuple[int, int]) -> tuple[int, int] | None:
        w, h = size
        new_h, new_w = resized_size(h, w, cfg)
        scale = max(new_h / h, new_w / w) * DRAFT_FACTOR
        if scale >= 0.5:
            return None  # the draft could not shrink by even 1/2
        return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))

    return wanted


@dataclass(frozen=True)
class LoadPolicy:
    """How an image input is loaded: the Engine's options, applied by every decode path."""

    exif_transpose: bool = True
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    max_bytes: int | None = None

    def kwargs(self, cfg: PreprocessConfig, fast: bool = False) -> dict[str, Any]:
        """Keyword arguments of ``preprocess_image`` for this policy (``fast``: the draft
        decode and the reducing gap)."""
        return {
            "exif_transpose": self.exif_transpose,
            "alpha_background": self.alpha_background,
            "max_bytes": self.max_bytes,
            "draft": draft_size(cfg) if fast else None,
            "reducing_gap": REDUCING_GAP if fast else None,
        }


@dataclass
class PreparedImages:
    """One batch ready for the image tower.

    pixels: float32 ``(M, 3, H, W)`` for the M good items, in input order: a numpy array from
        the CPU paths, a torch tensor on the device from the GPU path.
    indices: the absolute position of each of the M items (``offset`` + its place in the batch).
    failures: one Failure per item that could not be prepared, by position.
    offset / size: where the batch starts in the caller's numbering, and how many items it had.
    """

    pixels: Any
    indices: list[int]
    failures: list[Failure] = field(default_factory=list)
    offset: int = 0
    size: int = 0

    def __len__(self) -> int:
        return len(self.indices)


def _failure(err: InputError, index: int, item: Any) -> Failure:
    desc = err.item if err.item is not None else type(item).__name__
    return Failure(index, desc, str(err))


def embeddings_result(emb: np.ndarray, indices: Sequence[int], failures: list[Failure],
                      normalize: bool) -> BatchResult:
    """Tower rows -> a BatchResult: float32 rows (L2-normalised with ``normalize``: the one
    place image embeddings are normalised), int64 indices, failures sorted by position."""
    emb = emb.astype(np.float32, copy=False)
    if normalize:
        emb = l2_normalize(emb)
    return BatchResult(emb, np.asarray(list(indices), dtype=np.int64),
                       sorted(failures, key=lambda f: f.index))


class _Pending:
    """A batch to prepare: ``parts`` holds its per-item futures (CPU), its one future (GPU),
    or None (prepared in the calling thread when collected)."""

    def __init__(self, items: list, offset: int, errors: str, fast: bool, on_gpu: bool,
                 parts: list | Future | None):
        self.items, self.offset, self.errors, self.fast = items, offset, errors, fast
        self.on_gpu, self.parts = on_gpu, parts

    def cancel(self) -> None:
        for f in self.parts if isinstance(self.parts, list) else [self.parts]:
            if f is not None:
                f.cancel()


class ImagePipeline:
    """Images -> ``PreparedImages``, with the Engine's loading policy and decode path.

    cfg: the artifact's preprocessing. policy: the loading policy. workers: decode threads of
    the pool (1: everything in the calling thread). gpu: a ``GpuPreprocessor`` (the GPU path),
    or None (Pillow on the CPU).
    """

    def __init__(self, cfg: PreprocessConfig, policy: LoadPolicy | None = None, *,
                 workers: int = 1, gpu: Any = None):
        self.cfg = cfg
        self.policy = policy or LoadPolicy()
        self.workers = max(1, int(workers))
        self.gpu = gpu
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._lock = threading.Lock()
        # One GPU batch at a time: nvJPEG's decoder state is the preprocessor's own.
        self._gpu_lock = threading.Lock()
        self._closed = False

    # -- facts -------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """"gpu" when images are prepared on the device by default, else "cpu"."""
        return "gpu" if self.gpu is not None else "cpu"

    def close(self) -> None:
        """Shut the pool down (items running finish; queued ones are cancelled). The pipeline
        stays usable: a later call makes a new pool."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_size != self.workers:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max_workers=self.workers,
                                                thread_name_prefix="clipfast-decode")
                self._pool_size = self.workers
            return self._pool

    # -- one item ----------------------------------------------------------------------------
    def load(self, item: Any, index: int, fast: bool = False) -> np.ndarray:
        """One item -> float32 (3, H, W) on the CPU with the policy; ImageLoadError naming
        ``index`` on any fault of the item."""
        return preprocess_image(item, self.cfg, index=index, **self.policy.kwargs(self.cfg, fast))

    def _work(self, item: Any, index: int, fast: bool):
        """(pixels, None), or (None, (error naming the item, cause)) for any fault of the item.
        KeyboardInterrupt and SystemExit are not the item's: they propagate."""
        try:
            return self.load(item, index, fast), None
        except Exception as e:
            return None, (e if isinstance(e, InputError) else item_failure(e, index, item), e)

    # -- batches -----------------------------------------------------------------------------
    def _use_gpu(self, gpu: bool | None, fast: bool) -> bool:
        # Fast decode is Pillow's (its cost is measured on Pillow): it runs on the CPU.
        return self.gpu is not None and gpu is not False and not fast

    def _gpu_call(self, items: list, offset: int, errors: str):
        with self._gpu_lock:
            return self.gpu(items, offset, errors)

    def _submit(self, items: list, offset: int, errors: str, fast: bool, gpu: bool | None,
                ahead: bool) -> _Pending:
        """Start preparing a batch: in the pool (``ahead``, or several CPU items to share out),
        or deferred to ``_collect`` in the calling thread."""
        on_gpu = self._use_gpu(gpu, fast) and bool(items)
        parts: list | Future | None = None
        if on_gpu and ahead:
            parts = self._executor().submit(self._gpu_call, items, offset, errors)
        elif not on_gpu and (ahead or (self.workers > 1 and len(items) > 1)):
            pool = self._executor()
            parts = [pool.submit(self._work, item, i, fast)
                     for i, item in enumerate(items, start=offset)]
        return _Pending(items, offset, errors, fast, on_gpu, parts)

    def _collect(self, p: _Pending) -> PreparedImages:
        """Wait for a submitted batch. errors="raise": the first bad item in order raises its
        ImageLoadError (the rest are cancelled); an interruption cancels the rest too."""
        h, w = self.cfg.image_size
        if p.on_gpu:
            try:
                pixels, order, fails = (p.parts.result() if p.parts is not None
                                        else self._gpu_call(p.items, p.offset, p.errors))
            except BaseException:
                p.cancel()
                raise
            return PreparedImages(pixels, list(order), list(fails), p.offset, len(p.items))
        good: list[np.ndarray] = []
        indices: list[int] = []
        failures: list[Failure] = []
        try:
            for k, item in enumerate(p.items):
                i = p.offset + k
                arr, bad = (p.parts[k].result() if p.parts is not None
                            else self._work(item, i, p.fast))
                if bad is None:
                    good.append(arr)
                    indices.append(i)
                    continue
                err, cause = bad
                if p.errors == "raise":
                    if err is cause:
                        raise err
                    raise err from cause
                failures.append(_failure(err, i, item))
        except BaseException:
            p.cancel()  # items not started never run; running ones finish in the background
            raise
        pixels = (np.stack(good) if good else np.zeros((0, 3, h, w), dtype=np.float32))
        return PreparedImages(pixels, indices, failures, p.offset, len(p.items))

    def prepare(self, items: Sequence[Any], offset: int = 0, *, errors: str = "skip",
                fast: bool = False, gpu: bool | None = None) -> PreparedImages:
        """One batch -> PreparedImages (positions ``offset``..). CPU items are shared out over
        the pool. gpu: None follows the pipeline's path, False forces the CPU (Pillow) path.
        errors="raise": the first bad item raises ImageLoadError naming its position."""
        return self._collect(self._submit(list(items), offset, errors, fast, gpu, ahead=False))

    def stream(self, batches: Iterable[Sequence[Any]], *, prefetch: int = 0,
               errors: str = "skip", fast: bool = False, gpu: bool | None = None,
               start: int = 0) -> Iterator[PreparedImages]:
        """Batches of items -> PreparedImages, in order; positions count from ``start`` across
        the batches. With ``prefetch`` > 0, that many following batches are being prepared in
        the pool while the consumer holds one (batches are pulled from ``batches`` in the
        calling thread). Closing the generator early cancels what was not started."""
        it = iter(batches)
        pending: deque[_Pending] = deque()
        offset = start
        try:
            while True:
                while len(pending) <= prefetch:
                    batch = next(it, None)
                    if batch is None:
                        break
                    batch = list(batch)
                    pending.append(self._submit(batch, offset, errors, fast, gpu,
                                                ahead=prefetch > 0))
                    offset += len(batch)
                if not pending:
                    return
                # with prefetch, the following batches were submitted before this one is
                # collected: they are prepared while the consumer holds it
                prepared = self._collect(pending.popleft())
                yield prepared
                prepared = None  # the consumer holds it as long as it needs it
        finally:
            for p in pending:
                p.cancel()

    def prefetched(self, fn: Callable[[Any], Any], batches: Iterable[Any],
                   prefetch: int) -> Iterator[Any]:
        """``fn(batch)`` for each batch, run in the pool up to ``prefetch`` batches ahead of the
        consumer, in order (for work that is not images, e.g. tokenising texts)."""
        pending: deque[Future] = deque()
        pool = self._executor()
        try:
            for batch in batches:
                pending.append(pool.submit(fn, batch))
                if len(pending) > prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


__all__ = ["DRAFT_FACTOR", "REDUCING_GAP", "ImagePipeline", "LoadPolicy", "PreparedImages",
           "draft_size", "embeddings_result"]
