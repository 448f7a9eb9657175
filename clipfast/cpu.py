"""The host CPU: its instruction-set level and what that means for int8 arithmetic.

int8 results depend on the CPU. ONNX Runtime's u8 x s8 matrix multiply on x86 CPUs without VNNI
(AVX2, and AVX-512 without VNNI) uses ``vpmaddubsw``, which adds each pair of u8 x s8 products
into a saturating int16: with full-range weights a pair can reach 2 * 255 * 127 = 64770 and is
clipped to 32767. VNNI (``vpdpbusd``), AMX and aarch64's dot-product instructions accumulate in
int32 and never saturate. Weights limited to 7 bits (|w| <= 64) keep every pair within
2 * 255 * 64 = 32640, so such a graph gives the same integers on every CPU: the portable int8
format (``clipfast.export.quantize``).

Measured with ONNX Runtime's dynamic int8 ViT-B-32 image tower on an AVX2-only EPYC: centred
error 0.33 against the fp32 graph with full-range u8 x s8, 0.088 with 7-bit weights.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

# /proc/cpuinfo flags that decide int8 / fp16 kernels and speed, in the order of the levels below.
RELEVANT_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                  "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_int8", "amx_bf16")
# aarch64 /proc/cpuinfo "Features": dot product (sdot/udot), int8 matrix multiply (smmla), SVE.
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")
# x86 flags that give ONNX Runtime an int8 GEMM accumulating in int32 (no int16 saturation).
INT32_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    """What int8 arithmetic and benchmark tables need to know about a CPU.

    machine: ``platform.machine()`` ("x86_64", "aarch64", ...).
    model: the model name from /proc/cpuinfo (or the platform's processor string).
    flags: the relevant subset of the CPU's feature flags (RELEVANT_FLAGS / ARM_FLAGS).
    """

    machine: str
    model: str
    flags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def isa(self) -> str:
        """The level that names this CPU in results: "AMX", "AVX-512 VNNI", "AVX-VNNI",
        "AVX-512", "AVX2", "SSE", or on ARM "aarch64 (dotprod, i8mm)" etc."""
        f = set(self.flags)
        if self.machine in ("aarch64", "arm64"):
            extras = [n for n, flag in (("dotprod", "asimddp"), ("i8mm", "i8mm"), ("sve", "sve"))
                      if flag in f]
            return "aarch64" + (f" ({', '.join(extras)})" if extras else "")
        if "amx_int8" in f:
            return "AMX"
        if "avx512_vnni" in f:
            return "AVX-512 VNNI"
        if "avx_vnni" in f:
            return "AVX-VNNI"
        if "avx512f" in f:
            return "AVX-512"
        if "avx2" in f:
            return "AVX2"
        return "SSE" if self.machine in ("x86_64", "AMD64", "i686") else self.machine

    @property
    def is_x86(self) -> bool:
        return self.machine in ("x86_64", "AMD64", "i686", "i386")

    @property
    def int8_saturates(self) -> bool:
        """Whether ONNX Runtime's u8 x s8 int8 GEMM can saturate here (x86 without an int32 dot
        product instruction). Full-range int8 weights are then unsafe on this host."""
        return self.is_x86 and not any(flag in self.flags for flag in INT32_DOT_FLAGS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = list(self.flags)
        d["isa"] = self.isa
        d["int8_saturates"] = self.int8_saturates
        return d

    def describe(self) -> str:
        """One line for errors and tables: "AMD EPYC (x86_64, AVX2; flags avx2 fma)"."""
        return f"{self.model} ({self.machine}, {self.isa}; flags {' '.join(self.flags) or 'none'})"


def parse_cpuinfo(text: str, machine: str) -> CpuInfo:
    """A CpuInfo from the text of /proc/cpuinfo (x86 "flags", aarch64 "Features")."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not model and key in ("model name", "hardware", "cpu model"):
            model = value.strip()
        elif not flags and key in ("flags", "features"):
            flags = set(value.split())
    wanted = ARM_FLAGS if machine in ("aarch64", "arm64") else RELEVANT_FLAGS
    return CpuInfo(machine=machine, model=model or platform.processor() or machine,
                   flags=tuple(f for f in wanted if f in flags))


# numpy's CPUID feature names -> /proc/cpuinfo names. numpy asks the CPU itself (CPUID, or the
# auxiliary vector on ARM), so it also sees an emulated CPU (qemu -cpu MODEL) as the programs in
# this process see it, where /proc/cpuinfo still describes the physical one.
_NUMPY_FLAGS = {"SSE42": "sse4_2", "AVX": "avx", "AVX2": "avx2", "FMA3": "fma", "F16C": "f16c",
                "AVX512F": "avx512f", "AVX512BW": "avx512bw", "AVX512VL": "avx512vl",
                "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16",
                "AVX512FP16": "avx512_fp16", "ASIMD": "asimd", "ASIMDDP": "asimddp",
                "SVE": "sve"}


def _cpuid_flags() -> set[str] | None:
    """The flags numpy detected at import (CPUID), in /proc/cpuinfo names, or None."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return None
    return {name for key, name in _NUMPY_FLAGS.items() if features.get(key)}


def merge_flags(cpuinfo: CpuInfo, cpuid: set[str] | None) -> CpuInfo:
    """Combine /proc/cpuinfo with what CPUID says. CPUID wins on every flag it knows;
    the flags only /proc/cpuinfo lists (avx_vnni, amx_*) are kept only where both agree on the
    rest, i.e. /proc/cpuinfo describes the CPU this process runs on and not an emulator's host."""
    if cpuid is None:
        return cpuinfo
    known = set(_NUMPY_FLAGS.values())
    proc = set(cpuinfo.flags)
    agree = (proc & known) == (cpuid & set(RELEVANT_FLAGS + ARM_FLAGS)) or not proc
    flags = cpuid | ((proc - known) if agree else set())
    wanted = ARM_FLAGS if cpuinfo.machine in ("aarch64", "arm64") else RELEVANT_FLAGS
    return CpuInfo(machine=cpuinfo.machine, model=cpuinfo.model,
                   flags=tuple(f for f in wanted if f in flags))


@functools.lru_cache(maxsize=1)
def host_cpu() -> CpuInfo:
    """This machine's CpuInfo (read once): /proc/cpuinfo checked against CPUID."""
    machine = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_cpuinfo(f.read(), machine)
    except OSError:
        info = CpuInfo(machine=machine, model=platform.processor() or machine)
    return merge_flags(info, _cpuid_flags())
