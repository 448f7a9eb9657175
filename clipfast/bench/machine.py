"""Facts about the measuring machine for the results document: CPU model and instruction-set
level, cores, memory, library versions, load average."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from clipfast import cpu as cpu_facts


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, instruction-set level (``isa``: int8 kernels, speed and even int8 fidelity
    depend on it) and feature flags, cores, memory and library versions (and the GPU on
    CUDA)."""
    import numpy as np

    host = cpu_facts.host_cpu()
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": host.model, "arch": host.machine, "isa": host.isa,
                            "cpu_features": list(host.flags),
                            "int8_saturates": host.int8_saturates, "cores": os.cpu_count()}
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages * page / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    import clipfast

    versions = {"clipfast": clipfast.__version__, "numpy": np.__version__}
    try:
        import onnxruntime as ort

        versions["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    for mod in ("torch", "open_clip", "transformers", "tensorrt"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    info["versions"] = versions
    if device == "cuda" and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_isa(machine: dict[str, Any]) -> str | None:
    """The ISA level of a results document's ``machine``: its ``isa``, or for documents written
    before that was recorded, the level its ``cpu_features`` flags give (None without flags)."""
    if machine.get("isa"):
        return machine["isa"]
    flags = machine.get("cpu_features")
    if not flags:
        return None
    arch = machine.get("arch") or next(
        (a for a in ("x86_64", "aarch64", "arm64", "AMD64") if a in machine.get("platform", "")),
        "x86_64" if {"avx2", "avx512f", "fma"} & set(flags) else "")
    return cpu_facts.CpuInfo(machine=arch, model=machine.get("cpu", ""), flags=tuple(flags)).isa


def machine_line(machine: dict[str, Any]) -> str:
    """``CPU: Intel Xeon, AVX-512 VNNI, 2 cores``: the CPU a results document was measured on
    ("ISA not recorded" for documents without CPU flags)."""
    return (f"CPU: {machine.get('cpu')}, {machine_isa(machine) or 'ISA not recorded'}, "
            f"{machine.get('cores')} cores")
