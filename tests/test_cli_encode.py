"""`clipfast encode`: output and row-index names from one rule, both written atomically, an index
for text runs too, and folder runs that take JPEGs by content and say what they skip. Runs on a
tiny transformers CLIP exported once for the module (~20 s)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfast.artifact.manifest import sha256_file
from clipfast.cli import main, output_paths


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos) -> Path:
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(photos["chelsea"]).save(d / "cat.jpg")
    return d


def _encode(art, *args) -> int:
    return main(["encode", str(art), *map(str, args), "--quiet"])


def _index(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("out, npy, index", [
    ("emb.npy", "emb.npy", "emb.json"),
    ("emb.NPY", "emb.NPY", "emb.json"),
    ("emb.v2", "emb.v2.npy", "emb.v2.json"),
    ("emb.v2.npy", "emb.v2.npy", "emb.v2.json"),
    ("plain", "plain.npy", "plain.json"),
    ("emb.json", "emb.json.npy", "emb.json.json"),
    (".npy", ".npy.npy", ".npy.json"),
])
def test_output_paths_one_rule(out, npy, index):
    assert output_paths(Path("d") / out) == (Path("d") / npy, Path("d") / index)


def test_out_without_npy_suffix_never_touches_another_runs_index(small_clip_artifact, photo_dir,
                                                                   tmp_path):
    assert _encode(small_clip_artifact, photo_dir, "--out", tmp_path / "emb.npy") == 0
    first = (tmp_path / "emb.json").read_text()
    assert _encode(small_clip_artifact, photo_dir, "--out", tmp_path / "emb.v2") == 0
    assert (tmp_path / "emb.json").read_text() == first  # emb.npy's index left alone
    v2 = _index(tmp_path / "emb.v2.json")
    assert v2["embeddings"] == "emb.v2.npy" and (tmp_path / "emb.v2.npy").is_file()
    assert v2["sha256"] == sha256_file(tmp_path / "emb.v2.npy")
    assert _encode(small_clip_artifact, photo_dir, "--out", tmp_path / "plain") == 0
    plain = _index(tmp_path / "plain.json")
    assert (tmp_path / plain["embeddings"]).is_file()  # the index names a file that exists
    assert np.load(tmp_path / "plain.npy").shape == (1, 48)
    assert not (tmp_path / "plain").exists()


def test_a_texts_run_replaces_the_index(small_clip_artifact, photo_dir, tmp_path):
    out = tmp_path / "e.npy"
    assert _encode(small_clip_artifact, photo_dir, "--out", out) == 0
    assert _index(tmp_path / "e.json")["kind"] == "images"
    assert _encode(small_clip_artifact, "--texts", "a cat", "a dog", "--out", out) == 0
    index = _index(tmp_path / "e.json")
    assert index["kind"] == "texts" and index["rows"] == ["a cat", "a dog"]
    assert index["embeddings"] == "e.npy" and index["sha256"] == sha256_file(out)
    assert np.load(out).shape == (2, 48)


def test_outputs_are_written_atomically(small_clip_artifact, photo_dir, tmp_path, monkeypatch):
    out = tmp_path / "e.npy"
    assert _encode(small_clip_artifact, photo_dir, "--out", out) == 0
    before = out.read_bytes(), (tmp_path / "e.json").read_text()
    mode = out.stat().st_mode & 0o777

    import clipfast.cli as cli

    real = cli._temp_beside

    def full_disk_at_the_index(path):
        if path.suffix == ".json":  # the embeddings are written, the index is not
            raise OSError(28, "No space left on device")
        return real(path)

    monkeypatch.setattr(cli, "_temp_beside", full_disk_at_the_index)
    assert _encode(small_clip_artifact, "--texts", "a cat", "--out", out) == 1
    monkeypatch.undo()
    # neither file was touched, and no temporary file is left behind
    assert (out.read_bytes(), (tmp_path / "e.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.npy"]
    assert out.stat().st_mode & 0o777 == mode == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_folder_runs_take_jpegs_by_content_and_list_what_they_skip(small_clip_artifact, photos,
                                                                    tmp_path, capsys):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    cat = Image.fromarray(photos["chelsea"])
    cat.save(d / "cat.jpg")
    cat.save(d / "cat.jfif", format="JPEG")
    cat.save(d / "camera_upload", format="JPEG")  # no suffix
    cat.save(d / "renamed.dat", format="PNG")  # an unknown suffix, image content
    cat.save(d / "sub" / "dog.png")
    cat.save(d / ".hidden.jpg")
    cat.save(d / ".git" / "inside.jpg")
    (d / "notes.txt").write_text("not an image")
    (d / "noext").write_bytes(b"\x00\x01 not an image either")
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "pipe")  # never opened: a FIFO would block a reader
    out = tmp_path / "emb.npy"
    assert _encode(small_clip_artifact, d, "--out", out) == 0
    index = _index(tmp_path / "emb.json")
    rows = [Path(r).relative_to(d).as_posix() for r in index["rows"]]
    assert rows == ["camera_upload", "cat.jfif", "cat.jpg", "renamed.dat", "sub/dog.png"]
    assert np.load(out).shape == (5, 48) and index["failures"] == []
    skipped = {Path(s["item"]).relative_to(d).as_posix(): s["reason"] for s in index["skipped"]}
    assert skipped.pop(".git") == "hidden directory"
    assert skipped.pop(".hidden.jpg") == "hidden file"
    assert "not an image" in skipped.pop("notes.txt")
    assert "not an image" in skipped.pop("noext")
    if hasattr(os, "mkfifo"):
        assert skipped.pop("pipe") == "not a regular file"
    assert skipped == {}
    err = capsys.readouterr().err
    assert f"skipped: {d / '.hidden.jpg'} (hidden file)" in err and "notes.txt" in err


def test_a_hidden_file_named_explicitly_is_taken(small_clip_artifact, photos, tmp_path):
    Image.fromarray(photos["chelsea"]).save(tmp_path / ".cat.jpg")
    out = tmp_path / "emb.npy"
    assert _encode(small_clip_artifact, tmp_path / ".cat.jpg", "--out", out) == 0
    assert _index(tmp_path / "emb.json")["rows"] == [str(tmp_path / ".cat.jpg")]


def test_a_folder_with_nothing_to_embed_says_what_it_skipped(small_clip_artifact, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("hello")
    assert _encode(small_clip_artifact, tmp_path / "in", "--out", tmp_path / "e") == 1
    err = capsys.readouterr().err
    assert "readme.txt" in err and "no images given" in err and "1 file skipped" in err
