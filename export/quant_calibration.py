"""Calibration for int8: the feeds (checked against the graph's inputs), ONNX Runtime's
calibration reader and calibrators, per-channel activation statistics and the outlier inputs
they reveal, and the pre-processed graph the quantizer and its guard share
(``PreparedGraph``)."""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipfast.errors import ExportError
from clipfast.export.onnx_files import (
    PROTOBUF_LIMIT,
    graph_bytes,
    load_graph,
    load_header,
    save_graph,
)
from clipfast.export.quant_graph import (
    GraphIndex,
    model_inputs,
    preprocess_graph,
    split_skip_layernorm,
)

if TYPE_CHECKING:
    from clipfast.export.quant_options import QuantOptions

__all__ = ["OUTLIER_RATIO", "PreparedGraph", "TowerCalibrationReader",
           "activation_channel_stats", "calibrate", "calibration_method", "calibration_rows",
           "channel_ratio", "check_feeds", "ensure_stats", "ort_reader", "outlier_nodes",
           "outlier_summary", "prepare_graph"]

# A MatMul input whose largest channel (max |x| over the calibration set) is this many times its
# median channel is an outlier input: one per-tensor int8 scale cannot cover both.
OUTLIER_RATIO = 20.0


def check_feeds(calibration: list[dict[str, np.ndarray]], inputs: dict[str, Any],
                what: str) -> list[dict[str, np.ndarray]]:
    """Validate calibration feeds against the graph inputs; cast to the inputs' dtypes."""
    if not isinstance(calibration, (list, tuple)) or not calibration:
        size = len(calibration) if hasattr(calibration, "__len__") else "?"
        raise ExportError(f"int8 calibration for {what}: expected a non-empty list of feed dicts "
                          f"({', '.join(inputs)}), got {type(calibration).__name__} of length "
                          f"{size}")
    checked = []
    for i, feed in enumerate(calibration):
        if not isinstance(feed, dict):
            raise ExportError(f"int8 calibration for {what}: item {i} is a "
                              f"{type(feed).__name__}, expected a dict of input name -> array")
        missing = [n for n in inputs if n not in feed]
        extra = [n for n in feed if n not in inputs]
        if missing or extra:
            raise ExportError(
                f"int8 calibration for {what}: item {i} has inputs {sorted(feed)}, the graph "
                f"takes {list(inputs)} (missing {missing}, unexpected {extra})")
        arrays = {n: np.ascontiguousarray(feed[n], dtype=dt) for n, dt in inputs.items()}
        rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
        if len(rows) != 1 or 0 in rows:
            raise ExportError(f"int8 calibration for {what}: item {i} has inputs with batch sizes "
                              f"{sorted(rows)}; every input needs the same, non-zero batch")
        checked.append(arrays)
    return checked


def calibration_rows(feeds: list[dict[str, np.ndarray]]) -> int:
    """Rows over all feeds."""
    return sum(next(iter(f.values())).shape[0] for f in feeds)


class TowerCalibrationReader:
    """An ONNX Runtime ``CalibrationDataReader`` over feed dicts, re-batched to ``batch`` rows.

    feeds: ``[{"pixel_values": float32 (n, 3, H, W)}, ...]`` for an image tower,
    ``[{"input_ids": int32 (n, L)[, "attention_mask": ...]}, ...]`` for a text tower.
    ``limit`` ends a chunk after that many batches, or earlier where the batch shape changes (so
    collection runs in memory-bounded chunks of stackable outputs); ``next_chunk`` starts the next
    chunk, ``rewind`` starts over.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]], batch: int = 8,
                 limit: int | None = None):
        self.batches: list[dict[str, np.ndarray]] = []
        for feed in feeds:
            n = next(iter(feed.values())).shape[0]
            for s in range(0, n, batch):
                self.batches.append({k: v[s:s + batch] for k, v in feed.items()})
        self.limit = limit
        self._pos = 0
        self._served = 0
        self._shape: tuple = ()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.batches):
            return None
        item = self.batches[self._pos]
        if self.limit is not None:
            # A chunk holds batches of one shape: ONNX Runtime's histogram calibrators stack the
            # outputs of one collection call into a single array.
            if self._served >= self.limit or (self._served and _shapes(item) != self._shape):
                return None
            self._shape = _shapes(item)
        self._pos += 1
        self._served += 1
        return item

    def next_chunk(self) -> None:
        """Allow ``limit`` more batches (chunked collection)."""
        self._served = 0

    @property
    def exhausted(self) -> bool:
        return self._pos >= len(self.batches)

    def rewind(self) -> None:
        self._pos = 0
        self._served = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _shapes(feed: dict[str, np.ndarray]) -> tuple:
    return tuple(v.shape for v in feed.values())


def ort_reader(reader: TowerCalibrationReader):
    """Wrap in a subclass of onnxruntime's abstract reader (its quantizers check the type)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

        def __len__(self):
            return len(reader)

    return _Reader()



def activation_channel_stats(model_path: Path, tensors: Iterable[str],
                             feeds: list[dict[str, np.ndarray]], batch: int = 8,
                             workdir: Path | None = None) -> dict[str, np.ndarray]:
    """Per-channel ``max |x|`` over the calibration feeds for each named float tensor.

    The channel is the last axis (the reduction axis of the MatMul that reads the tensor).
    Returns ``{name: float32 (channels,)}``. Runs the fp32 graph once with those tensors added as
    outputs (ONNX Runtime, basic optimisations, so the named tensors survive).
    """
    import onnx
    import onnxruntime as ort

    tensors = list(dict.fromkeys(tensors))
    model = load_graph(model_path)
    existing = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT,
                                                                         None))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "stats.onnx"
        save_graph(model, path)
        del model
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        stats: dict[str, np.ndarray] = {}
        for b in TowerCalibrationReader(feeds, batch):
            for name, value in zip(names, sess.run(None, b)):
                if name not in tensors or value.ndim == 0:
                    continue
                v = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0).astype(np.float32)
                stats[name] = v if name not in stats else np.maximum(stats[name], v)
    return stats


def channel_ratio(absmax: np.ndarray) -> float:
    """max / median of per-channel ``max |x|``: about 2-5 for well-behaved activations."""
    med = float(np.median(absmax))
    return float(absmax.max() / med) if med > 0 else math.inf if absmax.max() > 0 else 1.0


@dataclass
class PreparedGraph:
    """A pre-processed fp32 graph plus what the guard learns about it (reused across attempts)."""

    path: Path
    preprocess: str
    feeds: list[dict[str, np.ndarray]]
    workdir: Path
    candidates: dict[str, str] = field(default_factory=dict)  # weight node name -> op type
    inputs_of: dict[str, str] = field(default_factory=dict)  # weight node -> activation input
    patch_embedding: list[str] = field(default_factory=list)
    final_projection: list[str] = field(default_factory=list)
    stats: dict[str, np.ndarray] | None = None
    smoothed: dict[float, tuple[Path, list[str]]] = field(default_factory=dict)
    calib_cache: dict[tuple, Path] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # why the guard keeps a node float


def prepare_graph(fp32_path: Path, feeds: list[dict[str, np.ndarray]], workdir: Path,
                  split_skip: bool = True) -> PreparedGraph:
    """Check ``feeds`` against the graph's inputs, pre-process the graph into ``workdir``
    (ONNX Runtime's ``quant_pre_process``, then SkipLayerNormalization split when
    ``split_skip``) and index its weight nodes."""
    fp32_path = Path(fp32_path)
    if not fp32_path.is_file():
        raise ExportError(f"int8: fp32 graph {str(fp32_path)!r} not found")
    feeds = check_feeds(feeds, model_inputs(load_header(fp32_path)), fp32_path.name)
    pre = workdir / "preprocessed.onnx"
    how = preprocess_graph(fp32_path, pre)
    if split_skip:
        model = load_graph(pre)
        if split_skip_layernorm(model):
            how += "; SkipLayerNormalization split into Add + LayerNormalization"
            save_graph(model, pre)
        del model
    g = GraphIndex(load_header(pre))
    prep = PreparedGraph(path=pre, preprocess=how, feeds=feeds, workdir=workdir)
    for n in g.weight_nodes():
        prep.candidates[n.name] = n.op_type
        prep.inputs_of[n.name] = n.input[0]
    prep.patch_embedding = g.patch_embedding()
    prep.final_projection = g.final_projections()
    return prep


def ensure_stats(prep: PreparedGraph, batch: int) -> dict[str, np.ndarray]:
    """The per-channel input statistics of the graph's weight nodes (Conv excluded), computed
    once per prepared graph."""
    if prep.stats is None:
        tensors = [t for n, t in prep.inputs_of.items() if prep.candidates[n] != "Conv"]
        prep.stats = activation_channel_stats(prep.path, tensors, prep.feeds, batch,
                                              prep.workdir)
    return prep.stats


def outlier_summary(prep: PreparedGraph, top: int = 8) -> list[dict[str, Any]]:
    """The ``top`` weight nodes by input max/median channel ratio (for the report)."""
    stats = prep.stats or {}
    rows = [{"node": n, "op_type": prep.candidates[n],
             "ratio": round(channel_ratio(stats[t]), 1)}
            for n, t in prep.inputs_of.items() if t in stats]
    rows.sort(key=lambda r: -r["ratio"])
    return rows[:top]


def outlier_nodes(prep: PreparedGraph, threshold: float = OUTLIER_RATIO,
                  batch: int = 8) -> list[str]:
    """Weight nodes whose input's max/median channel ratio is at least ``threshold``; when none
    is, the top tenth by ratio (something must change between attempts)."""
    stats = ensure_stats(prep, batch)
    ratios = {n: channel_ratio(stats[t]) for n, t in prep.inputs_of.items() if t in stats}
    ranked = sorted(ratios, key=lambda n: -ratios[n])
    hits = [n for n in ranked if ratios[n] >= threshold]
    return hits or ranked[:max(1, math.ceil(len(ranked) / 10))]


def calibration_method(options: QuantOptions):
    """ONNX Runtime's CalibrationMethod of ``options.calibration``."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[options.calibration]


def calibrate(prep: PreparedGraph, model_path: Path, options: QuantOptions,
              op_types: list[str], key: tuple) -> Path:
    """Activation ranges from ONNX Runtime's calibrator, collected in memory-bounded chunks and
    saved as a calibration cache (reused by attempts that only change exclusions)."""
    if key in prep.calib_cache:
        return prep.calib_cache[key]
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    method = calibration_method(options)
    symmetric = options.activation_type == "s8"
    extra: dict[str, Any] = {"symmetric": symmetric}
    if options.calibration == "percentile":
        extra.update(percentile=options.percentile, num_bins=2048)
    big = graph_bytes(model_path) > PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(dir=prep.workdir) as tmp, \
            contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(
            model_path, op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method, use_external_data_format=big, extra_options=extra)
        # Histogram calibrators keep every intermediate output of one collect_data call (for
        # ViT-L, ~1.5 GB per batch of 8): feed them one batch per call; ranges and histograms
        # merge across calls.
        reader = TowerCalibrationReader(prep.feeds, options.calibration_batch, limit=1)
        wrapped = ort_reader(reader)
        while not reader.exhausted:
            reader.next_chunk()
            calibrator.collect_data(wrapped)
        ranges = calibrator.compute_data()
        del calibrator
    cache = prep.workdir / f"calibration_{len(prep.calib_cache)}.json"
    save_tensors_data(ranges, cache)
    prep.calib_cache[key] = cache
    return cache

