"""Every ``CLIPFAST_*`` environment variable, declared once: its type, default and meaning.

clipfast reads them through this module only, and at call time (never at import), so a test can
set or delete a variable in ``os.environ`` and the next read sees it::

    from clipfast import settings

    settings.CLIPFAST_CACHE_DIR                     # the parsed value (here a Path)
    settings.value("CLIPFAST_TORCH_ATTENTION", {"CLIPFAST_TORCH_ATTENTION": "sdpa"})
    settings.assignment("CLIPFAST_DISABLE_KERNELS")  # "CLIPFAST_DISABLE_KERNELS=1", for messages

An unset or blank variable has its default. A value that cannot be parsed raises InputError
naming the variable, its value and what it accepts.

``scope`` says who reads a variable: "runtime" (the clipfast package), "tests" (the test suite)
or "benchmarks" (the benchmark suite, ``benchmarks/``). The last two are declared here so that
this list is the complete one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfast.errors import InputError

ATTENTION_MODES = ("auto", "sdpa", "kernel")


@dataclass(frozen=True)
class Setting:
    """One environment variable. ``parse(name, text)`` turns a non-blank value into the typed
    one; ``default`` is the value when unset or blank (a zero-argument callable is called at
    read time, so a default that depends on the home directory is computed then)."""

    name: str
    type: str
    default: Any
    doc: str
    parse: Callable[[str, str], Any]
    scope: str = "runtime"
    default_text: str | None = None

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def describe_default(self) -> str:
        return self.default_text if self.default_text is not None else repr(self.default)


def _path(name: str, text: str) -> Path:
    return Path(text.strip()).expanduser()


def _flag(name: str, text: str) -> bool:
    """Set: any value but "0" (what the kernel loader has always accepted)."""
    return text.strip() != "0"


def _one(name: str, text: str) -> bool:
    return text.strip() == "1"


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, text: str) -> str:
        got = text.strip().lower()
        if got not in choices:
            raise InputError(f"{name}={text!r}: expected one of {', '.join(choices)} "
                             "(or unset)")
        return got
    return parse


def _text(name: str, text: str) -> str:
    return text.strip()


def _default_cache_root() -> Path:
    return Path.home() / ".cache" / "clipfast"


def _default_bench_cache() -> Path:
    return Path.home() / ".cache" / "clipfast" / "bench"


_DECLARED = (
    Setting(
        "CLIPFAST_CACHE_DIR", "path", _default_cache_root,
        "Root of the caches kept outside an artifact whose directory is not writable "
        "(TensorRT engines, ONNX Runtime's TensorRT provider caches): "
        "<root>/<artifact digest>/<purpose>. A writable artifact keeps them inside, "
        "in <artifact>/<purpose> (clipfast.artifact.cache).",
        _path, default_text="~/.cache/clipfast"),
    Setting(
        "CLIPFAST_DISABLE_KERNELS", "flag", False,
        "Any value but 0 turns the CUDA kernel library (csrc/) off: GPU preprocessing and the "
        "torch backend's attention kernel then use their reference paths.",
        _flag),
    Setting(
        "CLIPFAST_KERNELS_LIB", "path", None,
        "The kernel library file (libclipfast_kernels.so) to load instead of searching the "
        "package folder and build/ of a source checkout.",
        _path),
    Setting(
        "CLIPFAST_TORCH_ATTENTION", "auto | sdpa | kernel", None,
        "Overrides the torch backend's attention option: sdpa (PyTorch's attention), kernel "
        "(the csrc fused kernel) or auto (the kernel when its self-check passes).",
        _choice(ATTENTION_MODES)),
    Setting(
        "CLIPFAST_API_KEY", "text", None,
        "The key `clipfast serve` requires (Authorization: Bearer KEY) on /v1/* and /metrics "
        "when --api-key is not given; unset: no key.",
        _text),
    Setting(
        "CLIPFAST_ALLOW_PRECISIONS", "comma list (bf16)", "",
        "Precisions below the artifact's that backend auto may choose on the CPU when measured "
        "faster (bf16: OpenVINO on AVX512_BF16 / AMX CPUs); the Engine's allow_precisions "
        "overrides it. Unset: none, the artifact's precision is never lowered.",
        _text),
    Setting(
        "CLIPFAST_AUTO_TUNE", "flag", True,
        "0 turns the measurement of backend auto on the CPU off: it then takes the first of "
        "onnxruntime, openvino, torch that loads and passes its gates (the same path on every "
        "host, e.g. for bit-identical results across machines).",
        _flag),
    Setting(
        "CLIPFAST_REQUIRE_QEMU", "flag (1)", False,
        "1: the int8 tests that emulate an AVX2-only CPU fail without qemu-x86_64 instead of "
        "skipping (CI sets it).",
        _one, scope="tests"),
    Setting(
        "CLIPFAST_REQUIRE_BROWSER", "flag (1)", False,
        "1: the search page's browser test fails without Chromium instead of skipping (also "
        "when CI=true).",
        _one, scope="tests"),
    Setting(
        "CLIPFAST_BENCH_ARTIFACT", "path", None,
        "The artifact the benchmark suite times; unset: a ViT-B-32 export with random weights, "
        "made once in CLIPFAST_BENCH_CACHE.",
        _path, scope="benchmarks"),
    Setting(
        "CLIPFAST_BENCH_CACHE", "path", _default_bench_cache,
        "Where the benchmark suite keeps the artifact it exports.",
        _path, scope="benchmarks", default_text="~/.cache/clipfast/bench"),
    Setting(
        "CLIPFAST_BENCH_DEVICE", "cpu | cuda", "cpu",
        "The device the benchmark suite runs the towers on.",
        _text, scope="benchmarks"),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in _DECLARED}


def _setting(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise KeyError(f"{name} is not a declared clipfast setting (clipfast/settings.py "
                       f"declares {', '.join(SETTINGS)})") from None


def raw(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable's text as set (None when unset or blank)."""
    _setting(name)
    text = (os.environ if environ is None else environ).get(name)
    return text if text is not None and text.strip() else None


def value(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The variable's parsed value from ``environ`` (default: ``os.environ``, read now)."""
    setting = _setting(name)
    text = raw(name, environ)
    if text is None:
        return setting.default_value()
    return setting.parse(name, text)


def assignment(name: str, environ: Mapping[str, str] | None = None) -> str:
    """``NAME=value`` as set, for messages that say where a choice came from."""
    return f"{name}={raw(name, environ) or ''}"


def __getattr__(name: str) -> Any:
    """``settings.CLIPFAST_X``: the variable's value, read from ``os.environ`` now."""
    if name in SETTINGS:
        return value(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *SETTINGS])


__all__ = ["ATTENTION_MODES", "SETTINGS", "Setting", "assignment", "raw", "value"]
