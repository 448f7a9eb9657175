"""The ``clipfast`` command line: export a model to an artifact, check and describe artifacts,
embed images and texts, and serve them. ``clipfast COMMAND --help`` documents each command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipfast.errors import ClipfastError
from clipfast.types import plural


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from clipfast.export.pipeline import ExportOptions, run_export
    except ImportError as e:
        raise ClipfastError(
            f"`clipfast export` needs the export extras: pip install 'clipfast[export]' ({e})"
        ) from e
    options = ExportOptions(
        model=args.model, pretrained=args.pretrained, precision=args.precision, out=Path(args.out),
        io=args.io, opset=args.opset, seed=args.seed,
        images=Path(args.images) if args.images else None,
        calibration_images=Path(args.calibration_images) if args.calibration_images else None,
        fuse=not args.no_fuse, int8_method=args.int8_method, int8_format=args.int8_format,
        overwrite=args.overwrite,
        gate=not args.no_gate,
        progress=not args.quiet,
        tensorrt=args.tensorrt, batch_profile=_batch_profile(args, args.tensorrt),
    )
    out = run_export(options)
    _print_info(out)
    return 0


def _batch_profile(args: argparse.Namespace, wanted: bool):
    """The BatchProfile of --min-batch/--opt-batch/--max-batch (defaults for the ones not given),
    None when none is given and none is ``wanted``."""
    from clipfast.backends.batching import BatchProfile

    given = {k: getattr(args, f"{k}_batch") for k in ("min", "opt", "max")}
    if all(v is None for v in given.values()) and not wanted:
        return None
    if not wanted:
        raise ClipfastError("--min-batch/--opt-batch/--max-batch only apply with --tensorrt")
    default = BatchProfile()
    return BatchProfile(**{k: default.as_dict()[k] if v is None else v
                           for k, v in given.items()})


def _cmd_build_engines(args: argparse.Namespace) -> int:
    from clipfast.artifact.manifest import load_manifest
    from clipfast.backends.tensorrt.build import build_engines, unavailable_reason

    load_manifest(args.artifact)  # a bad artifact is reported before anything about the GPU
    reason = unavailable_reason()
    if reason:
        raise ClipfastError(f"cannot build TensorRT engines here: {reason}")
    section = build_engines(args.artifact, _batch_profile(args, True), cache_dir=args.cache_dir,
                            rebuild=args.rebuild, progress=not args.quiet)
    print(f"TensorRT engines for {args.artifact} (profile {section['profile']}) in "
          f"{section['cache']}:")
    for tower, entry in section["engines"].items():
        print(f"  {tower:6s} {entry['key']}")
    return 0


def _add_profile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-batch", type=int, default=None, metavar="N",
                   help="smallest batch of the TensorRT optimization profile (default 1)")
    p.add_argument("--opt-batch", type=int, default=None, metavar="N",
                   help="batch TensorRT tunes for (default 64)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="largest batch one engine call takes; bigger requests are chunked "
                        "(default 256)")


class _Stages:
    """One line per stage on stderr with the seconds since the start, so that a slow step (the
    PyTorch source loads and runs for tens of seconds) is named while it runs; stdout keeps
    the report."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, what: str, end: str = " ...") -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:5.1f} s] {what}{end}", file=sys.stderr,
                  flush=True)

    def done(self) -> None:
        self("done", end="")


def _cmd_verify(args: argparse.Namespace) -> int:
    """The golden self-check (numpy and the runtime only), then, where the export extras are
    installed, the full comparison against the PyTorch source."""
    import clipfast
    from clipfast.artifact.fidelity import check_gates
    from clipfast.errors import FidelityError

    stage = _Stages(enabled=not args.quiet)
    stage("loading the artifact")
    engine = clipfast.Engine(args.artifact, backend=args.backend, device=args.device,
                             self_check=False)
    print(f"clipfast verify {args.artifact} (backend {engine.backend} on "
          f"{engine.backend_device}, precision {engine.manifest.spec.precision})")
    from clipfast.cpu import host_cpu

    print(f"  host CPU: {host_cpu().describe()}")
    exported_on = engine.manifest.spec.exported_on
    if isinstance(exported_on, dict):
        print(f"  exported on: {exported_on.get('model')} ({exported_on.get('isa')})")
    failed = False
    print("self-check against the golden outputs stored at export:")
    stage("running the golden self-check")
    try:
        golden = engine.check_golden()
    except FidelityError as e:
        golden, failed = getattr(e, "figures", None), True
        print(f"  FAILED: {e}")
    if golden is None and not failed:
        print("  none: the artifact has no golden outputs (re-export it with this clipfast)")
    for key, value in (golden or {}).items():
        print(f"  {key:32s} {value}")
    try:
        from clipfast.export.sources import load_source_from_spec
        from clipfast.export.verify import images_from_dir, measure
    except ImportError as e:
        if args.images:
            raise ClipfastError(f"--images compares against the PyTorch source, which needs the "
                                f"export extras: pip install 'clipfast[export]' ({e})") from e
        print(f"comparison against the PyTorch source skipped: {e} (pip install "
              "'clipfast[export]' for it)")
        return 1 if failed else 0
    images = [str(p) for p in images_from_dir(args.images)] if args.images else None
    stage(f"loading the PyTorch source {engine.manifest.spec.source.get('model')}")
    source = load_source_from_spec(engine.manifest.spec.source)
    stage("measuring the artifact against the source on "
          + (plural(len(images), "image") if images else "the built-in images"))
    figures = measure(source, engine, images=images)
    stage.done()
    gates = engine.manifest.spec.gates.as_dict()
    failures = check_gates(figures, gates)
    print("against the PyTorch source:")
    for key, value in figures.items():
        print(f"  {key:32s} {value}")
    if failures:
        print("FAILED gates:\n  " + "\n  ".join(failures))
        return 1
    print(f"all {plural(len(gates), 'gate')} passed"
          + ("; the self-check FAILED" if failed else ""))
    return 1 if failed else 0


def _print_info(directory: str | Path) -> None:
    from clipfast.artifact.manifest import load_manifest

    m = load_manifest(directory, verify_checksums=False)
    d = m.spec.to_dict()
    size = sum(f["bytes"] for f in d["files"].values())
    print(f"artifact   {m.directory}")
    src = d["source"]
    print(f"source     {src.get('model')} (pretrained: {src.get('pretrained', '-')})"
          + ("  [RANDOM WEIGHTS]" if d.get("random_weights") else ""))
    print(f"family     {d['family']}   precision {d['precision']}   embed_dim {d['embed_dim']}")
    pp = d["preprocess"]
    print(f"preprocess {json.dumps(pp)}")
    print(f"tokenizer  {json.dumps(d['tokenizer'])}")
    print(f"logits     {json.dumps(d['logits'])}")
    for name, f in d["files"].items():
        print(f"file       {name:16s} {f['bytes'] / 2**20:9.1f} MiB  sha256 {f['sha256'][:16]}")
    print(f"total      {size / 2**20:.1f} MiB")
    if d.get("export_seconds") is not None:
        print(f"export     {d['export_seconds']} s")
    if d.get("fidelity"):
        print("fidelity   " + json.dumps(d["fidelity"]))


def _cmd_info(args: argparse.Namespace) -> int:
    _print_info(args.artifact)
    return 0


def _expand_images(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image paths to embed and ``(path, reason)`` for each file of a directory left out:
    files named on the command line are taken as given (a missing or broken one becomes that
    input's failure), directories are listed as ``clipfast embed`` lists them
    (``clipfast.inputs.listing``: recursive, sorted, hidden entries and links to directories
    left out, files without an image suffix taken when Pillow recognises their content)."""
    from clipfast.inputs.listing import expand_images

    return expand_images(inputs)


def output_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """The embeddings file and its row index for ``--out``: ``X.npy`` gives ``X.npy`` and
    ``X.json``; any other name ``X`` (``emb.v2``, ``plain``) gives ``X.npy`` and ``X.json``."""
    p = Path(out)
    if p.suffix.lower() == ".npy" and p.stem:
        stem = p.name[: -len(p.suffix)]
        return p, p.with_name(stem + ".json")
    return p.with_name(p.name + ".npy"), p.with_name(p.name + ".json")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # what a plain open() would have given
    return Path(name)


def _write_outputs(npy: Path, index: Path, embeddings, record: dict) -> None:
    """Write the embeddings and their row index, each atomically (a temporary file in the same
    directory, then os.replace), the embeddings first. The index names the embeddings file and
    its sha256, so a reader can tell an index from the file it describes."""
    import numpy as np

    from clipfast.artifact.manifest import sha256_file

    temps: list[Path] = []
    try:
        tmp_npy = _temp_beside(npy)
        temps.append(tmp_npy)
        with open(tmp_npy, "wb") as f:
            np.save(f, embeddings)
            f.flush()
            os.fsync(f.fileno())
        doc = {"embeddings": npy.name, "sha256": sha256_file(tmp_npy),
               "shape": list(embeddings.shape), **record}
        tmp_index = _temp_beside(index)
        temps.append(tmp_index)
        with open(tmp_index, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_npy, npy)
        os.replace(tmp_index, index)
    except OSError as e:
        raise ClipfastError(f"encode: cannot write {npy} and {index}: {e}") from e
    finally:
        for t in temps:
            with contextlib.suppress(OSError):
                t.unlink()


def _cmd_encode(args: argparse.Namespace) -> int:
    import clipfast

    npy, index = output_paths(args.out)
    if npy.is_dir() or index.is_dir():
        raise ClipfastError(f"encode: --out {args.out} would write {npy} and {index}, and one of "
                            "them is a directory")
    if not args.texts:
        paths, skipped = _expand_images(args.images)
        for item, reason in skipped:
            print(f"skipped: {item} ({reason})", file=sys.stderr)
        if not paths:
            raise ClipfastError("encode: no images given (pass files or directories, or --texts)"
                                + (f"; {plural(len(skipped), 'file')} skipped" if skipped else ""))
    engine = clipfast.Engine(args.artifact, backend=args.backend, device=args.device,
                             batch_size=args.batch_size)
    for name, reason in engine.fallbacks:
        print(f"note: backend {name} skipped: {reason}", file=sys.stderr)
    npy.parent.mkdir(parents=True, exist_ok=True)
    if args.texts:
        emb = engine.encode_texts(args.texts)
        _write_outputs(npy, index, emb, {"kind": "texts", "rows": list(args.texts),
                                         "failures": [], "skipped": [],
                                         "backend": engine.backend})
        print(f"{plural(len(args.texts), 'text')} -> {npy} {emb.shape} (backend "
              f"{engine.backend}); row index in {index}")
        return 0
    res = engine.encode_images(paths, errors="skip", progress=not args.quiet)
    _write_outputs(npy, index, res.embeddings, {
        "kind": "images",
        "rows": [paths[i] for i in res.indices.tolist()],
        "failures": [{"index": f.index, "item": f.item, "error": f.error} for f in res.failures],
        "skipped": [{"item": item, "reason": reason} for item, reason in skipped],
        "backend": engine.backend,
    })
    print(f"{len(res.indices)} of {plural(len(paths), 'image')} -> {npy} {res.embeddings.shape} "
          f"(backend {engine.backend}); row index in {index}"
          + (f"; {plural(len(skipped), 'file')} skipped" if skipped else ""))
    for f in res.failures:
        print(f"failed: {f.error}", file=sys.stderr)
    return 0 if not res.failures else 2


class _TopHelp(argparse.HelpFormatter):
    """The top-level help: one row per command, names and summaries in two columns (argparse
    would add a bare COMMAND row and push build-engines' summary to the next line)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=20)
        # argparse measures command names one indent level shallower than it prints them
        self._action_max_length = 17

    def _format_action(self, action: argparse.Action) -> str:
        text = super()._format_action(action)
        if action.nargs == argparse.PARSER:
            text = text.split("\n", 1)[1]
        return text


def _artifact_command(sub: Any, name: str, fn: Callable[[argparse.Namespace], int],
                      **parser_kw: Any) -> argparse.ArgumentParser:
    """Register a subcommand whose first argument is an artifact directory, run by ``fn``."""
    p = sub.add_parser(name, **parser_kw)
    p.add_argument("artifact", help="artifact directory (written by clipfast export)")
    p.set_defaults(fn=fn)
    return p


def build_parser() -> argparse.ArgumentParser:
    from clipfast import __version__
    from clipfast.backends import available_backends

    backends = ", ".join(("auto", *available_backends()))
    p = argparse.ArgumentParser(prog="clipfast", description=__doc__, formatter_class=_TopHelp)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    p.add_argument("--version", action="version", version=f"clipfast {__version__}")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    e = sub.add_parser("export", help="export a model's towers to an artifact directory")
    e.add_argument("--model", required=True,
                   help="open_clip name (ViT-B-32), hf-hub:ORG/NAME, transformers:ID_OR_DIR")
    e.add_argument("--pretrained", default=None,
                   help="open_clip weights: a registry TAG (clipfast models lists them), a "
                        "checkpoint FILE, or none; left out, an open_clip name gets RANDOM "
                        "weights (seeded by --seed), as with none. hf-hub: and transformers: "
                        "models bring their own weights")
    e.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="graph precision: fp32, fp16 (LayerNorm/softmax kept fp32) or int8 "
                        "(QDQ, calibrated; refused below the fidelity gate)")
    e.add_argument("--io", default="fp32", choices=["fp32", "fp16"],
                   help="dtype of the pixel input and embedding outputs (fp16: --precision fp16 "
                        "only)")
    e.add_argument("--out", required=True, help="artifact directory to write")
    e.add_argument("--images", default=None, help="directory of images to measure fidelity on")
    e.add_argument("--calibration-images", default=None, metavar="DIR",
                   help="int8: directory of images to calibrate on (default: built-in set)")
    e.add_argument("--int8-format", default="portable",
                   choices=["portable", "portable-u8", "full-range"],
                   help="int8: portable (default: 7-bit weights, the same results on every CPU), "
                        "portable-u8 (8-bit u8 weights, also the same everywhere, slower on "
                        "VNNI CPUs) or full-range (8-bit s8 weights: exact on CPUs with VNNI, AMX "
                        "or aarch64; x86 CPUs without VNNI run it as float Q/DQ, at fp32 speed)")
    e.add_argument("--int8-method", default="static", choices=["static", "dynamic"],
                   help="int8: static (QDQ, calibrated activation ranges; batch-independent, "
                        "TensorRT-ready; default) or dynamic (int8 weights, activation ranges per "
                        "batch; faster on CPU, the text tower most; embeddings depend slightly "
                        "on the batch)")
    e.add_argument("--no-fuse", action="store_true",
                   help="skip ONNX Runtime's transformer fusions (plain ONNX operators only)")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--seed", type=int, default=0, help="seed for --pretrained none")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    e.add_argument("--no-gate", action="store_true",
                   help="write the artifact even if fidelity is below the gate")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--tensorrt", action="store_true",
                   help="also build TensorRT engines on this GPU into OUT/tensorrt/ (plain ONNX "
                        "graphs: implies no fusion); needs clipfast[tensorrt]")
    _add_profile_flags(e)
    e.set_defaults(fn=_cmd_export)

    b = _artifact_command(sub, "build-engines", _cmd_build_engines,
                          help="build an artifact's TensorRT engines on this GPU")
    _add_profile_flags(b)
    b.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where engines go (default: ARTIFACT/tensorrt/ when writable, else "
                        "$CLIPFAST_CACHE_DIR/<artifact digest>/tensorrt/, default root "
                        "~/.cache/clipfast)")
    b.add_argument("--rebuild", action="store_true",
                   help="build even when a matching engine is cached")
    b.add_argument("--quiet", action="store_true", help="no progress messages")

    v = _artifact_command(sub, "verify", _cmd_verify,
                          help="check an artifact's fidelity on this host",
                          description="Check the artifact's golden outputs on this host and, "
                          "with the export extras, re-measure its fidelity against the PyTorch "
                          "source (exit status 1 when a gate fails).")
    v.add_argument("--images", default=None, metavar="DIR",
                   help="directory of images to measure on (default: a built-in set)")
    v.add_argument("--backend", default="onnxruntime",
                   help=f"backend to check: {backends} (default onnxruntime)")
    v.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    v.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    _artifact_command(sub, "info", _cmd_info, help="describe an artifact",
                      description="Print an artifact's source, family, precision, "
                      "preprocessing, tokenizer, files and fidelity figures (checksums are not "
                      "re-read).")

    n = sub.add_parser("encode", help="embed images or --texts into a .npy file")
    n.add_argument("artifact", help="artifact directory (written by clipfast export)")
    n.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files or directories (searched recursively; hidden files "
                        "and non-images are skipped with the reason)")
    n.add_argument("--texts", nargs="+", default=None, metavar="TEXT",
                   help="embed these texts instead of images")
    n.add_argument("--out", required=True,
                   help="output X.npy (or X: .npy is added); the row index goes to X.json")
    n.add_argument("--backend", default="auto",
                   help=f"{backends} (default auto: the fastest that runs here)")
    n.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    n.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="rows per tower call (default 32)")
    n.add_argument("--quiet", action="store_true", help="no progress bar")
    n.set_defaults(fn=_cmd_encode)

    from clipfast.bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    from clipfast.export.families.cli import add_parser as add_models_parser

    add_models_parser(sub)
    from clipfast.embed.cli import add_parser as add_embed_parser

    add_embed_parser(sub)
    from clipfast.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    from clipfast.search.cli import add_index_parser, add_search_parser

    add_index_parser(sub)
    add_search_parser(sub)
    from clipfast.backends.tune import add_parser as add_tune_parser

    add_tune_parser(sub)
    return p


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ClipfastError as e:
        print(f"clipfast {args.command}: error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the exit status. A reader that stops early (``clipfast info |
    head``) ends the command quietly, as the Python documentation recommends for SIGPIPE."""
    try:
        rc = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that it cannot fail there
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
