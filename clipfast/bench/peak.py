"""The machine's matrix-multiply peak (GFLOP/s, GOP/s for int8), the yardstick of each row's
utilisation: numpy and onnxruntime GEMMs on CPU, torch matmuls on CUDA. The onnxruntime GEMMs
are built with onnx; without it the CPU peak is numpy's fp32 alone, and its notes say so."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any


def _gemm_model(n: int, kind: str) -> bytes:
    """One (n, n) @ (n, n) product as an ONNX model; the right operand is a constant, as
    weights are in a tower (onnxruntime pre-packs it). kind: "fp32" MatMul or "int8"
    MatMulInteger (uint8 activations x int8 weights, what dynamic/QDQ int8 runs on CPU)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        b = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    elif kind == "int8":
        b = numpy_helper.from_array(rng.integers(-127, 128, (n, n)).astype(np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        raise ValueError(f"kind must be 'fp32' or 'int8', got {kind!r}")
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", a_type, [n, n])],
                              [helper.make_tensor_value_info("Y", y_type, [n, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _best_rate(fn: Callable[[], Any], flop: float, repeats: int) -> float:
    """Best-of-``repeats`` rate in GFLOP/s (the peak is what the machine can do, so the fastest
    call, not the median, after one warm-up)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flop / best / 1e9


def measure_cpu_peak(n: int = 2048, repeats: int = 10, threads: int | None = None
                     ) -> dict[str, Any]:
    """Matrix-multiply peak of this CPU: fp32 as the best of numpy (BLAS) and onnxruntime
    (MLAS) on an (n, n) @ (n, n) product, int8 from onnxruntime MatMulInteger. GFLOP/s (GOP/s
    for int8) with the thread count of the benchmarked sessions."""
    import numpy as np

    flop = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    found: dict[str, float] = {"numpy_fp32": _best_rate(lambda: a @ b, flop, repeats)}
    notes = []
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        for kind, x in (("fp32", a), ("int8", rng.integers(0, 256, (n, n)).astype(np.uint8))):
            sess = ort.InferenceSession(_gemm_model(n, kind), so,
                                        providers=["CPUExecutionProvider"])
            found[f"onnxruntime_{kind}"] = _best_rate(lambda s=sess, x=x: s.run(None, {"A": x}),
                                                      flop, repeats)
    except ImportError as e:
        notes.append(f"onnxruntime GEMM peak not measured ({e}); install onnx for it")
    fp32 = max(v for k, v in found.items() if k.endswith("fp32"))
    return {"device": "cpu", "size": n, "repeats": repeats, "threads": threads or os.cpu_count(),
            "fp32_gflops": round(fp32, 1),
            "int8_gops": round(found["onnxruntime_int8"], 1) if "onnxruntime_int8" in found
            else None,
            "measured": {k: round(v, 1) for k, v in found.items()}, "notes": notes}


def measure_gpu_peak(n: int = 8192, repeats: int = 10) -> dict[str, Any]:
    """Matrix-multiply peak of the current CUDA device with torch: fp32 (TF32 off), fp16 and
    int8 (``torch._int_mm``), best of ``repeats`` synchronised calls."""
    import torch

    dev = torch.device("cuda")
    flop = 2.0 * n**3
    found: dict[str, float] = {}
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            a = torch.randn(n, n, device=dev, dtype=dtype)
            b = torch.randn(n, n, device=dev, dtype=dtype)

            def mm(a=a, b=b):
                torch.matmul(a, b)
                torch.cuda.synchronize()

            found[name] = _best_rate(mm, flop, repeats)
        try:
            a8 = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
            b8 = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)

            def mm8():
                torch._int_mm(a8, b8)
                torch.cuda.synchronize()

            found["int8"] = _best_rate(mm8, flop, repeats)
        except (RuntimeError, AttributeError):
            pass  # no int8 tensor-core path in this torch build: int8 rows get no utilisation
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return {"device": "cuda", "name": torch.cuda.get_device_name(), "size": n, "repeats": repeats,
            "fp32_gflops": round(found["fp32"], 1), "fp16_gflops": round(found["fp16"], 1),
            "int8_gops": round(found["int8"], 1) if "int8" in found else None,
            "measured": {k: round(v, 1) for k, v in found.items()}, "notes": []}


def peak_for(precision: str, peak: dict[str, Any] | None) -> float | None:
    """The peak (GFLOP/s) a row of ``precision`` is compared with: int8 -> the int8 GEMM peak;
    fp16 -> the fp16 peak where measured (GPU), else fp32; anything else -> fp32."""
    if not peak:
        return None
    if precision.startswith("int8"):
        return peak.get("int8_gops")
    if precision.startswith(("fp16", "bf16")) and peak.get("fp16_gflops"):
        return peak["fp16_gflops"]
    return peak.get("fp32_gflops")
