"""Export as stages with a gate: load -> ONNX per tower -> tokenizer -> manifest -> measure."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import clipfast
from clipfast.errors import ExportError, FidelityError
from clipfast.fidelity import GATES, check_gates
from clipfast.manifest import write_manifest

log = logging.getLogger("clipfast.export")

PRECISIONS = ("fp32", "fp16", "int8")
SUPPORTED_PRECISIONS = ("fp32",)
IMAGE_FILE = "image.onnx"
TEXT_FILE = "text.onnx"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class ExportOptions:
    """Everything an export needs; the CLI fills it from its flags."""

    model: str
    out: Path
    pretrained: str | None = None
    precision: str = "fp32"
    opset: int = 17
    seed: int = 0
    images: Path | None = None
    overwrite: bool = False
    gate: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision {self.precision!r}: expected one of {PRECISIONS}")
        if self.precision not in SUPPORTED_PRECISIONS:
            raise ExportError(
                f"--precision {self.precision} is not available in clipfast "
                f"{clipfast.__version__} yet: only {', '.join(SUPPORTED_PRECISIONS)} exports "
                "are built; export fp32 for now"
            )
        if self.opset < 17:
            raise ExportError(f"--opset {self.opset}: 17 or newer is required "
                              "(LayerNormalization)")
        out = Path(self.out)
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise ExportError(f"--out {str(out)!r} exists and is not empty; pass --overwrite "
                              "to replace it")


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


def run_export(options: ExportOptions) -> Path:
    """Export ``options.model`` into ``options.out``; return the artifact directory.

    The artifact is assembled in a temporary directory beside ``out`` and moved into place only
    after it passes the fidelity gate, so a failed export never leaves a half-written artifact
    (or destroys the previous one).
    """
    options.validate()
    from clipfast.export.onnx_export import export_image_tower, export_text_tower
    from clipfast.export.sources import load_source
    from clipfast.export.verify import images_from_dir, measure

    out = Path(options.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    stages = _Stages(["load source", "export image tower", "export text tower",
                      "write tokenizer + manifest", "measure fidelity"], options.progress)
    try:
        stages.start("load source")
        source = load_source(options.model, options.pretrained, seed=options.seed)
        stages.start("export image tower")
        export_image_tower(source, work / IMAGE_FILE, options.opset)
        stages.start("export text tower")
        export_text_tower(source, work / TEXT_FILE, options.opset)
        stages.start("write tokenizer + manifest")
        (work / TOKENIZER_FILE).write_text(source.tokenizer_json)
        gates = GATES[options.precision]
        data: dict[str, Any] = {
            "clipfast_version": clipfast.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source.spec,
            "family": source.family,
            "architecture": source.architecture,
            "random_weights": source.random_weights,
            "embed_dim": source.embed_dim,
            "precision": options.precision,
            "opset": options.opset,
            "image": {"file": IMAGE_FILE, "input": "pixel_values", "output": "image_embeds",
                      "shape": [3, *source.preprocess.image_size], "dtype": "float32"},
            "text": {"file": TEXT_FILE, "inputs": list(source.text_inputs),
                     "output": "text_embeds", "dtype": "int32"},
            "preprocess": source.preprocess.to_dict(),
            "tokenizer": source.tokenizer.to_dict(),
            "logits": source.logits.to_dict(),
            "gates": gates,
            "fidelity": None,
        }
        files = [IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE]
        write_manifest(work, data, files)
        stages.start("measure fidelity")
        images = images_from_dir(options.images) if options.images else None
        engine = clipfast.Engine(work, backend="onnxruntime")
        figures = measure(source, engine, images=[str(p) for p in images] if images else None)
        failures = check_gates(figures, gates)
        stages.close()
        figures["passed"] = not failures
        data["fidelity"] = figures
        data["export_seconds"] = round(time.perf_counter() - stages.t0, 2)
        data["stage_seconds"] = stages.times
        write_manifest(work, data, files)
        if failures and options.gate:
            raise FidelityError(
                f"{options.model} {options.precision}: fidelity below the gate, artifact not "
                f"written to {out} (kept for inspection in {work}): " + "; ".join(failures)
            )
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        return out
    except BaseException as e:
        stages.close()
        if not isinstance(e, FidelityError):
            shutil.rmtree(work, ignore_errors=True)
        raise
