"""An int8 artifact on an AVX2-only CPU, emulated: its self-check and its embeddings of real
photos against the PyTorch source.

ONNX Runtime picks its int8 kernels by CPUID, so ``qemu-x86_64 -cpu EPYC-Rome`` (AVX2 and FMA, no
AVX-512, no VNNI) makes it run the kernels an AVX2-only EPYC runs, on any x86 host. Emulation
says nothing about speed; it shows which integers come out.

    python benchmarks/int8_emulated_avx2.py ARTIFACT [--images DIR] [--out results.json]
    python benchmarks/int8_emulated_avx2.py ARTIFACT --export MODEL [--pretrained TAG]

``--export`` first runs ``clipfast export MODEL --precision int8 --out ARTIFACT`` itself under
the emulated CPU (torch included: the guard's measurements then use the AVX2 kernels), then
checks the result as above.

Needs qemu-user (``apt-get install qemu-user``) and the export extras (the PyTorch reference runs
natively). Writes a JSON record and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

QEMU_CPU = "EPYC-Rome"
CAPTIONS = ("an astronaut in a white suit", "a cat lying down", "a cup of coffee",
            "a rocket on a launch pad", "a man with a camera", "a bowl of soup",
            "a diagram of a bridge", "two dogs playing in the snow", "a red car on a street",
            "a city at night")

_CHILD = """
import json, sys
import numpy as np
import clipfast
from clipfast.cpu import host_cpu
art, images, texts, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
engine = clipfast.Engine(art, backend="onnxruntime")
img = engine.encode_images(images)
txt = engine.encode_texts(texts)
np.savez(out, img=img, txt=txt)
print(json.dumps({"cpu": host_cpu().to_dict(), "self_check": engine.self_check_figures,
                  "int8": engine.describe().get("int8")}))
"""


def _photos(directory: Path | None) -> list[str]:
    from clipfast.export.verify import images_from_dir

    root = directory or Path(__file__).resolve().parents[1] / "examples" / "images"
    return [str(p) for p in images_from_dir(root)]


def _report(manifest, tower: str) -> dict:
    """The quantizer's report of ``tower`` in an int8 artifact, or {}."""
    quantization = manifest.spec.quantization
    return (quantization.report(tower) if quantization else None) or {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--images", type=Path, default=None,
                    help="photos to embed (default: examples/images)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    ap.add_argument("--export", metavar="MODEL", default=None,
                    help="export MODEL to ARTIFACT (int8) under the emulated CPU first")
    ap.add_argument("--pretrained", default="none", help="with --export (default: none)")
    args = ap.parse_args(argv)
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("qemu-x86_64 not found: apt-get install qemu-user")
    export_seconds = None
    if args.export:
        import time

        t0 = time.perf_counter()
        cmd = [qemu, "-cpu", QEMU_CPU, os.path.realpath(sys.executable), "-m", "clipfast.cli",
               "export", "--model", args.export, "--precision", "int8", "--out",
               str(args.artifact), "--overwrite", "--quiet"]
        if not args.export.startswith(("transformers:", "hf-hub:")):
            cmd += ["--pretrained", args.pretrained]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"emulated export failed:\n{done.stderr[-4000:]}")
        export_seconds = round(time.perf_counter() - t0, 1)

    import clipfast
    from clipfast.artifact.fidelity import (
        centred_relative_error,
        cosine,
        l2_normalize,
        top1_agreement,
    )
    from clipfast.artifact.manifest import load_manifest
    from clipfast.export.sources import load_source_from_spec
    from clipfast.inputs.preprocess import load_image

    images = _photos(args.images)
    manifest = load_manifest(args.artifact)
    source = load_source_from_spec(manifest.spec.source)
    import torch

    with torch.inference_mode():
        pixels = torch.stack([torch.as_tensor(np.asarray(
            source.reference_transform(load_image(p)), dtype=np.float32)) for p in images])
        ref_img = l2_normalize(source.image_tower(pixels).float().numpy())
        tokens = source.reference_tokenize(list(CAPTIONS))
        ref_txt = l2_normalize(source.text_tower(*[torch.as_tensor(np.asarray(tokens[k]))
                                                   for k in source.text_inputs]).float().numpy())
    env = {**os.environ, "PYTHONPATH": str(Path(clipfast.__file__).parents[1])}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "emb.npz"
        done = subprocess.run(
            [qemu, "-cpu", QEMU_CPU, os.path.realpath(sys.executable), "-c", _CHILD,
             str(args.artifact), json.dumps(images), json.dumps(list(CAPTIONS)), str(out)],
            env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"emulated run failed:\n{done.stderr[-4000:]}")
        child = json.loads(done.stdout.strip().splitlines()[-1])
        with np.load(out) as z:
            img, txt = z["img"], z["txt"]
    record = {
        "artifact": str(args.artifact), "precision": manifest.spec.precision,
        "int8_format": {t: _report(manifest, t).get("int8_format")
                        for t in ("image", "text")},
        "exported_on": manifest.spec.exported_on, "emulated_cpu": QEMU_CPU,
        "run_on": child["cpu"], "int8_kernels": child["int8"],
        "self_check": child["self_check"], "photos": [Path(p).name for p in images],
        "image_centred_rel_error": float(centred_relative_error(img, ref_img).max()),
        "image_cosine": float(cosine(img, ref_img).min()),
        "text_centred_rel_error": float(centred_relative_error(txt, ref_txt).max()),
        "text_cosine": float(cosine(txt, ref_txt).min()),
        "top1_agreement": top1_agreement(img, txt, ref_img, ref_txt),
        "gates": manifest.spec.gates.as_dict(),
        "exported_under_emulation": bool(args.export), "export_seconds": export_seconds,
        "int8_attempts": {t: len(_report(manifest, t).get("attempts", []))
                          for t in ("image", "text")},
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    sc = record["self_check"] or {}
    print(f"| artifact | run on | self-check (image / text centred error) | photos | image err | "
          f"image cos | text err | top-1 |\n|---|---|---|---:|---:|---:|---:|---:|\n"
          f"| {Path(args.artifact).name} ({manifest.spec.precision}) | {child['cpu']['isa']} "
          f"(qemu {QEMU_CPU}) | {'passed' if sc.get('passed') else 'FAILED'} "
          f"({sc.get('image_centred_rel_error', float('nan')):.4f} / "
          f"{sc.get('text_centred_rel_error', float('nan')):.4f}) | {len(images)} | "
          f"{record['image_centred_rel_error']:.4f} | {record['image_cosine']:.5f} | "
          f"{record['text_centred_rel_error']:.4f} | {record['top1_agreement']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
