"""backend="auto" on the CPU: the measured choice among the paths that pass the gates, cached per
host. Timings are injected: the selection logic is tested, never the clock."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import clipfast
from clipfast.artifact.manifest import load_manifest
from clipfast.artifact.selfcheck import load_golden
from clipfast.backends import tune
from clipfast.errors import BackendUnavailable, FidelityError, InputError


def test_candidates_never_lower_the_precision_unasked():
    both = ("onnxruntime", "openvino")
    assert [c.label for c in tune.candidates("fp32", (), both)] == ["onnxruntime", "openvino"]
    allowed = tune.candidates("fp32", ("bf16",), both)
    assert [c.label for c in allowed] == ["onnxruntime", "openvino", "openvino (bf16)"]
    assert allowed[-1].lowered and dict(allowed[-1].options) == {"ov_precision": "bf16"}
    # an int8 artifact is already below bf16: nothing to add; without openvino, onnxruntime only
    assert [c.label for c in tune.candidates("int8", ("bf16",), both)] == list(both)
    assert [c.label for c in tune.candidates("fp32", ("bf16",), ("onnxruntime",))] == [
        "onnxruntime"]


def test_allow_precisions_are_checked():
    assert tune.parse_allow(None) == () and tune.parse_allow("") == ()
    assert tune.parse_allow("bf16") == tune.parse_allow(["bf16", "bf16"]) == ("bf16",)
    with pytest.raises(InputError, match="'int8' cannot be allowed.*clipfast export"):
        tune.parse_allow("bf16,int8")


def test_choose_takes_the_fastest_and_breaks_near_ties_in_order():
    order = ["onnxruntime", "openvino", "openvino (bf16)"]
    assert tune.choose({"onnxruntime": 1.0, "openvino": 0.5}, order) == "openvino"
    # within 3%: noise on a shared machine; the earlier (onnxruntime) keeps it
    assert tune.choose({"onnxruntime": 1.0, "openvino": 0.98}, order) == "onnxruntime"
    assert tune.choose({"openvino": 0.9, "openvino (bf16)": 0.3, "onnxruntime": 1.0},
                       order) == "openvino (bf16)"
    with pytest.raises(ValueError):
        tune.choose({}, order)


class _Fake:
    def __init__(self, label: str):
        self.label = label


@pytest.fixture
def art(small_clip_artifact, tmp_path):
    """A private copy: the choice is cached inside the artifact."""
    return shutil.copytree(small_clip_artifact, tmp_path / "art")


def _resolve(manifest, timings, *, loads, fail=(), check_fail=(), allow=("bf16",),
             threads=2, retune=False, calls=None):
    def load(c):
        loads.append(c.label)
        if c.label in fail:
            raise BackendUnavailable(f"{c.label} cannot load here")
        return _Fake(c.label)

    def check(backend, label):
        if backend.label in check_fail:
            raise FidelityError(f"{label}: image_centred_rel_error = 0.5 exceeds the gate")

    def timer(backends, golden):
        if calls is not None:
            calls.append(sorted(backends))
        return {k: timings[k] for k in backends}

    return tune.resolve_cpu(manifest, load=load, check=check, golden=load_golden(manifest),
                            threads=threads, allow=allow,
                            available=("onnxruntime", "openvino"), retune=retune, timer=timer)


def test_fastest_gated_path_is_chosen_cached_and_reused(art):
    m = load_manifest(art)
    timings = {"onnxruntime": 1.0, "openvino": 0.7, "openvino (bf16)": 0.2}
    loads, calls = [], []
    backend, skipped = _resolve(m, timings, loads=loads, calls=calls,
                                check_fail=("openvino (bf16)",))
    # the fastest path failed its gates: never timed, never chosen, the reason kept
    assert backend.label == "openvino" and calls == [["onnxruntime", "openvino"]]
    assert skipped[0][0] == "openvino (bf16)" and "self-check failed" in skipped[0][1]
    t = backend.tuning
    assert t["cached"] is False and t["label"] == "openvino"
    assert t["seconds_per_round"] == {"onnxruntime": 1.0, "openvino": 0.7}
    assert t["host"]["threads"] == 2 and t["host"]["isa"]
    # the second load reads the cache: only the chosen path loads (and is checked), no timing
    loads.clear()
    again, _ = _resolve(m, timings, loads=loads, calls=calls)
    assert again.label == "openvino" and loads == ["openvino"] and len(calls) == 1
    assert again.tuning["cached"] is True and again.tuning["file"] == t["file"]
    # another thread count or allowance is another host key: measured afresh
    loads.clear()
    other, _ = _resolve(m, timings, loads=loads, calls=calls, threads=1)
    assert len(calls) == 2 and other.tuning["file"] != t["file"]
    # retune measures again (now bf16 passes, and is fastest)
    fresh, _ = _resolve(m, timings, loads=[], calls=calls, retune=True)
    assert fresh.label == "openvino (bf16)" and fresh.tuning["cached"] is False


def test_a_cached_choice_that_no_longer_runs_is_measured_again(art):
    m = load_manifest(art)
    timings = {"onnxruntime": 1.0, "openvino": 0.5}
    _resolve(m, timings, loads=[], allow=())
    loads, calls = [], []
    backend, skipped = _resolve(m, timings, loads=loads, calls=calls, allow=(),
                                fail=("openvino",))
    assert backend.label == "onnxruntime" and loads == ["openvino", "onnxruntime", "openvino"]
    assert calls == []  # one path left: nothing to time
    assert skipped == [("openvino", "openvino cannot load here")]
    assert "only path" in backend.tuning["why"]


def test_no_candidate_runs_returns_none_with_the_reasons(art):
    m = load_manifest(art)
    backend, skipped = _resolve(m, {}, loads=[], allow=(), fail=("onnxruntime", "openvino"))
    assert backend is None and [s[0] for s in skipped] == ["onnxruntime", "openvino"]


def test_time_rounds_interleaves_and_takes_medians():
    order = []

    class Timed:
        def __init__(self, name):
            self.name = name

        def run_image(self, x):
            order.append(self.name)

        def run_text(self, x):
            pass

    ticks = iter([0, 1, 1, 3, 3, 4, 4, 9, 9, 10, 10, 11])  # a: 1, 1, 1; b: 2, 5, 1
    golden = type("G", (), {"pixel_values": np.zeros((2, 3, 4, 4), np.float32),
                            "text": {"ids": np.zeros((2, 5), np.int32)}})()
    out = tune.time_rounds({"a": Timed("a"), "b": Timed("b")}, golden, rounds=3,
                           clock=lambda: next(ticks))
    assert out == {"a": 1, "b": 2}
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-up, then interleaved rounds


def test_engine_auto_measures_and_an_explicit_backend_wins(art, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("CLIPFAST_AUTO_TUNE", "1")
    monkeypatch.delenv("CLIPFAST_ALLOW_PRECISIONS", raising=False)
    seen = []

    def timer(backends, golden, **kw):
        seen.append(sorted(backends))
        return {"onnxruntime": 2.0, "openvino": 1.0, "openvino (bf16)": 0.1}

    monkeypatch.setattr(tune, "time_rounds", timer)
    engine = clipfast.Engine(art)
    # the default never offers bf16, however fast
    assert seen == [["onnxruntime", "openvino"]]
    assert engine.backend == "openvino" and engine.describe()["compute_precision"] == "fp32"
    auto = engine.describe()["auto"]
    assert auto["label"] == "openvino" and auto["cached"] is False
    assert engine.self_check_figures["passed"]
    assert clipfast.Engine(art, backend="onnxruntime").describe()["auto"] is None
    assert clipfast.Engine(art).describe()["auto"]["cached"] is True
    assert len(seen) == 1


def test_engine_auto_takes_bf16_only_when_allowed(art, monkeypatch):
    ovb = pytest.importorskip("clipfast.backends.openvino")
    reason = ovb.bf16_unavailable_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("CLIPFAST_AUTO_TUNE", "1")
    monkeypatch.setenv("CLIPFAST_ALLOW_PRECISIONS", "bf16")
    monkeypatch.setattr(tune, "time_rounds", lambda backends, golden, **kw: {
        "onnxruntime": 2.0, "openvino": 1.0, "openvino (bf16)": 0.1})
    engine = clipfast.Engine(art)
    d = engine.describe()
    assert d["compute_precision"] == "bf16" and d["inference_precision"] == "bf16"
    assert d["auto"]["label"] == "openvino (bf16)" and d["auto"]["allow_precisions"] == ["bf16"]
    # the Engine argument overrides the setting
    strict = clipfast.Engine(art, allow_precisions=())
    assert strict.describe()["compute_precision"] == "fp32"


def test_tune_command_measures_afresh_and_the_engine_reuses_it(art, monkeypatch, capsys):
    pytest.importorskip("openvino")
    import json

    from clipfast.cli import main

    monkeypatch.setenv("CLIPFAST_AUTO_TUNE", "1")
    monkeypatch.delenv("CLIPFAST_ALLOW_PRECISIONS", raising=False)
    monkeypatch.setattr(tune, "time_rounds", lambda backends, golden, **kw: {
        "onnxruntime": 0.5, "openvino": 1.0})
    assert main(["tune", str(art), "--threads", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["label"] == "onnxruntime" and record["host"]["threads"] == 2
    assert record["seconds_per_round"] == {"onnxruntime": 0.5, "openvino": 1.0}
    engine = clipfast.Engine(art, threads=2)
    assert engine.backend == "onnxruntime" and engine.describe()["auto"]["cached"] is True
    assert main(["tune", str(art), "--allow", "fp16"]) == 1
    assert "'fp16' cannot be allowed" in capsys.readouterr().err


def test_the_engine_reports_the_chosen_paths_self_check(art, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("CLIPFAST_AUTO_TUNE", "1")
    monkeypatch.delenv("CLIPFAST_ALLOW_PRECISIONS", raising=False)
    # onnxruntime is checked first and chosen: its figures, not openvino's (checked last)
    monkeypatch.setattr(tune, "time_rounds", lambda backends, golden, **kw: {
        "onnxruntime": 0.5, "openvino": 1.0})
    engine = clipfast.Engine(art)
    assert engine.backend == "onnxruntime"
    assert engine.self_check_figures == engine.check_golden() | {
        "seconds": engine.self_check_figures["seconds"]}


def test_manifest_precision_gates_are_read_and_checked(art):
    import json

    from clipfast.artifact.fidelity import GATES
    from clipfast.artifact.selfcheck import self_check_gates
    from clipfast.errors import ArtifactError

    m = load_manifest(art)
    assert m.spec.precision_gates["bf16"].as_dict() == GATES["bf16"]  # written by the export
    assert self_check_gates(m, "bf16")["image_centred_rel_error_max"] == 0.08
    assert self_check_gates(m, "fp32") == self_check_gates(m)  # the artifact's own
    path = art / "manifest.json"
    data = json.loads(path.read_text())
    data["precision_gates"]["bf16"]["image_centred_rel_error_max"] = 0.05
    path.write_text(json.dumps(data))
    assert self_check_gates(load_manifest(art), "bf16")["image_centred_rel_error_max"] == 0.05
    data["precision_gates"] = {"bf16": 3}
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="precision_gates.bf16 must be an object"):
        load_manifest(art)
