"""Export as stages with a gate.

load -> ONNX per tower (fp32, attention written to fuse) -> ORT transformer fusions (counted,
checked, kept only when complete and exact) -> precision (fp32 as is, fp16 conversion, or int8
quantization with a fidelity guard: export/precision.py) -> tokenizer + manifest -> measure
against PyTorch (export/measure.py) -> gate.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import clipfast
from clipfast.artifact.fidelity import GATES, check_gates
from clipfast.artifact.manifest import write_manifest
from clipfast.artifact.spec import (
    ArtifactSpec,
    Gates,
    GoldenSection,
    GraphSection,
    ImageTower,
    Quantization,
    TextTower,
)
from clipfast.backends.batching import BatchProfile
from clipfast.cpu import host_cpu
from clipfast.errors import ExportError, FidelityError
from clipfast.export.fp16 import IO_DTYPES
from clipfast.export.measure import (
    TowerFidelity,
    calibration_inputs,
    embedding_gates,
    golden_data,
    ort_session,
    run_graph,
    tower_reference,
)
from clipfast.export.options import PRECISIONS, ExportOptions
from clipfast.export.precision import (
    INT8_FORMAT_CHOICES,
    INT8_METHODS,
    convert_towers_fp16,
    quantize_towers,
)
from clipfast.export.quant_options import WEIGHT_OPS

log = logging.getLogger("clipfast.export")

__all__ = ["INT8_FORMAT_CHOICES", "INT8_METHODS", "IO_DTYPES", "PRECISIONS", "ExportOptions",
           "TowerFidelity", "calibration_inputs", "golden_data", "run_export"]

IMAGE_FILE = "image.onnx"
TEXT_FILE = "text.onnx"
TOKENIZER_FILE = "tokenizer.json"
TOWER_FILES = {"image": IMAGE_FILE, "text": TEXT_FILE}
# ORT fusion level: 0 = Python fusions only. The saved graph then holds only standard ONNX and
# com.microsoft contrib operators that every ORT execution provider reads; level 1 would add
# nothing here (the exporter already folded constants), levels 2/99 bake in CPU-only layouts.
FUSION_OPT_LEVEL = 0
# A fused graph must reproduce the source tower on the trace inputs to this relative max error
# (fp32 round-off through 12 blocks is ~1e-6; a lost causal mask or a mis-split QKV is ~1).
FUSION_CHECK_TOL = 1e-4
# An fp16 tower below the gate is converted again with some of its weight operators (in graph
# order) kept fp32, in this order, the fp32 share growing; past the last the export refuses.
# "first": rounding in the first layers is amplified by every layer after them (a random RN101
# image tower: centred error 0.0137 all fp16, 0.0064 with its 3 stem convolutions fp32, 0.0137
# still with the last half fp32). "last": the layers closest to the embedding, whose rounding
# reaches it least damped.
FP16_FALLBACKS: tuple[tuple[str, float], ...] = (
    ("first", 0.05), ("last", 0.25), ("first", 0.25), ("last", 0.5))
_NP_DTYPE = {"fp32": "float32", "fp16": "float16"}


class _Stages:
    """Progress over named stages (a tqdm bar, or log lines when progress is off)."""

    def __init__(self, names: list[str], enabled: bool):
        self.names = names
        self.bar = None
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self._current: str | None = None
        self._start = self.t0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(names), desc="export", unit="stage")

    def start(self, name: str) -> None:
        self._finish()
        self._current, self._start = name, time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        log.info("export: %s", name)

    def _finish(self) -> None:
        if self._current is not None:
            self.times[self._current] = round(time.perf_counter() - self._start, 3)
            if self.bar is not None:
                self.bar.update(1)
            self._current = None

    def close(self) -> None:
        self._finish()
        if self.bar is not None:
            self.bar.close()


# -- graphs ------------------------------------------------------------------------------------
def _check_feed(source, which: str) -> dict[str, np.ndarray]:
    from clipfast.export.onnx_export import example_image_inputs, example_text_inputs

    if which == "text":
        return example_text_inputs(source)
    feed = example_image_inputs(source)
    # noise, not the zeros the trace used: two different rows through every block
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in feed.items()}


def _fuse_tower(source, which: str, raw: Path, fused: Path, rewrite_note: str | None,
                off_reason: str | None) -> tuple[Path, dict[str, Any]]:
    """Fuse one exported tower; return ``(graph to use, manifest["graph"][which] record)``.

    The fused graph is used only when it has one fused Attention per transformer block and
    reproduces the source tower; otherwise the unfused graph is kept and the record says why.
    ``off_reason``: fusion is off (ExportOptions.fusion_off_reason), recorded as given.
    """
    from clipfast.export.fusion import attention_spec, optimize

    record: dict[str, Any] = {"fused": None, "fusion": None}
    if off_reason is not None:
        record["fusion"] = off_reason
        return raw, record
    tower = source.image_tower if which == "image" else source.text_tower
    spec, reason = attention_spec(tower, which)
    if spec is None or rewrite_note:
        record["fusion"] = f"not applied: {rewrite_note or reason}"
        return raw, record
    record.update(model_type=spec.model_type, layers=spec.layers, num_heads=spec.num_heads,
                  hidden_size=spec.hidden_size, opt_level=FUSION_OPT_LEVEL)
    try:
        counts = optimize(raw, fused, spec.model_type, spec.num_heads, spec.hidden_size,
                          opt_level=FUSION_OPT_LEVEL)
    except ExportError as e:
        log.warning("export: %s tower keeps its unfused graph: %s", which, e)
        record["fusion"] = f"failed, unfused graph kept: {e}"
        return raw, record
    attention = counts["Attention"] + counts["MultiHeadAttention"]
    if attention != spec.layers:
        msg = (f"fused {attention} attention nodes for {spec.layers} layers (expected one per "
               f"layer); unfused graph kept")
        log.warning("export: %s tower: %s", which, msg)
        record.update(fusion=f"failed: {msg}", rejected_counts=counts)
        return raw, record
    feed = _check_feed(source, which)
    ref = tower_reference(source, which, feed)
    got = run_graph(ort_session(fused), [feed])
    err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    if not err <= FUSION_CHECK_TOL:
        msg = (f"fused graph differs from the source tower (max relative difference {err:.2e} "
               f"> {FUSION_CHECK_TOL}); unfused graph kept")
        log.warning("export: %s tower: %s", which, msg)
        record.update(fusion=f"failed: {msg}", rejected_counts=counts)
        return raw, record
    record.update(fused=counts, fusion="ok", check_max_rel_diff=err)
    return fused, record


def _place_graph(src: Path, dst: Path) -> None:
    """Move an ONNX graph to ``dst``. A graph over 2 GiB keeps its weights in external data
    files named after the graph: those are rewritten as one ``dst.name + ".data"`` file."""
    import onnx

    header = onnx.load(str(src), load_external_data=False)
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer):
        os.replace(src, dst)
        return
    model = onnx.load(str(src))
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data")

# -- fp16 fallback -----------------------------------------------------------------------------
def _weight_nodes(path: Path, position: str, fraction: float) -> tuple[str, ...]:
    """Names of the ``position`` ("first" or "last") ``fraction`` of the weight operators
    (Conv/MatMul/Gemm/Attention) of the graph at ``path``, in graph order."""
    import onnx

    header = onnx.load(str(path), load_external_data=False)
    names = [n.name for n in header.graph.node if n.op_type in WEIGHT_OPS]
    k = math.ceil(len(names) * fraction)
    if not k:
        return ()
    return tuple(names[:k] if position == "first" else names[len(names) - k:])


def _fp16_fallback(which: str, fp32_path: Path, out_path: Path, io: str,
                   gates: dict[str, Any], fidelity: TowerFidelity) -> dict[str, Any]:
    """Re-convert an fp16 tower that missed its embedding gates, keeping more of its weight
    operators fp32 at each attempt (``FP16_FALLBACKS``); return the conversion report of the
    first that passes (with every attempt's figures) or raise FidelityError listing them."""
    from clipfast.export.fp16 import convert_to_fp16

    measure = fidelity.image if which == "image" else fidelity.text
    tower_gates = embedding_gates(gates, which)
    figures = measure(out_path)
    attempts = [{"fp32_weight_position": None, "fp32_weight_fraction": 0.0,
                 "fp32_weight_nodes": 0, "figures": figures,
                 "failures": check_gates(figures, tower_gates)}]
    for position, fraction in FP16_FALLBACKS:
        nodes = _weight_nodes(fp32_path, position, fraction)
        log.warning("export: fp16 %s tower below the gate (%s); converting again with its %s "
                    "%d weight operators kept fp32", which, "; ".join(attempts[-1]["failures"]),
                    position, len(nodes))
        report = convert_to_fp16(fp32_path, out_path, io=io, fp32_nodes=nodes)
        figures = measure(out_path)
        failures = check_gates(figures, tower_gates)
        attempts.append({"fp32_weight_position": position, "fp32_weight_fraction": fraction,
                         "fp32_weight_nodes": len(nodes), "figures": figures,
                         "failures": failures})
        if not failures:
            report.update(fp32_weight_nodes=len(nodes), fp32_weight_fraction=fraction,
                          fp32_weight_position=position, attempts=attempts)
            return report
    tried = " | ".join(f"{a['fp32_weight_position'] or 'no'} {a['fp32_weight_fraction']:.0%} "
                       "of weight ops fp32: " + "; ".join(a["failures"]) for a in attempts)
    raise FidelityError(f"fp16 {which} tower stays below the gate with the mixed precisions "
                        f"tried: {tried}. Export fp32 instead.")



# -- the export --------------------------------------------------------------------------------
def run_export(options: ExportOptions) -> Path:
    """Export ``options.model`` into ``options.out``; return the artifact directory.

    The artifact is assembled in a temporary directory beside ``out`` and moved into place only
    after it passes the fidelity gate, so a failed export never leaves a half-written artifact
    (or destroys the previous one).
    """
    options.validate()
    from clipfast.export.workspace import ExportWorkspace

    with ExportWorkspace(Path(options.out), options.overwrite) as workspace:
        out = _run_export(options, workspace)
    if options.tensorrt:
        _build_tensorrt_engines(out, options)
    return out


def _stage_names(options: ExportOptions) -> list[str]:
    names = ["load source", "export image tower", "export text tower", "fuse graphs"]
    if options.precision != "fp32":
        names.append(f"convert to {options.precision}")
    return names + ["write tokenizer + manifest", "measure fidelity"]


def _fp32_graphs(options: ExportOptions, stages: _Stages, build: Path
                 ) -> tuple[Any, dict[str, Path], dict[str, dict[str, Any]]]:
    """Load the source, export both towers and fuse them: ``(source, {tower: fp32 graph to
    use}, manifest["graph"])``."""
    from clipfast.export.onnx_export import check_dynamic_text_graph, export_image_tower
    from clipfast.export.sources import load_source

    stages.start("load source")
    source = load_source(options.model, options.pretrained, seed=options.seed)
    notes = {}
    stages.start("export image tower")
    notes["image"] = export_image_tower(source, build / "image.fp32.onnx", options.opset,
                                        fusable=options.fuse_graphs)
    stages.start("export text tower")
    notes["text"], sequence = _export_text(source, options, build / "text.fp32.onnx")
    stages.start("fuse graphs")
    graph: dict[str, dict[str, Any]] = {}
    fp32_graphs: dict[str, Path] = {}
    for which in ("image", "text"):
        fp32_graphs[which], graph[which] = _fuse_tower(
            source, which, build / f"{which}.fp32.onnx", build / f"{which}.fused.onnx",
            notes[which], options.fusion_off_reason)
    if sequence[0] and graph["text"].get("fused") is not None:
        # the fused graph must still take every length (ORT's fusions rewrite the mask)
        diff = check_dynamic_text_graph(source, fp32_graphs["text"])
        if not diff <= FUSION_CHECK_TOL:
            msg = (f"fused graph differs from the source tower at short lengths (max relative "
                   f"difference {diff:.2e}); unfused graph kept")
            log.warning("export: text tower: %s", msg)
            graph["text"].update(fusion=f"failed: {msg}", rejected_counts=graph["text"]["fused"],
                                 fused=None)
            fp32_graphs["text"] = build / "text.fp32.onnx"
    graph["text"]["sequence"], graph["text"]["sequence_reason"] = \
        ("dynamic" if sequence[0] else "fixed"), sequence[1]
    return source, fp32_graphs, graph


def _export_text(source, options: ExportOptions, path: Path) -> tuple[str | None,
                                                                      tuple[bool, str]]:
    """Export the text tower with a dynamic sequence axis when ``text_sequence_plan`` allows it
    and the exported graph reproduces the source at every length; otherwise (the reason
    recorded) with the fixed context length. Returns ``(fusion note, (dynamic, reason))``."""
    from clipfast.export.onnx_export import (
        check_dynamic_text_graph,
        export_text_tower,
        text_sequence_plan,
    )

    dynamic, reason = text_sequence_plan(source)
    if dynamic:
        try:
            note = export_text_tower(source, path, options.opset, fusable=options.fuse_graphs,
                                     dynamic=True)
            diff = check_dynamic_text_graph(source, path)
            if diff <= FUSION_CHECK_TOL:
                return note, (True, reason)
            why = f"max relative difference {diff:.2e} to the source at short lengths"
        except Exception as e:  # the exporter or ONNX Runtime refusing the shorter input
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("export: text tower keeps the fixed length: the dynamic graph failed (%s)",
                    why)
        reason = f"dynamic graph failed ({why}): fixed length"
    note = export_text_tower(source, path, options.opset, fusable=options.fuse_graphs)
    return note, (False, reason)


def _convert_precision(source, options: ExportOptions, stages: _Stages, build: Path, work: Path,
                       fp32_graphs: dict[str, Path], graph: dict[str, dict[str, Any]],
                       gates: dict[str, Any]) -> dict[str, Any] | None:
    """Write the towers at the export's precision into ``work``; return manifest["quantization"]
    (int8) or None."""
    outs = {which: work / TOWER_FILES[which] for which in fp32_graphs}
    if options.precision == "fp32":
        for which, path in fp32_graphs.items():
            _place_graph(path, outs[which])
        return None
    stages.start(f"convert to {options.precision}")
    if options.precision == "fp16":
        convert_towers_fp16(fp32_graphs, outs, options.io, graph)
        return None
    plain_and_fused = {w: {"plain": build / f"{w}.fp32.onnx", "fused": p}
                       for w, p in fp32_graphs.items()}
    return quantize_towers(source, options, plain_and_fused, outs, gates)


def _record_contrib_ops(work: Path, graph: GraphSection) -> None:
    """Record in ``graph.<tower>.contrib_ops`` the op types of the written tower graph outside
    the standard ONNX domain (TensorRT's builder reads this instead of the graph)."""
    from clipfast.export.onnx_files import contrib_ops

    for which, name in TOWER_FILES.items():
        graph.tower(which).contrib_ops = contrib_ops(work / name)


def _manifest_data(source, options: ExportOptions, graph: dict[str, dict[str, Any]],
                   gates: dict[str, Any], golden: GoldenSection,
                   quantization: dict[str, Any] | None) -> ArtifactSpec:
    io_dtype = _NP_DTYPE[options.io]
    return ArtifactSpec(
        clipfast_version=clipfast.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=source.spec, family=source.family, architecture=source.architecture,
        random_weights=source.random_weights, embed_dim=source.embed_dim,
        precision=options.precision, io_dtype=options.io, opset=options.opset,
        image=ImageTower(file=IMAGE_FILE, shape=(3, *source.preprocess.image_size),
                         dtype=io_dtype, output_dtype=io_dtype),
        text=TextTower(file=TEXT_FILE, inputs=tuple(source.text_inputs),
                       output_dtype=io_dtype,
                       sequence=graph["text"].pop("sequence", "fixed"),
                       sequence_reason=graph["text"].pop("sequence_reason", "")),
        preprocess=source.preprocess, tokenizer=source.tokenizer, logits=source.logits,
        graph=GraphSection.from_dict(graph, "export"), gates=Gates.from_dict(gates, "export"),
        golden=golden,
        quantization=None if quantization is None else Quantization.from_dict(quantization,
                                                                              "export"),
        # Where the gates were measured: int8 kernels (and so results) differ by CPU family
        # (clipfast.cpu); every Engine re-checks the golden outputs on its own host.
        exported_on=host_cpu().to_dict(),
        # Gates for running the fp32 / fp16 towers in bf16 (OpenVINO on AVX512_BF16 / AMX
        # CPUs, only when asked for): the runtime's self-check holds bf16 paths to these.
        precision_gates={"bf16": Gates.from_dict(GATES["bf16"], "export")}
        if options.precision in ("fp32", "fp16") else {})


def _write_artifact(source, options: ExportOptions, work: Path,
                    graph: dict[str, dict[str, Any]], gates: dict[str, Any],
                    quantization: dict[str, Any] | None) -> tuple[ArtifactSpec, list[str]]:
    """Tokenizer, golden data and manifest into ``work``: ``(manifest spec, listed files)``."""
    from clipfast.artifact.selfcheck import write_golden

    (work / TOKENIZER_FILE).write_text(source.tokenizer_json)
    golden = write_golden(work, golden_data(source))
    data = _manifest_data(source, options, graph, gates, golden, quantization)
    _record_contrib_ops(work, data.graph)
    # towers over 2 GiB carry their weights in "<tower>.onnx.data" files beside them
    files = [IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE, golden.file, *sorted(
        p.name for p in work.iterdir() if p.name.endswith(".onnx.data"))]
    write_manifest(work, data, files)
    return data, files


def _measure_artifact(source, options: ExportOptions, work: Path, data: ArtifactSpec,
                      files: list[str], fp32_graphs: dict[str, Path]
                      ) -> tuple[dict[str, Any], list[str]]:
    """Measure the artifact in ``work`` against the source through an Engine, as users will
    load it; an fp16 tower below its gates is converted again with more fp32 weight operators
    (the manifest rewritten). Returns ``(figures, failures)``, the golden self-check included."""
    from clipfast.export.verify import images_from_dir, measure

    gates = data.gates.as_dict()
    images = images_from_dir(options.images) if options.images else None
    measure_images = [str(p) for p in images] if images else None
    engine = clipfast.Engine(work, backend="onnxruntime", self_check=False)
    figures = measure(source, engine, images=measure_images)
    failures = check_gates(figures, gates)
    retry = [w for w in ("image", "text") if check_gates(figures, embedding_gates(gates, w))]
    if failures and retry and options.precision == "fp16" and options.gate:
        del engine  # its sessions hold the graphs about to be rewritten
        _fp16_retry(source, options, work, data, retry, fp32_graphs, measure_images)
        write_manifest(work, data, files)
        engine = clipfast.Engine(work, backend="onnxruntime", self_check=False)
        figures = measure(source, engine, images=measure_images)
        failures = check_gates(figures, gates)
    # The check every Engine will run at load, run here first: an artifact that would refuse
    # itself on the exporting host is not written.
    golden = data.golden
    try:
        golden.figures_at_export = engine.check_golden()
    except FidelityError as e:
        golden.figures_at_export = getattr(e, "figures", None)
        failures.append(f"golden self-check: {e}")
    return figures, failures


def _fp16_retry(source, options: ExportOptions, work: Path, data: ArtifactSpec,
                towers: list[str], fp32_graphs: dict[str, Path],
                images: list[str] | None) -> None:
    """``_fp16_fallback`` for each tower of ``towers``, recorded in the manifest data."""
    graph = data.graph
    fidelity = TowerFidelity(source, images, "fp16")
    try:
        for which in towers:
            graph.tower(which).fp16 = _fp16_fallback(
                which, fp32_graphs[which], work / TOWER_FILES[which], options.io,
                data.gates.as_dict(), fidelity)
    except FidelityError as e:
        raise FidelityError(f"{options.model} fp16: {e}; nothing written to {options.out}"
                            ) from e
    _record_contrib_ops(work, graph)


def _run_export(options: ExportOptions, workspace) -> Path:
    """The export's stages inside ``workspace`` (locked, with its work directory)."""
    out, work = workspace.out, workspace.work
    build = work / ".build"
    build.mkdir()
    stages = _Stages(_stage_names(options), options.progress)
    try:
        source, fp32_graphs, graph = _fp32_graphs(options, stages, build)
        gates = GATES[options.precision]
        quantization = _convert_precision(source, options, stages, build, work, fp32_graphs,
                                          graph, gates)
        stages.start("write tokenizer + manifest")
        data, files = _write_artifact(source, options, work, graph, gates, quantization)
        stages.start("measure fidelity")
        figures, failures = _measure_artifact(source, options, work, data, files, fp32_graphs)
        shutil.rmtree(build)
        stages.close()
        figures["passed"] = not failures
        data.fidelity = figures
        data.export_seconds = round(time.perf_counter() - stages.t0, 2)
        data.stage_seconds = stages.times
        write_manifest(work, data, files)
        if failures and options.gate:
            workspace.keep_for_inspection()
            raise FidelityError(
                f"{options.model} {options.precision}: fidelity below the gate, artifact not "
                f"written to {out} (kept for inspection in {work}): " + "; ".join(failures)
            )
        return workspace.commit()
    finally:
        stages.close()


def _build_tensorrt_engines(out: Path, options: ExportOptions) -> None:
    """Build the towers' engines into ``out/tensorrt/`` and record them in the manifest's
    ``tensorrt`` section (the artifact is complete and in place; a failed build says how to
    retry)."""
    from clipfast.backends.tensorrt.build import build_engines
    from clipfast.errors import ClipfastError

    try:
        build_engines(out, options.batch_profile or BatchProfile(), progress=options.progress)
    except ClipfastError as e:  # parse/build errors, no GPU, CUDA errors
        raise ExportError(f"the artifact was written to {out}, but building its TensorRT "
                          f"engines failed: {e}. Retry with `clipfast build-engines {out}`"
                          ) from e
