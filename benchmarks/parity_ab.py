"""Held-out parity of a refactor: the Engine, `clipfast encode`, `clipfast embed` and the
serve API's answers of this checkout against a reference checkout, compared bit for bit.

    python benchmarks/parity_ab.py ARTIFACT --reference-python /tmp/ref-venv/bin/python

Each side runs in its own process (from outside both checkouts, so each imports its own
clipfast) and records: ``encode_images`` with good, broken and missing items (rows, indices,
failure messages; normalised and raw), ``preprocess`` pixels, ``encode_texts`` from empty to
past the context length, `clipfast encode` and `clipfast embed` over a folder with one broken
file (outputs, exit codes, messages), and the JSON bodies and statuses of a set of serve
requests, good and bad. Prints each array that differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import base64
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def capture(art: str, out: str) -> None:
    """One side's outputs into ``out`` (.npz)."""
    from PIL import Image
    from starlette.testclient import TestClient

    import clipfast
    from clipfast.embed.output import read_embeddings
    from clipfast.serve.app import create_app
    from clipfast.serve.config import ServeConfig

    imgs = sorted((HERE.parent / "examples" / "images").glob("*.jpg"))
    rgba = Image.new("RGBA", (50, 31), (10, 200, 30, 100))
    gray = (np.arange(40 * 70) % 251).astype(np.uint8).reshape(40, 70)
    items = [str(imgs[0]), imgs[1].read_bytes(), b"not an image", rgba, gray, str(imgs[2]),
             "/no/such.jpg"]
    texts = ["a photo of a cat", "", "dog " * 60, "une photo d'un chien", "x" * 5, "a diagram"]
    res: dict[str, np.ndarray] = {}
    eng = clipfast.Engine(art, backend="onnxruntime")
    r = eng.encode_images(items, errors="skip")
    res["img_emb"], res["img_idx"] = r.embeddings, np.asarray(r.indices)
    res["img_fail"] = np.asarray([f"{f.index}|{f.error}" for f in r.failures])
    res["img_raw"] = eng.encode_images(items, errors="skip", normalize=False).embeddings
    res["pix"] = eng.preprocess([str(p) for p in imgs])
    res["txt"] = eng.encode_texts(texts)
    res["txt_raw"] = eng.encode_texts(texts, normalize=False)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src = d / "src"
        src.mkdir()
        for p in imgs:
            (src / p.name).write_bytes(p.read_bytes())
        (src / "broken.jpg").write_bytes(b"garbage")
        exe = str(Path(sys.executable).parent / "clipfast")

        def cli(*argv: str) -> str:
            cp = subprocess.run([exe, *argv, "--backend", "onnxruntime", "--quiet"],
                                capture_output=True, text=True)
            msg = (cp.stdout + cp.stderr).replace(str(d), "TMP")
            return f"{cp.returncode}|" + re.sub(r"\(\d+\.\d+ s\)", "(T s)", msg)

        res["encode_msg"] = np.asarray([cli("encode", art, str(src), "--out", str(d / "e.npy")),
                                        (d / "e.json").read_text().replace(str(d), "TMP")])
        res["encode_emb"] = np.load(d / "e.npy")
        res["embed_msg"] = np.asarray([cli("embed", art, str(src), "--out", str(d / "emb"))])
        e = read_embeddings(d / "emb")
        res["embed_keys"] = np.asarray([k.replace(str(src), "SRC") for k in e.keys])
        res["embed_emb"] = e.embeddings
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in imgs]
    model = Path(art).name
    requests = [
        ("/v1/embeddings", {"input": texts[:4], "model": model}),
        ("/v1/embeddings", {"input": "single text", "model": model, "encoding_format": "base64"}),
        ("/v1/embeddings", {"input": ["ok", "x" * 20000], "model": model}),
        ("/v1/embeddings", {"input": 5, "model": model}),
        ("/v1/embeddings", {"input": "x", "model": "wrong"}),
        ("/v1/embeddings", {"input": b64[:2] + ["@@"], "model": model, "modality": "image"}),
        ("/v1/images/embeddings", {"input": b64 + ["@@bad@@", base64.b64encode(b"no").decode()]}),
        ("/v1/classify", {"input": b64[:2], "labels": ["cat", "dog"], "template": "a {} here"}),
        ("/v1/classify", {"input": b64[:1], "labels": []}),
        ("/v1/nothing", {}),
    ]
    with TestClient(create_app(eng, ServeConfig())) as c:
        models = c.get("/v1/models").text
        res["serve_models"] = np.asarray([re.sub(r'"created":\d+', "C", models)])
        for i, (path, body) in enumerate(requests):
            rr = c.post(path, json=body)
            res[f"serve_{i}"] = np.asarray([str(rr.status_code), rr.text])
    np.savez(out, **res)


def compare(a_path: str, b_path: str) -> list[str]:
    a, b = np.load(a_path), np.load(b_path)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            diffs.append(f"{k}: only in {'this' if k in a else 'reference'}")
        elif a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or \
                a[k].tobytes() != b[k].tobytes():
            diffs.append(f"{k}: differs ({a[k].shape} {a[k].dtype} vs {b[k].shape} {b[k].dtype})")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--reference-python", required=True)
    ap.add_argument("--capture", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.capture:
        capture(args.artifact, args.capture)
        return 0
    with tempfile.TemporaryDirectory() as d:
        files = {}
        for side, py in (("this", sys.executable), ("reference", args.reference_python)):
            files[side] = f"{d}/{side}.npz"
            subprocess.run([py, str(Path(__file__).resolve()), args.artifact,
                            "--reference-python", args.reference_python,
                            "--capture", files[side]], check=True, cwd="/")
        diffs = compare(files["this"], files["reference"])
        n = len(np.load(files["this"]).files)
    print("\n".join(diffs) if diffs else f"bitwise identical: {n} recorded outputs")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
