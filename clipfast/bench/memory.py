"""Peak memory of one bench row: the process's RSS high-water mark (resettable on Linux) and,
on CUDA, torch's allocator peak and the device's used memory."""

from __future__ import annotations

import gc
import sys


def _proc_status_kb(keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in keys:
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def current_rss_mb() -> float | None:
    """Resident set size of this process in MiB (None where it cannot be read)."""
    st = _proc_status_kb(("VmRSS",))
    if "VmRSS" in st:
        return st["VmRSS"] / 1024.0
    try:
        import psutil  # optional: only where /proc is missing

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS, Linux >= 4.0
    (``/proc/self/clear_refs`` value 5). False where that is not possible: then the peak is the
    process-lifetime maximum."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """RSS high-water mark in MiB: VmHWM (resettable), else ``getrusage`` (lifetime)."""
    st = _proc_status_kb(("VmHWM",))
    if "VmHWM" in st:
        return st["VmHWM"] / 1024.0
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS


class MemoryProbe:
    """Peak memory during one row. CPU: the process RSS high-water mark (native allocations of
    onnxruntime and torch included, which tracemalloc cannot see). CUDA: also
    ``torch.cuda.max_memory_allocated`` (the torch backend's tensors) and the device's used
    memory after the row (every allocator, onnxruntime's arena included)."""

    def __init__(self, device: str):
        self.device = device
        self.resettable = False
        self._before: float | None = None
        self._torch = None
        if device == "cuda":
            try:
                import torch

                if torch.cuda.is_available():
                    self._torch = torch
            except ImportError:
                pass

    def start(self) -> None:
        gc.collect()
        self.resettable = reset_peak_rss()
        self._before = current_rss_mb()
        if self._torch is not None:
            self._torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict[str, float | None]:
        peak = peak_rss_mb()
        out: dict[str, float | None] = {
            "peak_rss_mb": round(peak, 1),
            "rss_delta_mb": (round(max(peak - self._before, 0.0), 1)
                             if self._before is not None and self.resettable else None),
        }
        if self._torch is not None:
            cuda = self._torch.cuda
            free, total = cuda.mem_get_info()
            out["peak_gpu_mb"] = round(cuda.max_memory_allocated() / 2**20, 1)
            out["gpu_used_mb"] = round((total - free) / 2**20, 1)
        return out
