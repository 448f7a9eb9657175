"""The command line as a newcomer meets it: version, help, progress, errors that point the way."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

import clipfast
from clipfast.cli import build_parser, main
from clipfast.errors import ExportError
from clipfast.types import plural


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"clipfast {clipfast.__version__}"


def test_top_level_help_gives_every_command_a_summary_on_its_own_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    lines = parser.format_help().splitlines()
    commands = _commands(parser)
    assert {"export", "build-engines", "verify", "info", "encode", "models"} <= set(commands)
    for name in commands:
        row = next((line for line in lines if line.split()[:1] == [name]), None)
        assert row is not None, f"{name} is missing from the top-level help"
        assert len(row.split()) > 1, f"{name}: its summary is not on its line: {row!r}"
    assert not any(line.strip() == "COMMAND" for line in lines)


@pytest.mark.parametrize("command", ["encode", "verify", "info", "build-engines"])
def test_arguments_are_documented(command):
    sub = _commands(build_parser())[command]
    undocumented = [a.dest for a in sub._actions
                    if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not undocumented, f"clipfast {command}: arguments without help: {undocumented}"


def test_pretrained_help_says_leaving_it_out_means_random_weights():
    export = _commands(build_parser())["export"]
    action = next(a for a in export._actions if a.dest == "pretrained")
    assert action.default is None and "RANDOM" in action.help


def test_leaving_out_pretrained_builds_random_weights():
    from clipfast.export.sources import load_source

    source = load_source("ViT-B-32", None)
    assert source.random_weights and source.spec["pretrained"] == "none"


def test_verify_names_its_stages_on_stderr(small_clip_artifact, capsys):
    assert main(["verify", str(small_clip_artifact)]) == 0
    captured = capsys.readouterr()
    for stage in ("loading the artifact", "golden self-check", "loading the PyTorch source",
                  "measuring the artifact"):
        assert stage in captured.err
        assert stage not in captured.out  # the report on stdout stays as it was
    assert "gates passed" in captured.out


def test_models_rejects_an_unknown_family(capsys):
    assert main(["models", "--family", "openclip-resnt"]) == 1
    err = capsys.readouterr().err
    assert "'openclip-resnt'" in err and "did you mean 'openclip-resnet'" in err
    assert "openclip-vit" in err and "siglip" in err  # the known families are listed


def test_model_names_are_case_insensitive_where_unambiguous():
    from clipfast.export.sources_openclip import resolve_open_clip_name

    known = ["ViT-B-32", "ViT-B-16", "RN50", "xlm-roberta-base-ViT-B-32"]
    assert resolve_open_clip_name("ViT-B-32", known) == "ViT-B-32"
    assert resolve_open_clip_name("vit-b-32", known) == "ViT-B-32"
    assert resolve_open_clip_name("rn50", known) == "RN50"
    with pytest.raises(ExportError, match="did you mean AB or ab"):
        resolve_open_clip_name("Ab", ["AB", "ab"])  # two spellings: no guess


def test_a_mistyped_model_name_gets_did_you_mean():
    from clipfast.export.sources_openclip import resolve_open_clip_name

    with pytest.raises(ExportError, match=r"'ViT-B-23'; did you mean ViT-B-32"):
        resolve_open_clip_name("ViT-B-23", ["RN50", "ViT-B-32", "ViT-L-14"])
    with pytest.raises(ExportError) as e:
        resolve_open_clip_name("nothing-like-it", ["RN50", "ViT-B-32"])
    assert "did you mean" not in str(e.value) and "clipfast models" in str(e.value)


def test_export_suggests_the_model_name(tmp_path, capsys):
    rc = main(["export", "--model", "ViT-B-23", "--pretrained", "none",
               "--out", str(tmp_path / "a")])
    assert rc == 1
    assert "did you mean ViT-B-32" in capsys.readouterr().err


def test_info_into_a_closed_pipe_ends_quietly(small_clip_artifact):
    # `clipfast info ART | head -1`, deterministically: the reader is gone before the first write
    read, write = os.pipe()
    os.close(read)
    try:
        p = subprocess.run([sys.executable, "-m", "clipfast.cli", "info", str(small_clip_artifact)],
                           stdout=write, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write)
    assert "BrokenPipeError" not in p.stderr.decode() and "Traceback" not in p.stderr.decode()
    assert p.returncode == 1


def test_plural():
    assert [plural(n, "file") for n in (0, 1, 2)] == ["0 files", "1 file", "2 files"]


def test_encode_counts_in_the_singular(small_clip_artifact, tmp_path, photos, capsys):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(photos["chelsea"]).save(folder / "cat.jpg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "emb.npy"
    assert main(["encode", str(small_clip_artifact), str(folder), "--out", str(out),
                 "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "1 of 1 image ->" in summary and "1 file skipped" in summary
    assert main(["encode", str(small_clip_artifact), "--texts", "a cat", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("1 text ->")


def test_embed_counts_in_the_singular(small_clip_artifact, tmp_path, photos, capsys):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(photos["chelsea"]).save(folder / "cat.jpg")
    assert main(["embed", str(small_clip_artifact), str(folder), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    assert "1 of 1 input embedded, 0 failed, 1 shard ->" in capsys.readouterr().err
