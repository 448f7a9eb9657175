"""``clipfast models``: the architectures and pretrained tags clipfast exports, with each one's
family, coverage status (benchmarks/results/coverage.md, shipped as ``coverage.json`` beside
this module) and the exact export command.

Importing this module needs neither torch nor open_clip; running the command needs open_clip
(the export extras).
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

from clipfast.errors import ClipfastError

__all__ = ["COVERAGE_FILE", "add_parser", "list_models"]

COVERAGE_FILE = Path(__file__).with_name("coverage.json")

# transformers families: a released repo per family for the example command (weights come from
# the hub cache or a local directory written by save_pretrained: transformers:DIR)
TRANSFORMERS_EXAMPLES: dict[str, tuple[str, ...]] = {
    "clip": ("openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14"),
    "metaclip": ("facebook/metaclip-b32-400m", "facebook/metaclip-h14-fullcc2.5b"),
    "metaclip2": ("facebook/metaclip-2-worldwide-huge-quickgelu",),
    "align": ("kakaobrain/align-base",),
    "siglip": ("google/siglip-base-patch16-224", "google/siglip-so400m-patch14-384"),
}


def _coverage() -> dict[str, Any]:
    try:
        return json.loads(COVERAGE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _status(cov: dict[str, Any] | None) -> str:
    """One phrase from a coverage entry ``{depth: {"fp32": .., "fp16": ..}}``."""
    if not cov:
        return "not in the coverage sweep"
    parts = []
    for depth, r in sorted(cov.items(), key=lambda kv: kv[0] != "full"):
        tag = "full depth" if depth == "full" else f"depth {depth.lstrip('L')}"
        if r.get("status") == "too_large":
            parts.append(f"{tag}: too large for the sweep machine")
        elif r.get("status") != "ok":
            parts.append(f"{tag}: {r.get('status')}")
        else:
            parts.append(f"{tag}: fp32 {r.get('fp32')}, fp16 {r.get('fp16')}")
    return "; ".join(parts)


def _export_command(model: str, pretrained: str | None) -> str:
    out = (model.replace("/", "-") + (f"-{pretrained}" if pretrained else "")).lower()
    cmd = f"clipfast export --model {model}"
    if pretrained:
        cmd += f" --pretrained {pretrained}"
    return cmd + f" --out {out}"


def _check_family(family: str | None, known: list[str]) -> None:
    """ClipfastError naming the known families when ``family`` is not one of them."""
    if family is None or family in known:
        return
    close = difflib.get_close_matches(family, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ClipfastError(f"--family {family!r}: no such family{hint}; the known families are "
                        f"{', '.join(known)}")


def list_models(family: str | None = None) -> dict[str, Any]:
    """``{"open_clip": [...], "transformers": [...], "families": [...]}`` (what ``--json``
    prints)."""
    try:
        from clipfast.export import families

        # a wrong --family is reported before open_clip's registry (seconds to import) loads
        _check_family(family, [s.name for s in families.all_families()])
        import open_clip
    except ImportError as e:
        raise ClipfastError(
            "`clipfast models` reads open_clip's model registry: it needs the export extras, "
            f"pip install 'clipfast[export]' ({e})") from e

    coverage = _coverage()
    rows = []
    for name in open_clip.list_models():
        spec = families.for_open_clip(name, open_clip.get_model_config(name))
        if family and spec.name != family:
            continue
        tags = list(open_clip.list_pretrained_tags_by_model(name))
        cov = coverage.get(name)
        rows.append({
            "model": name, "family": spec.name, "pretrained": tags,
            "coverage": cov or {}, "status": _status(cov),
            "export": _export_command(name, tags[0] if tags else "none"),
        })
    hf = []
    for spec in families.all_families():
        if spec.loader != "transformers" or (family and spec.name != family):
            continue
        for repo in TRANSFORMERS_EXAMPLES.get(spec.name, ()):
            hf.append({"model": f"transformers:{repo}", "family": spec.name,
                       "model_types": list(spec.model_types),
                       "status": "tested on small random-weight configs (tests/test_export_hf.py)",
                       "export": _export_command(f"transformers:{repo}", None)})
    return {"open_clip": rows, "transformers": hf,
            "families": [s.describe() for s in families.all_families()
                         if not family or s.name == family]}


def _cmd_models(args: argparse.Namespace) -> int:
    data = list_models(args.family)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(f"open_clip architectures ({len(data['open_clip'])}; --pretrained TAG, or none for "
          "random weights):")
    for r in data["open_clip"]:
        tags = ", ".join(r["pretrained"]) or "(no released weights: --pretrained FILE or none)"
        print(f"  {r['model']}  [{r['family']}]  {r['status']}")
        print(f"      tags: {tags}")
        print(f"      {r['export']}")
    hf_families = ", ".join(sorted({r["family"] for r in data["transformers"]}))
    print(f"\ntransformers checkpoints ({hf_families}; transformers:ORG/NAME or "
          "transformers:DIR):")
    for r in data["transformers"]:
        print(f"  {r['model']}  [{r['family']}]  {r['status']}")
        print(f"      {r['export']}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``clipfast models`` on the CLI's subparsers."""
    m = sub.add_parser("models", help="list exportable models, their tags and export commands",
                       description="List the architectures and pretrained tags clipfast "
                       "exports, with each one's family, coverage status and export command.")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.add_argument("--family", default=None,
                   help="only this family (e.g. openclip-resnet; an unknown one lists the "
                        "known families)")
    m.set_defaults(fn=_cmd_models)
