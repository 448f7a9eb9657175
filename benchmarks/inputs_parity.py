"""Bitwise parity of the image front doors between two trees: ``Engine.encode_images`` (paths,
in-memory items, errors raise / skip), ``Engine.preprocess``, ``clipfast encode`` (its .npy and
row index, exit code, messages) and ``clipfast embed`` (exact and --fast-decode: keys, rows,
failures table, recorded fidelity but its seconds).

    PYTHONPATH=/path/to/reference python benchmarks/inputs_parity.py record WORK ART ref
    python benchmarks/inputs_parity.py record WORK ART new
    python benchmarks/inputs_parity.py compare WORK ref new

WORK: a scratch folder (the test images are generated there once, with nested folders, hidden
files, EXIF rotation, alpha, palette, gray, progressive JPEG, a file without suffix, a broken
and a missing one). ART: any artifact (e.g. a small random-weight export). Run it from a folder
outside both trees, so PYTHONPATH (not the working directory) picks the clipfast under test.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _images(imgs: Path) -> None:
    rng = np.random.default_rng(0)
    (imgs / "sub" / "deeper").mkdir(parents=True)
    (imgs / ".hidden").mkdir()

    def photo(h, w, mode="RGB"):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a = (a.astype(np.float32) * 0.3 + np.linspace(0, 170, w)[None, :, None]).astype(np.uint8)
        im = Image.fromarray(a)
        return im.convert(mode) if mode != "RGB" else im

    photo(120, 90).save(imgs / "a.jpg", quality=90)
    photo(64, 200).save(imgs / "a-b.png")
    photo(300, 301, "L").save(imgs / "gray.jpeg")
    photo(50, 70, "RGBA").save(imgs / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(80, 40).save(imgs / "rot.jpg", exif=exif)
    photo(33, 17).save(imgs / "sub" / "x.webp")
    photo(400, 260).save(imgs / "sub" / "deeper" / "big.jpg", quality=80)
    photo(31, 31).save(imgs / "noext", "JPEG")
    photo(20, 20).save(imgs / ".hidden" / "h.jpg")
    photo(20, 20).save(imgs / ".h.jpg")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (imgs / "notes.txt").write_text("hello")
    photo(640, 480).save(imgs / "sub" / "p.jpg", progressive=True)
    photo(48, 48, "P").save(imgs / "z_pal.gif")


def record(root: Path, art: Path, tag: str) -> None:
    import pyarrow.parquet as pq

    import clipfast
    from clipfast.embed.job import EmbedOptions, run_embed

    os.environ["CLIPFAST_AUTO_TUNE"] = "0"
    print("clipfast from", clipfast.__file__)
    imgs = root / "imgs"
    if not imgs.exists():
        _images(imgs)
    out = root / tag
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    eng = clipfast.Engine(art, backend="onnxruntime", batch_size=4)
    paths = sorted(str(p) for p in imgs.rglob("*")
                   if p.is_file() and not p.relative_to(imgs).parts[0].startswith("."))
    paths.append(str(imgs / "missing.jpg"))
    r = eng.encode_images(paths, errors="skip")
    res["engine_paths"] = (r.embeddings, r.indices, [(f.index, f.item, f.error)
                                                     for f in r.failures])
    mem = [Image.open(paths[0]), np.asarray(Image.open(paths[1]).convert("RGB")),
           Path(paths[2]).read_bytes(), b"junk"]
    r = eng.encode_images(mem, errors="skip", normalize=False)
    res["engine_mem"] = (r.embeddings, r.indices, [(f.index, f.item, f.error)
                                                   for f in r.failures])
    good = [p for p in paths if not any(b in p for b in ("broken", "notes", "missing"))]
    res["engine_raise"] = eng.encode_images(good)
    res["preprocess"] = eng.preprocess(good[:5])
    p = subprocess.run([sys.executable, "-m", "clipfast.cli", "encode", str(art), str(imgs),
                        "--out", str(out / "enc.npy"), "--backend", "onnxruntime",
                        "--batch-size", "4", "--quiet"], capture_output=True, text=True,
                       cwd=str(root))
    doc = json.loads((out / "enc.json").read_text())
    doc.pop("sha256", None)
    res["cli_encode"] = (np.load(out / "enc.npy"), doc, p.returncode, p.stdout, p.stderr)
    for fast in (False, True):
        d = out / f"emb{int(fast)}"
        run_embed(EmbedOptions(str(art), [str(imgs)], str(d), batch_size=4, shard_size=8,
                               progress=False, backend="onnxruntime", fast_decode=fast,
                               workers=2))
        e = clipfast.read_embeddings(d)
        man = json.loads((d / "manifest.json").read_text())
        ftab = [pq.read_table(f).to_pylist() for f in sorted(d.rglob("*.parquet"))
                if "fail" in f.name]
        res[f"embed{int(fast)}"] = (list(e.keys), np.asarray(e.embeddings),
                                    man.get("fast_decode_fidelity"), man.get("counts"), ftab)
    with open(out / "res.pkl", "wb") as f:
        pickle.dump(res, f)
    print("recorded", sorted(res))


def _norm(x, tag):
    if isinstance(x, dict):
        return {k: _norm(v, tag) for k, v in x.items() if k != "seconds"}
    if isinstance(x, (list, tuple)):
        return type(x)(_norm(v, tag) for v in x)
    if isinstance(x, str):
        return x.replace(f"/{tag}/", "/TAG/")
    return x


def _eq(x, y) -> bool:
    if isinstance(x, np.ndarray):
        return (isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape
                and x.tobytes() == y.tobytes())
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_eq(u, v) for u, v in zip(x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_eq(x[k], y[k]) for k in x)
    return x == y


def compare(root: Path, a_tag: str, b_tag: str) -> int:
    with open(root / a_tag / "res.pkl", "rb") as f:
        a = pickle.load(f)
    with open(root / b_tag / "res.pkl", "rb") as f:
        b = pickle.load(f)
    bad = 0
    for k in a:
        same = _eq(_norm(a[k], a_tag), _norm(b[k], b_tag))
        print(f"{k}: {'bitwise identical' if same else 'DIFFERENT'}")
        bad += not same
    return 1 if bad else 0


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "record":
        record(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
        return 0
    if len(sys.argv) == 5 and sys.argv[1] == "compare":
        return compare(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
