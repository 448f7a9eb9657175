"""Backend options: each backend declares the ones it accepts (``OPTIONS``), an unknown one raises
InputError naming it and listing the valid ones, and ``auto`` checks against every backend it may
load and hands each backend only its own (an option of one backend does not trouble the others).
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from manifest_stub import stub_manifest

import clipfast
from clipfast import backends
from clipfast.backends import onnxruntime as ort_backend
from clipfast.backends import openvino as ov_backend
from clipfast.backends import torch as torch_backend
from clipfast.backends.base import check_options
from clipfast.backends.tensorrt import backend as trt_backend
from clipfast.errors import BackendUnavailable, InputError

MODULES = {"tensorrt": trt_backend, "onnxruntime": ort_backend, "openvino": ov_backend,
           "torch": torch_backend}
NOWHERE = stub_manifest("/nonexistent", {})


def test_every_backend_declares_its_options():
    assert set(MODULES) == set(backends.available_backends())
    for name, module in MODULES.items():
        assert module.OPTIONS and len(set(module.OPTIONS)) == len(module.OPTIONS), name
    assert "cuda_graphs" in torch_backend.OPTIONS and "cuda_graphs" in trt_backend.OPTIONS
    assert "cuda_graphs" not in ort_backend.OPTIONS



def _received(name: str) -> set[str]:
    """The names under which backend ``name`` receives its checked options: its class's
    parameters (the torch backend's: the fields of its resolved TorchOptions)."""
    if name == "torch":
        return {f.name for f in dataclasses.fields(torch_backend.TorchOptions)}
    cls = {"tensorrt": trt_backend.TensorRTBackend, "onnxruntime": ort_backend.OnnxRuntimeBackend,
           "openvino": ov_backend.OpenVinoBackend}[name]
    return set(inspect.signature(cls).parameters)


@pytest.mark.parametrize("name", ["tensorrt", "onnxruntime", "openvino", "torch"])
def test_every_declared_option_reaches_the_backend_and_is_documented(name):
    """The spec the checks use is the one the backend is built from: every declared option's
    default passes its own check, is a parameter of the class that receives the checked options
    (a declared option the backend ignores, or one renamed on one side, fails here), and is
    described in the module docstring, where users look options up."""
    spec = backends.option_spec(name)
    assert tuple(spec) == backends.backend_options(name)
    fields = _received(name)
    defaults = spec.validate({})
    for option in spec:
        assert f"``{option}``" in MODULES[name].__doc__, f"{name}: {option} is not documented"
        assert option in fields, f"{name}: {option} does not reach the backend"
        assert spec.validate({option: defaults[option]})[option] == defaults[option], option


@pytest.mark.parametrize(("name", "option", "value", "message"), [
    ("onnxruntime", "ort_tensorrt", "yes", "backend option ort_tensorrt='yes': expected True or "
     "False"),
    ("onnxruntime", "device_id", -1, "backend option device_id=-1: expected a CUDA device"),
    ("onnxruntime", "profile", (4, 2, 1), "backend option profile=(4, 2, 1)"),
    ("openvino", "ov_precision", "fp8", "backend option ov_precision='fp8': expected one of "
     "auto, f32, bf16"),
    ("torch", "dtype", "int4", "backend option dtype='int4': expected one of auto, fp32"),
    ("torch", "attention", "fast", "backend option attention='fast': expected one of"),
    ("tensorrt", "build", "always", "tensorrt backend option build='always': expected one of "
     "missing, never"),
])
def test_a_bad_value_is_refused_up_front_by_name_and_in_auto(recorded_loads, name, option,
                                                              value, message):
    """Values are checked with the names, before anything loads, for a named backend and in
    ``auto`` on every device (before, a bad value of a backend the CPU chain never reaches,
    such as tensorrt's, passed unseen on a CPU host)."""
    for backend, device in ((name, "cpu"), ("auto", "cpu"), ("auto", "cuda")):
        with pytest.raises(InputError) as info:
            backends.resolve_backend(backend, NOWHERE, device, **{option: value})
        assert message in str(info.value), (backend, device, str(info.value))
    assert recorded_loads == []


@pytest.mark.parametrize("name", ["tensorrt", "onnxruntime", "openvino", "torch"])
def test_load_rejects_an_unknown_option_before_loading_anything(name):
    """The check comes first: no runtime is imported and the (missing) artifact is not read."""
    module = MODULES[name]
    with pytest.raises(InputError) as info:
        module.load(NOWHERE, device="cpu", cuda_graph=False)
    msg = str(info.value)
    assert msg.startswith(f"backend {name}: unknown option 'cuda_graph'")
    assert f"valid options: {', '.join(sorted(module.OPTIONS))}" in msg
    if "cuda_graphs" in module.OPTIONS:
        assert "(did you mean 'cuda_graphs'?)" in msg


def test_load_rejects_the_options_of_other_backends():
    with pytest.raises(InputError, match=r"backend onnxruntime: unknown options 'dtype', "
                                         r"'build'; valid options: device_id"):
        ort_backend.load(NOWHERE, "cpu", threads=1, dtype="fp16", build="never")
    with pytest.raises(InputError, match="backend torch: unknown option 'ort_tensorrt'"):
        torch_backend.load(NOWHERE, "cpu", ort_tensorrt=True)


def test_check_options_lists_per_backend_when_given_several():
    check_options({"profile": None}, {"a": ("profile",), "b": ("dtype",)}, "backend auto")
    with pytest.raises(InputError, match=r"^backend auto: unknown option 'x'; valid options: "
                                         r"a: profile; b: dtype$"):
        check_options({"x": 1}, {"a": ("profile",), "b": ("dtype",)}, "backend auto")


@pytest.fixture
def recorded_loads(monkeypatch):
    """Every backend's load() replaced by a recorder that skips (BackendUnavailable) unless the
    backend is named in ``loads.succeed``; the list holds ``(backend, device, options)``."""

    class Loads(list):
        succeed: tuple[str, ...] = ()

    loads = Loads()

    def recorder(name):
        def load(manifest, device, threads=None, **options):
            loads.append((name, device, {"threads": threads, **options}))
            if name not in loads.succeed:
                raise BackendUnavailable(f"{name} stand-in skips")
            return f"{name} on {device}"
        return load

    for name, module in MODULES.items():
        monkeypatch.setattr(module, "load", recorder(name))
    return loads


def test_auto_checks_every_option_before_loading(recorded_loads):
    with pytest.raises(InputError) as info:
        backends.resolve_backend("auto", NOWHERE, "cpu", cuda_graph=False)
    msg = str(info.value)
    assert msg.startswith("backend auto (tensorrt, onnxruntime, torch, openvino): unknown option "
                          "'cuda_graph' (did you mean 'cuda_graphs'?); valid options: ")
    for name, module in MODULES.items():
        assert f"{name}: {', '.join(sorted(module.OPTIONS))}" in msg
    assert recorded_loads == []


def test_auto_gives_each_backend_only_its_own_options(recorded_loads):
    recorded_loads.succeed = ("torch",)
    options = {"build": "never", "ort_tensorrt": True, "cuda_graphs": False, "profile": (1, 2, 4)}
    backend, fallbacks = backends.resolve_backend("auto", NOWHERE, "cuda", threads=3, **options)
    assert backend == "torch on cuda"
    assert recorded_loads == [
        ("tensorrt", "cuda", {"threads": 3, "build": "never", "cuda_graphs": False,
                              "profile": (1, 2, 4)}),
        ("onnxruntime", "cuda", {"threads": 3, "ort_tensorrt": True, "profile": (1, 2, 4)}),
        ("onnxruntime", "cpu", {"threads": 3, "ort_tensorrt": True, "profile": (1, 2, 4)}),
        ("torch", "cuda", {"threads": 3, "cuda_graphs": False, "profile": (1, 2, 4)}),
    ]
    assert [n for n, _ in fallbacks] == ["tensorrt (cuda)", "onnxruntime (cuda)",
                                         "onnxruntime (cpu)"]


def test_auto_on_cpu_accepts_the_options_of_every_backend(recorded_loads):
    """One options dict serves every machine: tensorrt's options are not an error on a CPU run,
    where the chain never reaches tensorrt."""
    recorded_loads.succeed = ("onnxruntime",)
    backend, _ = backends.resolve_backend("auto", NOWHERE, "cpu", build="never")
    assert backend == "onnxruntime on cpu"
    assert recorded_loads == [("onnxruntime", "cpu", {"threads": None})]


def test_a_named_backend_rejects_options_it_does_not_take(recorded_loads):
    with pytest.raises(InputError, match="backend onnxruntime: unknown option 'build'"):
        backends.resolve_backend("onnxruntime", NOWHERE, "cpu", build="never")
    assert recorded_loads == []


def test_engine_raises_for_an_unknown_option_and_auto_takes_others_options(vitb32_artifact):
    with pytest.raises(InputError, match="backend onnxruntime: unknown option 'cuda_graph'"):
        clipfast.Engine(vitb32_artifact, backend="onnxruntime",
                        backend_options={"cuda_graph": False})
    engine = clipfast.Engine(vitb32_artifact, backend="auto",
                             backend_options={"cuda_graphs": False, "build": "never"})
    assert engine.backend == "onnxruntime" and engine.fallbacks == []
