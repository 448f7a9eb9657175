"""CPU paths side by side: eager PyTorch, clipfast on ONNX Runtime, OpenVINO (fp32, bf16,
clipfast's int8 graph, NNCF's own int8) and clipfast's ``auto``, in one process.

Per thread count (default 1 and every core), every path is loaded with that many threads, then
timed in interleaved rounds (each round calls every path once on the same batch, so load from
other processes hits them alike); the table gives the median round. Fidelity: centred relative
error (max over rows, DESIGN.md) of each path's embeddings against eager fp32 PyTorch on the
built-in generated images plus scikit-image's photographs, and captions.

NNCF's quantization (``nncf.quantize``, transformer preset) is calibrated on the same generated
images and captions clipfast's int8 export calibrates on (``clipfast.artifact.samples``), so the two
int8 graphs differ in the quantizer only.

    python benchmarks/openvino_cpu.py FP32_ARTIFACT INT8_ARTIFACT \\
        --out benchmarks/results/openvino-vit-b-32

writes OUT.json and OUT.md. Exports: ``clipfast export --model ViT-B-32 --pretrained none``
(with ``--precision int8`` for the second).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import clipfast
from clipfast.artifact.fidelity import centred_relative_error, l2_normalize
from clipfast.artifact.samples import sample_captions, sample_images
from clipfast.cpu import host_cpu


class NncfTowers:
    """OpenVINO running NNCF's own int8 quantization of the fp32 artifact's graphs."""

    def __init__(self, artifact: Path, threads: int, calib_pixels: np.ndarray,
                 calib_tokens: dict[str, np.ndarray]):
        import nncf
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        core = ov.Core()
        config = {hints.inference_precision(): ov.Type.f32,
                  hints.performance_mode(): hints.PerformanceMode.LATENCY,
                  props.inference_num_threads(): threads}
        self.compiled = {}
        for tower, calib in (("image", [[calib_pixels[i:i + 8]]
                                        for i in range(0, len(calib_pixels), 8)]),
                             ("text", [{k: v[i:i + 8] for k, v in calib_tokens.items()}
                                       for i in range(0, len(next(iter(calib_tokens.values()))),
                                                      8)])):
            model = core.read_model(str(artifact / f"{tower}.onnx"))
            q = nncf.quantize(model, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calib) * 8)
            self.compiled[tower] = core.compile_model(q, "CPU", config)

    def run_image(self, pixels: np.ndarray) -> np.ndarray:
        return np.array(self.compiled["image"]([pixels])[0])

    def run_text(self, tokens: dict[str, np.ndarray]) -> np.ndarray:
        return np.array(self.compiled["text"](tokens)[0])


def load_paths(fp32: Path, int8: Path, threads: int, calib) -> dict[str, tuple[Any, str]]:
    """``{path: (towers, precision)}``; towers has run_image(pixels) / run_text(tokens)."""
    from clipfast.artifact.manifest import load_manifest
    from clipfast.backends import load_backend

    def engine(art, backend, **options):
        """The backend itself (its towers, unchunked), through the public loader."""
        return load_backend(backend, load_manifest(art), "cpu", threads=threads, **options)

    paths: dict[str, tuple[Any, str]] = {}
    paths["eager PyTorch fp32"] = (engine(fp32, "torch", compile=False), "fp32")
    paths["clipfast fp32 (ONNX Runtime)"] = (engine(fp32, "onnxruntime"), "fp32")
    paths["clipfast int8 (ONNX Runtime)"] = (engine(int8, "onnxruntime"), "int8")
    paths["OpenVINO fp32"] = (engine(fp32, "openvino"), "fp32")
    try:
        paths["OpenVINO bf16"] = (engine(fp32, "openvino", ov_precision="bf16"), "bf16")
    except clipfast.errors.BackendUnavailable as e:
        print(f"OpenVINO bf16 skipped: {e}", file=sys.stderr)
    paths["OpenVINO int8 (clipfast graph)"] = (engine(int8, "openvino"), "int8")
    paths["OpenVINO int8 (NNCF)"] = (NncfTowers(fp32, threads, *calib), "int8")
    # auto: clipfast's own selection (clipfast.backends.tune, measured afresh) over the paths
    # already loaded, so that it adds no copy of the model to this process
    from clipfast.artifact.selfcheck import load_golden, run_self_check
    from clipfast.backends import tune

    m = load_manifest(fp32)
    golden = load_golden(m)
    loaded = {"onnxruntime": "clipfast fp32 (ONNX Runtime)", "openvino": "OpenVINO fp32",
              "openvino (bf16)": "OpenVINO bf16"}
    def already_loaded(c):
        if loaded[c.label] not in paths:
            raise clipfast.errors.BackendUnavailable(f"{loaded[c.label]} did not load")
        return paths[loaded[c.label]][0]

    auto, _ = tune.resolve_cpu(
        m, load=already_loaded,
        check=lambda b, label: run_self_check(b, m, golden, label), golden=golden,
        threads=threads, allow=("bf16",), available=("onnxruntime", "openvino"), retune=True)
    choice = auto.tuning
    paths[f"clipfast auto, bf16 allowed (-> {choice['label']})"] = (
        auto, auto.info().precision or "fp32")
    return paths


def measure(paths, pixels, tokens, rounds: int) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {p: {"image": [], "text": []} for p in paths}
    for towers, _ in paths.values():  # warm-up: first-shape compilation, allocations
        towers.run_image(pixels)
        towers.run_text(tokens)
    for _ in range(rounds):
        for name, (towers, _) in paths.items():
            t0 = time.perf_counter()
            towers.run_image(pixels)
            times[name]["image"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            towers.run_text(tokens)
            times[name]["text"].append(time.perf_counter() - t0)
    return times


def fidelity(paths, pixels, tokens) -> dict[str, dict[str, float]]:
    outs = {name: (l2_normalize(t.run_image(pixels)), l2_normalize(t.run_text(tokens)))
            for name, (t, _) in paths.items()}
    ref_img, ref_txt = outs["eager PyTorch fp32"]
    return {name: {"image": float(centred_relative_error(img, ref_img).max()),
                   "text": float(centred_relative_error(txt, ref_txt).max())}
            for name, (img, txt) in outs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32", type=Path)
    ap.add_argument("int8", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    from skimage import data

    # preprocessing and tokenization without loading towers for them (memory: one process
    # holds every path's weights already)
    from clipfast.artifact.manifest import load_manifest
    from clipfast.inputs.preprocess import preprocess_image
    from clipfast.inputs.tokenizer import Tokenizer

    manifest = load_manifest(args.fp32)
    tokenize = Tokenizer(manifest.spec.tokenizer, manifest.path(manifest.spec.tokenizer.file))

    def preprocess(images):
        return np.stack([preprocess_image(x, manifest.spec.preprocess) for x in images])

    photos = [getattr(data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
    fid_pixels = preprocess([*sample_images(24, seed=3), *photos])
    fid_tokens = tokenize(sample_captions(24))
    pixels = np.concatenate([fid_pixels] * (args.batch // len(fid_pixels) + 1))[:args.batch]
    tokens = {k: np.concatenate([v] * (args.batch // len(v) + 1))[:args.batch]
              for k, v in fid_tokens.items()}
    calib = (preprocess(sample_images(32)), tokenize(sample_captions(24)))
    cpu = host_cpu()
    report: dict[str, Any] = {
        "command": "python benchmarks/openvino_cpu.py " + " ".join(argv or sys.argv[1:]),
        "cpu": cpu.to_dict(), "batch": args.batch, "rounds": args.rounds,
        "versions": {m: __import__(m).__version__ for m in ("onnxruntime", "openvino", "nncf",
                                                             "torch")},
        "fidelity_inputs": {"images": int(len(fid_pixels)), "texts": 24},
        "reference": "eager PyTorch fp32 (the torch backend: the source model)",
        "load_average_start": list(os.getloadavg()), "runs": {}}
    for threads in [int(t) for t in args.threads.split(",")]:
        print(f"threads {threads}: loading", file=sys.stderr)
        paths = load_paths(args.fp32, args.int8, threads, calib)
        errors = fidelity(paths, fid_pixels, fid_tokens)
        print(f"threads {threads}: timing", file=sys.stderr)
        times = measure(paths, pixels, tokens, args.rounds)
        base = {t: statistics.median(times["eager PyTorch fp32"][t]) for t in ("image", "text")}
        rows = []
        for name, (_, precision) in paths.items():
            med = {t: statistics.median(times[name][t]) for t in ("image", "text")}
            rows.append({"path": name, "precision": precision,
                         "image_per_s": args.batch / med["image"],
                         "image_x_eager": base["image"] / med["image"],
                         "text_per_s": args.batch / med["text"],
                         "text_x_eager": base["text"] / med["text"],
                         "image_centred_err": errors[name]["image"],
                         "text_centred_err": errors[name]["text"],
                         "seconds": times[name]})
        report["runs"][str(threads)] = rows
        del paths
        gc.collect()
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    report["load_average_end"] = list(os.getloadavg())
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# OpenVINO and clipfast CPU paths: {args.fp32.name}",
             "", f"Host: {cpu.model}, {cpu.isa} (flags: {' '.join(cpu.flags)}), "
             f"{os.cpu_count()} logical CPUs; onnxruntime {report['versions']['onnxruntime']}, "
             f"openvino {report['versions']['openvino']}, nncf {report['versions']['nncf']}.",
             f"Image tower batch {args.batch}, text tower batch {args.batch}; medians of "
             f"{args.rounds} interleaved rounds; centred error = max over "
             f"{len(fid_pixels)} images / 24 captions against eager fp32 PyTorch.",
             f"Load average at start {report['load_average_start'][0]:.1f}, at end "
             f"{report['load_average_end'][0]:.1f} (a shared machine: ratios within one run "
             "are the figures to read).", "", f"Command: `{report['command']}`", ""]
    for threads, rows in report["runs"].items():
        lines += [f"## {threads} thread(s)", "",
                  "| path | computes in | img/s | x eager | text/s | x eager | image err | "
                  "text err |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['path']} | {r['precision']} | {r['image_per_s']:.1f} | "
                         f"{r['image_x_eager']:.2f} | {r['text_per_s']:.1f} | "
                         f"{r['text_x_eager']:.2f} | {r['image_centred_err']:.2g} | "
                         f"{r['text_centred_err']:.2g} |")
        lines.append("")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
