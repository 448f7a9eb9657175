"""`clipfast bench`: statistics, FLOP counting, speedups, reports, and one tiny real run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from clipfast import bench
from clipfast import cpu as cpu_facts
from clipfast.cli import build_parser, main
from clipfast.errors import ClipfastError

# --------------------------------------------------------------------------- statistics


def test_percentiles_interpolate_linearly_and_throughput_uses_the_median():
    stats = bench.summarize(list(range(100, 0, -1)), batch_size=8)  # 1..100 ms, any order
    # Linear interpolation between order statistics: rank q * (n - 1).
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["min_ms"] == 1 and stats["max_ms"] == 100 and stats["iterations"] == 100
    assert stats["items_per_s"] == pytest.approx(8 * 1000 / 50.5)
    assert stats["ms_per_item"] == pytest.approx(50.5 / 8)
    one = bench.summarize([4.0], batch_size=1)
    assert one["p50_ms"] == one["p99_ms"] == 4.0 and one["std_ms"] == 0.0
    with pytest.raises(ValueError, match="no timings"):
        bench.summarize([], batch_size=1)


def test_time_callable_warms_up_syncs_and_stops_on_iterations_or_time():
    calls, syncs = [], []
    times = bench.time_callable(lambda: calls.append(1), warmup=2, min_iters=3, min_seconds=0,
                                sync=lambda: syncs.append(1))
    assert len(times) == 3 and len(calls) == 5  # warm-up calls are not timed
    assert len(syncs) == 1 + 3  # once after warm-up, then inside every timed call

    now = [0.0]

    def clock():  # every reading advances a fake clock by 1 s
        now[0] += 1.0
        return now[0]

    capped = bench.time_callable(lambda: None, warmup=0, min_iters=2, max_iters=4,
                                 min_seconds=1000, clock=clock)
    assert len(capped) == 4 and all(t == pytest.approx(1000.0) for t in capped)
    with pytest.raises(ValueError):
        bench.time_callable(lambda: None, min_iters=5, max_iters=2)


def test_interleaved_timing_rotates_and_isolates_failures():
    order: list[str] = []

    def boom():
        order.append("c")
        raise MemoryError("out of memory at batch 128")

    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b"), "c": boom}
    got = bench.time_interleaved(fns, warmup=1, min_iters=3, min_seconds=0)
    assert isinstance(got["c"], MemoryError) and len(got["a"]) == len(got["b"]) == 3
    # warm-up a, b, c (fails: leaves the rotation); then rounds a b, b a, a b.
    assert "".join(order) == "abc" + "ab" + "ba" + "ab"


def test_speedup_is_against_torch_for_the_same_model_tower_mode_and_batch():
    def row(backend, tower, batch, ips, model="m", mode="tower"):
        return {"model": model, "backend": backend, "tower": tower, "mode": mode,
                "batch_size": batch, "items_per_s": ips}

    rows = [row("torch", "image", 1, 2.0), row("onnxruntime", "image", 1, 5.0),
            row("onnxruntime", "image", 8, 9.0), row("torch", "text", 1, 4.0),
            row("onnxruntime", "text", 1, 2.0), row("onnxruntime", "text", 1, 3.0, mode="e2e"),
            row("onnxruntime", "image", 1, 7.0, model="other")]
    bench.add_speedups(rows)
    got = [r["speedup_vs_torch"] for r in rows]
    assert got == [1.0, 2.5, None, 1.0, 0.5, None, None]
    # Interleaved groups compare only within themselves.
    grouped = [dict(row("torch", "image", 1, 2.0), group=0),
               dict(row("onnxruntime", "image", 1, 6.0), group=0),
               dict(row("torch", "image", 1, 3.0), group=1),
               dict(row("onnxruntime", "image", 1, 6.0), group=1)]
    bench.add_speedups(grouped)
    assert [r["speedup_vs_torch"] for r in grouped] == [1.0, 3.0, 1.0, 2.0]


# --------------------------------------------------------------------------- FLOPs


def _tiny_graph() -> tuple[object, float]:
    """MatMul -> a Reshape whose target is computed (Shape, Gather, Div, Cast, Concat, as torch
    exports write head dims) -> Gemm, plus a grouped Conv. Returns (model, FLOPs at batch 1)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((6, 16)).astype(np.float32), "w2")
    wc = numpy_helper.from_array(rng.standard_normal((12, 3, 3, 3)).astype(np.float32), "wc")
    consts = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
              [("i1", 1), ("i2", 2), ("two", 2), ("ax0", [0]), ("minus1", [-1])]]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["y"], name="mm"),            # (B, 4, 16)
        helper.make_node("Shape", ["y"], ["ys"]),
        helper.make_node("Gather", ["ys", "i2"], ["d16"]),
        helper.make_node("Div", ["d16", "two"], ["d8"]),                       # 16 / 2 = 8
        helper.make_node("Cast", ["d8"], ["d8f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["d8f"], ["d8i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["d8i", "two"], ["d16b"]),
        helper.make_node("Unsqueeze", ["d16b", "ax0"], ["d16u"]),
        helper.make_node("Concat", ["minus1", "d16u"], ["target"], axis=0),  # [-1, 16]
        helper.make_node("Reshape", ["y", "target"], ["y2"]),                  # (4B, 16)
        helper.make_node("Gemm", ["y2", "w2"], ["z"], name="gemm", transB=1),  # (4B, 6)
        helper.make_node("Conv", ["img", "wc"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 6, 10, 10])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
        [w1, w2, wc, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = (2 * 4 * 16 * 8          # MatMul: (4, 8) @ (8, 16)
                + 2 * 4 * 6 * 16        # Gemm: (4, 16) @ (16, 6)
                + 2 * 12 * 10 * 10 * 3 * 3 * 3)  # Conv: each output is a (6/2)*3*3 dot product
    return model, float(expected)


def test_count_flops_on_a_tiny_graph_with_computed_shapes(tmp_path):
    model, expected = _tiny_graph()
    fc = bench.count_flops(model)
    assert fc.total == expected and fc.nodes == 3 and not fc.unresolved
    # The Reshape target is computed at run time: shape inference cannot see through the
    # Div, one onnxruntime run at the bound shapes gives the Gemm's input shape.
    assert fc.method == "onnx.shape_inference + onnxruntime probe"
    static = bench.count_flops(model, probe=False)
    assert static.unresolved == ["gemm"] and static.total == expected - 2 * 4 * 6 * 16
    assert fc.by_op == {"MatMul": 2 * 4 * 16 * 8, "Gemm": 2 * 4 * 6 * 16,
                        "Conv": 2 * 12 * 100 * 27}
    assert fc.int8_fraction == 0.0
    # Symbolic batch bound to 2 doubles everything; a file path works the same way.
    path = tmp_path / "tiny.onnx"
    path.write_bytes(model.SerializeToString())
    assert bench.count_flops(path, batch=2).total == 2 * expected
    # Weights in an external data file (here the conv weight, the one over onnx's default
    # 1 KiB threshold): onnxruntime reads them from the graph's folder.
    ext = tmp_path / "ext"
    ext.mkdir()
    external = onnx.ModelProto()
    external.CopyFrom(model)  # onnx.save moves the weights of the proto it saves out
    onnx.save(external, str(ext / "tiny.onnx"), save_as_external_data=True,
              location="tiny.data")
    assert (ext / "tiny.data").stat().st_size == 12 * 3 * 3 * 3 * 4
    fc = bench.count_flops(ext / "tiny.onnx", batch=2)
    assert fc.total == 2 * expected and fc.method.endswith("onnxruntime probe")
    # Explicit shapes win over the binding rule.
    shapes = {"x": [1, 4, 8], "img": [1, 6, 20, 20]}
    assert bench.count_flops(model, shapes).total == expected + 3 * 2 * 12 * 100 * 27


def test_count_flops_reports_what_it_cannot_count():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 4])
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["dq"]),
             helper.make_node("MatMul", ["a", "dq"], ["y"]),
             helper.make_node("Einsum", ["a", "b"], ["e"], equation="ij,jk->ik")]
    inits = [numpy_helper.from_array(np.ones((3, 4), np.int8), "q"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s")]
    graph = helper.make_graph(nodes, "g", [a, b], [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, None), helper.make_tensor_value_info("e", TensorProto.FLOAT,
                                                                      None)], inits)
    fc = bench.count_flops(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert fc.total == 2 * 2 * 4 * 3
    assert fc.int8_fraction == 1.0  # the weight comes out of a DequantizeLinear: QDQ int8
    assert fc.uncounted_ops == ["Einsum"]


def test_node_flops_formulas():
    shapes = {"a": [2, 5, 7], "b": [7, 3], "y": [2, 5, 3], "A": [7, 5], "g": [5, 3],
              "W": [3, 7], "x": [1, 8, 16], "w": [16, 48], "att": [1, 8, 16]}

    def n(op, ins, out="y", **kw):
        return helper.make_node(op, ins, [out], **kw)

    get = shapes.get
    assert bench.node_flops(n("MatMul", ["a", "b"]), get) == 2 * 2 * 5 * 3 * 7
    assert bench.node_flops(n("MatMul", ["unknown", "b"]), get) == 2 * 2 * 5 * 3 * 7  # K from B
    assert bench.node_flops(n("Gemm", ["A", "W"], "g", transA=1, transB=1), get) == 2 * 5 * 3 * 7
    assert bench.node_flops(n("MatMul", ["a", "b"], "nowhere"), get) is None
    # com.microsoft Attention: QKV projection plus QK^T and AV over 8 tokens of width 16.
    att = n("Attention", ["x", "w"], "att", num_heads=2)
    assert bench.node_flops(att, get) == 2 * 8 * 16 * 48 + 4 * 8 * 8 * 16


def test_counts_a_real_exported_tower_exactly(tiny_artifact):
    """HF CLIP vision tower, width 64, 2 layers, 16x16 patches on 64x64: the counted FLOPs
    equal the architecture's own arithmetic."""
    tokens, width, layers = (64 // 16) ** 2 + 1, 64, 2
    per_layer = 24 * tokens * width**2 + 4 * tokens**2 * width  # qkv+out+mlp, QK^T+AV
    expected = 2 * 16 * width * 3 * 16 * 16 + layers * per_layer + 2 * width * 48
    fc = bench.count_flops(tiny_artifact / "image.onnx", {"pixel_values": [1, 3, 64, 64]})
    assert fc.total == expected and not fc.unresolved


# --------------------------------------------------------------------------- reports


def _fake_doc() -> dict:
    rows = []
    for backend, scale in (("onnxruntime", 1.0), ("torch", 3.0)):
        for batch in (1, 8):
            stats = bench.summarize([scale * batch * x for x in (10.0, 11.0, 12.0)], batch)
            rows.append({"model": "ViT-B-32", "artifact": "a", "backend": backend,
                         "device": "cpu", "precision": "fp32", "tower": "image", "mode": "tower",
                         "batch_size": batch, **stats, "peak_rss_mb": 700.0,
                         "gflop_per_item": 8.8, "utilisation": 0.4})
    bench.add_speedups(rows)
    return {"schema": bench.SCHEMA, "command": "clipfast bench a --out r.json",
            "machine": {"cpu": "test cpu", "cores": 2, "versions": {"numpy": np.__version__}},
            "load_average": {"start": [0.1, 0.1, 0.1], "end": [0.2, 0.1, 0.1]},
            "settings": {"device": "cpu", "threads": 2, "warmup": 2, "min_iters": 5,
                         "min_seconds": 2.0},
            "peak": {"device": "cpu", "size": 2048, "fp32_gflops": 60.0, "int8_gops": 190.0,
                     "measured": {"numpy_fp32": 45.0}},
            "artifacts": [{"path": "a", "model": "ViT-B-32", "precision": "fp32",
                           "flops": {"image": {"gflop": 8.8}}}],
            "rows": rows, "skipped": [], "notes": []}


def test_write_results_json_markdown_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    doc = _fake_doc()
    files = bench.write_results(doc, tmp_path / "sub" / "results.json")
    data = json.loads(Path(files["json"]).read_text())
    assert [r["speedup_vs_torch"] for r in data["rows"]] == [3.0, 3.0, 1.0, 1.0]
    assert data["files"] == {"json": "results.json", "markdown": "results.md",
                             "plot": "results.png"}
    md = Path(files["markdown"]).read_text()
    assert "| model | backend | precision | tower | mode | batch | p50 ms |" in md
    assert "| ViT-B-32 | onnxruntime | fp32 | image | tower | 1 | 11.00 |" in md
    assert "3.00x" in md and "40.0%" in md and "clipfast bench a --out r.json" in md
    assert Path(files["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head = bench.headline_table([data], batch_sizes=[8])
    assert head.count("\n") == 2 and "| ViT-B-32 (fp32) | image | tower | 8 |" in head


def test_results_name_the_cpu_isa(tmp_path, monkeypatch):
    """The JSON records the ISA level and flags of the host's CpuInfo; the report's CPU line,
    the headline table and the printed summary name the level (here a fake AVX2-only EPYC, so
    the test does not depend on the machine it runs on)."""
    fake = cpu_facts.CpuInfo(machine="x86_64", model="AMD EPYC 7B12",
                             flags=("sse4_2", "avx", "avx2", "fma", "f16c"))
    monkeypatch.setattr(cpu_facts, "host_cpu", lambda: fake)
    machine = bench.machine_info("cpu")
    assert machine["cpu"] == "AMD EPYC 7B12" and machine["arch"] == "x86_64"
    assert machine["isa"] == "AVX2" and machine["int8_saturates"] is True
    assert machine["cpu_features"] == ["sse4_2", "avx", "avx2", "fma", "f16c"]
    doc = _fake_doc()
    doc["machine"] = dict(machine, cores=2)
    files = bench.write_results(doc, tmp_path / "r.json")
    data = json.loads(Path(files["json"]).read_text())
    assert data["machine"]["isa"] == "AVX2"
    assert data["machine"]["cpu_features"] == ["sse4_2", "avx", "avx2", "fma", "f16c"]
    md = Path(files["markdown"]).read_text()
    assert "- CPU: AMD EPYC 7B12, AVX2, 2 cores (flags sse4_2, avx, avx2, fma, f16c)" in md
    head = bench.headline_table([data], batch_sizes=[8])
    assert head.splitlines()[0].endswith("| CPU ISA |")
    assert head.splitlines()[2].endswith("| AVX2 |")


def test_isa_of_documents_written_before_it_was_recorded():
    """Older documents carry only ``cpu_features``: the level comes from those flags; without
    flags the report says so instead of guessing."""
    xeon = {"platform": "Linux-6.1-x86_64-with-glibc2.36", "cpu": "Intel(R) Xeon(R) Processor",
            "cores": 2, "cpu_features": ["avx2", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                                         "avx512f", "avx_vnni", "fma"]}
    assert bench.machine_isa(xeon) == "AVX-512 VNNI"
    assert bench.machine_isa(dict(xeon, cpu_features=["avx2", "fma"])) == "AVX2"
    assert bench.machine_isa(dict(xeon, cpu_features=["avx2", "avx512f"])) == "AVX-512"
    assert bench.machine_isa(dict(xeon, cpu_features=["avx2", "amx_int8"])) == "AMX"
    assert bench.machine_line(xeon) == "CPU: Intel(R) Xeon(R) Processor, AVX-512 VNNI, 2 cores"
    doc = _fake_doc()  # machine: {"cpu": "test cpu", "cores": 2}, no flags
    assert bench.machine_isa(doc["machine"]) is None
    assert "- CPU: test cpu, ISA not recorded, 2 cores;" in bench.markdown_report(doc)
    assert bench.headline_table([doc]).splitlines()[2].endswith("| not recorded |")


def test_png_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    doc = _fake_doc()
    files = bench.write_results(doc, tmp_path / "r.json")
    assert files["plot"] is None and not (tmp_path / "r.png").exists()
    assert any("matplotlib is not installed" in n for n in doc["notes"])
    assert "matplotlib is not installed" in (tmp_path / "r.md").read_text()


def test_importing_bench_is_cheap():
    code = ("import sys, clipfast.bench, clipfast.cli; heavy = {'torch', 'matplotlib', 'onnx', "
            "'onnxruntime', 'numpy'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_works_without_onnx(tmp_path):
    """The runtime wheel has no onnx: importing the bench and its --help work without it, and
    counting FLOPs fails with an ImportError that says what is missing, which a run turns into
    empty FLOP columns and a note."""
    code = '''
import sys
sys.modules["onnx"] = None  # import onnx -> ImportError
import clipfast.bench as bench
from clipfast.cli import main
from clipfast.bench.config import BenchConfig
from clipfast.bench.run import _Run

try:
    main(["bench", "--help"])
except SystemExit as e:
    assert e.code == 0, e.code
try:
    bench.count_flops("tower.onnx")
except ImportError as e:
    assert "needs the onnx package" in str(e), e
else:
    raise AssertionError("count_flops ran without onnx")


from pathlib import Path
from clipfast.artifact.manifest import Manifest

from clipfast.artifact.spec import ArtifactSpec
manifest = Manifest(Path("."), ArtifactSpec.from_dict({
    "source": {}, "family": "t", "embed_dim": 8, "precision": "fp32",
    "image": {"file": "image.onnx", "input": "pixel_values", "output": "e", "shape": [3, 8, 8]},
    "text": {"file": "text.onnx", "inputs": ["input_ids"], "output": "t"},
    "preprocess": {"image_size": [8, 8]}, "tokenizer": {"kind": "hf", "context_length": 8},
    "logits": {"kind": "softmax", "scale": 1.0},
    "files": {"image.onnx": {}, "text.onnx": {}}}))
manifest.path = lambda name: name
run = _Run(BenchConfig(artifacts=[]), lambda msg: None)
into = {}
got = run._count_flops(manifest, "m", into)
assert got == {"image": None, "text": None} and into == {}, (got, into)
assert len(run.notes) == 1 and "needs the onnx package" in run.notes[0], run.notes
assert "GFLOP/item and utilisation columns are empty" in run.notes[0], run.notes
peak = bench.measure_cpu_peak(64, repeats=1)  # numpy's fp32 alone, and a note saying why
assert peak["fp32_gflops"] > 0 and peak["int8_gops"] is None, peak
assert "install onnx" in peak["notes"][0], peak["notes"]
assert "onnx" not in [m for m in sys.modules if sys.modules[m] is not None]
'''
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "clipfast bench" in done.stdout and "--batch-sizes" in done.stdout


def test_cli_parses_lists_and_validates():
    args = build_parser().parse_args(["bench", "a", "b", "--batch-sizes", "1, 8", "--towers",
                                      "text", "--out", "r.json"])
    assert args.artifact == ["a", "b"] and args.batch_sizes == (1, 8)
    assert args.towers == ("text",) and args.backends == ("onnxruntime", "tensorrt", "torch")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "a", "--batch-sizes", "1,x", "--out", "r.json"])
    bad = bench.BenchConfig(artifacts=[Path("a")], towers=("vision",))
    with pytest.raises(ClipfastError, match="--towers vision"):
        bad.validate()


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, export_fn) -> Path:
    """A transformers CLIP with a 64x64, 2-layer vision tower and a 2-layer text tower."""
    import hf_models

    root = tmp_path_factory.mktemp("bench")
    src = hf_models.save_clip(root / "src", size="small")
    return export_fn(f"transformers:{src}", root / "tiny")


def test_bench_run_on_a_tiny_artifact(tiny_artifact, tmp_path, photos, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name in ("chelsea", "rocket"):
        Image.fromarray(photos[name]).save(images / f"{name}.jpg")
    out = tmp_path / "res" / "results.json"
    rc = main(["bench", str(tiny_artifact), "--backends", "onnxruntime,tensorrt,torch",
               "--batch-sizes", "1", "--images", str(images), "--warmup", "1", "--min-iters",
               "2", "--max-iters", "2", "--min-seconds", "0", "--peak-size", "256", "--quiet",
               "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    keys = {(r["backend"], r["tower"], r["mode"], r.get("text_length")) for r in rows}
    context = json.loads((tiny_artifact / "manifest.json").read_text())["tokenizer"][
        "context_length"]
    lengths = sorted({min(n, context) for n in (8, 16, 32, 77)})
    assert keys == {(b, t, m, None) for b in ("onnxruntime", "torch") for t in ("image", "text")
                    for m in ("tower", "end_to_end") if (t, m) != ("text", "tower")} | {
        (b, "text", "tower", n) for b in ("onnxruntime", "torch") for n in lengths}
    # text rows at each length: the dynamic path runs that many tokens, torch pads to the context
    for r in rows:
        if r.get("text_length"):
            ran = context if r["backend"] == "torch" else r["text_length"]
            assert r["tokens_run"] == ran
    assert [s["backend"] for s in doc["skipped"]] == ["tensorrt"]
    assert "tensorrt" in doc["skipped"][0]["reason"]
    flops = doc["artifacts"][0]["flops"]
    for r in rows:
        assert r["iterations"] == 2 and r["batch_size"] == 1
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["items_per_s"] == pytest.approx(1000 / r["p50_ms"], rel=1e-3)
        assert r["peak_rss_mb"] > 0
        share = r["tokens_run"] / context if r.get("text_length") else 1.0
        assert r["gflop_per_item"] == pytest.approx(flops[r["tower"]]["gflop"] * share,
                                                    rel=1e-4)
        assert r["peak_gflops"] == doc["peak"]["fp32_gflops"] > 0
        assert r["utilisation"] == pytest.approx(
            r["gflop_per_item"] * r["items_per_s"] / r["peak_gflops"], rel=1e-3)
        expected = 1.0 if r["backend"] == "torch" else None
        if expected:
            assert r["speedup_vs_torch"] == 1.0
        else:
            assert r["speedup_vs_torch"] and math.isfinite(r["speedup_vs_torch"])
    assert doc["command"].startswith(f"clipfast bench {tiny_artifact} --backends")
    assert out.with_suffix(".md").is_file()
    printed = capsys.readouterr().out
    assert "| model | backend |" in printed and "results:" in printed
    assert doc["machine"]["isa"] == cpu_facts.host_cpu().isa
    assert f"CPU: {doc['machine']['cpu']}, {doc['machine']['isa']}, " in printed

    # Interleaved: both backends timed call by call in one group; speedups within it.
    out2 = tmp_path / "inter.json"
    assert main(["bench", str(tiny_artifact), "--backends", "onnxruntime,torch", "--towers",
                 "text", "--batch-sizes", "2", "--warmup", "0", "--min-iters", "2",
                 "--max-iters", "2", "--min-seconds", "0", "--no-peak", "--interleave",
                 "--quiet", "--out", str(out2)]) == 0
    rows = json.loads(out2.read_text())["rows"]
    assert [(r["backend"], r["group"], r["iterations"], r["text_length"]) for r in rows] == [
        (b, 0, 2, n) for n in lengths for b in ("onnxruntime", "torch")]
    assert rows[1]["speedup_vs_torch"] == 1.0 and rows[0]["utilisation"] is None
