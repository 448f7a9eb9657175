"""SmoothQuant, folded into the graph: trained CLIP towers carry a few residual-stream channels
whose activations are 50-100x the rest; dividing the LayerNorm before each weight matmul by a
per-channel scale and multiplying the matmul's weight rows by it keeps the fp32 function while
the activation range the int8 scale must cover flattens."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from clipfast.export.onnx_files import load_graph, save_graph
from clipfast.export.quant_calibration import PreparedGraph, ensure_stats
from clipfast.export.quant_graph import CHANNEL_PRESERVING, GraphIndex, node_attr, to_numpy

__all__ = ["smooth_layernorm_outliers", "smoothed_graph"]

_LAYERNORMS = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}


def _set_node_param(model, node, index: int, value: np.ndarray, uses: Counter) -> None:
    """Give ``node`` its own initializer ``value`` at input ``index`` (exporters share identical
    constants between nodes: LayerNorms initialised to ones share one gamma)."""
    from onnx import numpy_helper

    name = node.input[index]
    for i, t in enumerate(model.graph.initializer):
        if t.name == name and uses[name] == 1:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    # Shared, or reached through an Identity: this node gets a copy of its own.
    new = f"{node.name}.smoothquant.{index}"
    model.graph.initializer.append(numpy_helper.from_array(value, new))
    node.input[index] = new
    uses[name] -= 1


def _smoothable_groups(g: GraphIndex) -> list[tuple[Any, list[tuple[Any, str]]]]:
    """LayerNorms whose normalised output feeds only weight MatMul/Gemm/Attention nodes (through
    Cast/Identity or last-axis-preserving Transposes; Shape reads are harmless), with unshared
    weights.

    Returns ``[(layernorm_node, [(consumer_node, tensor_name_at_consumer), ...]), ...]``.
    """
    uses = Counter(i for n in g.model.graph.node for i in n.input if i)
    groups = []
    for ln in g.model.graph.node:
        if ln.op_type not in _LAYERNORMS:
            continue
        gi, bi = _LAYERNORMS[ln.op_type]
        params = [ln.input[gi]] + ([ln.input[bi]] if len(ln.input) > bi and ln.input[bi] else [])
        if any(g.resolve(p) not in g.inits for p in params):
            continue
        consumers, ok, stack = [], True, [ln.output[0]]
        while stack and ok:
            tensor = stack.pop()
            if tensor in g.outputs:
                ok = False
                break
            for c in g.consumers.get(tensor, []):
                if c.op_type == "Shape":
                    continue
                if c.op_type in CHANNEL_PRESERVING or (c.op_type == "Transpose"
                                                        and _keeps_last_axis(c)):
                    stack.append(c.output[0])
                elif (c.op_type in ("MatMul", "Gemm", "Attention") and c.input[0] == tensor
                      and g.resolve(c.input[1]) in g.inits and uses[c.input[1]] == 1
                      and not (c.op_type == "Gemm" and node_attr(c, "transA", 0))):
                    consumers.append((c, tensor))
                else:
                    ok = False
                    break
        if ok and consumers:
            groups.append((ln, consumers))
    return groups



def _keeps_last_axis(node) -> bool:
    perm = node_attr(node, "perm", None)
    return perm is not None and list(perm)[-1] == len(perm) - 1


def smooth_layernorm_outliers(model, stats: dict[str, np.ndarray], alpha: float = 0.5
                              ) -> list[str]:
    """SmoothQuant, folded (in place on ``model``): for each LayerNorm that feeds only weight
    matmuls, ``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)``; gamma and beta are divided by ``s``
    and weight input-row ``j`` multiplied by it, so the fp32 function is unchanged while the
    activation range flattens. Returns the names of the LayerNorms smoothed.

    stats: per-channel ``max |x|`` of each consumer's input tensor (``activation_channel_stats``).
    """
    g = GraphIndex(model)
    uses = Counter(i for n in model.graph.node for i in n.input if i)
    done = []
    for ln, consumers in _smoothable_groups(g):
        act = None
        for _, tensor in consumers:
            if tensor in stats:
                act = stats[tensor] if act is None else np.maximum(act, stats[tensor])
        if act is None:
            continue
        weights = []
        for c, _ in consumers:
            w = to_numpy(g.inits[g.resolve(c.input[1])])
            # Gemm with transB stores (N, K): the input channel is axis 1.
            row_axis = 1 if c.op_type == "Gemm" and node_attr(c, "transB", 0) else 0
            weights.append((c, w, row_axis))
        if any(w.ndim != 2 or w.shape[ax] != act.shape[0] for _, w, ax in weights):
            continue
        wmax = np.max([np.abs(w).max(axis=1 - ax) for _, w, ax in weights], axis=0)
        s = np.power(np.maximum(act, 1e-8), alpha) / np.power(np.maximum(wmax, 1e-8), 1 - alpha)
        s = np.where((act > 0) & (wmax > 0), s, 1.0)
        s = np.clip(s, 1e-4, 1e4).astype(np.float64)
        gi, bi = _LAYERNORMS[ln.op_type]
        for idx in (gi, bi):
            if len(ln.input) > idx and ln.input[idx]:
                param = to_numpy(g.inits[g.resolve(ln.input[idx])])
                _set_node_param(model, ln, idx, (param / s).astype(param.dtype), uses)
        for c, w, ax in weights:
            shape = (-1, 1) if ax == 0 else (1, -1)
            _set_node_param(model, c, 1, (w * s.reshape(shape)).astype(w.dtype), uses)
        done.append(ln.name)
    return done


def smoothed_graph(prep: PreparedGraph, alpha: float, batch: int) -> tuple[Path, list[str]]:
    """The prepared graph smoothed with ``alpha`` (written once per alpha into its work
    directory): ``(path, names of the LayerNorms smoothed)``."""
    if alpha not in prep.smoothed:
        stats = ensure_stats(prep, batch)
        model = load_graph(prep.path)
        done = smooth_layernorm_outliers(model, stats, alpha)
        path = prep.workdir / f"smoothed_{len(prep.smoothed)}.onnx"
        save_graph(model, path)
        prep.smoothed[alpha] = (path, done)
    return prep.smoothed[alpha]

