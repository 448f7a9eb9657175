"""Export assembly (export/workspace.py): one export per --out, no temporary directory outliving
an interrupted export, an --out that holds nothing or a complete artifact whatever the moment of
a kill, and the umask's permissions on the result."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import clipfast
from clipfast.artifact.manifest import load_manifest
from clipfast.errors import ExportError
from clipfast.export.workspace import KEPT_MARKER, WORK_MARKER, ExportWorkspace


def test_a_second_export_to_the_same_out_is_refused_while_one_runs(tmp_path):
    out = tmp_path / "art"
    with ExportWorkspace(out, overwrite=False):
        with pytest.raises(ExportError, match=r"another export to .* is running \(process "
                                              rf"{os.getpid()}"):
            ExportWorkspace(out, overwrite=True).__enter__()
    # released at the end, lock file removed with it
    with ExportWorkspace(out, overwrite=False) as ws:
        assert ws.work.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_work_directories_are_removed_and_kept_ones_reported(tmp_path, caplog):
    out = tmp_path / "art"
    stale = tmp_path / ".art.k1ll3d"
    stale.mkdir()
    (stale / WORK_MARKER).write_text("4242\n")
    (stale / "image.onnx").write_bytes(b"x" * 1000)
    kept = tmp_path / ".art.refused"
    kept.mkdir()
    (kept / WORK_MARKER).write_text("1\n")
    (kept / KEPT_MARKER).write_text("kept\n")
    other = tmp_path / ".art.notours"  # no marker: not an export's directory
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="clipfast.export"):
        with ExportWorkspace(out, overwrite=False) as ws:
            (ws.work / "manifest.json").write_text("{}")
            ws.commit()
    assert not stale.exists() and kept.is_dir() and other.is_dir()
    assert f"removed {stale}" in caplog.text and f"{kept} holds a refused export" in caplog.text
    assert (out / "manifest.json").is_file() and not (out / WORK_MARKER).exists()


def test_artifact_directory_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with ExportWorkspace(tmp_path / "art", overwrite=False) as ws:
            out = ws.commit()
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700


def test_commit_replaces_an_artifact_only_with_overwrite(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(ExportError, match="exists and is not empty; pass --overwrite"):
        ExportWorkspace(out, overwrite=False).__enter__()
    with ExportWorkspace(out, overwrite=True) as ws:
        (ws.work / "new").write_text("new")
        ws.commit()
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # nothing aside


_EXPORT = "import sys; from clipfast.cli import main; sys.exit(main(sys.argv[1:]))"


def _start_export(model: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _EXPORT, "-v", "export", "--model", model, "--out", str(out),
         "--quiet"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _kill_at(proc: subprocess.Popen, needle: str, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` when its log shows ``needle``; False if it ended first."""
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        if needle in line:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait()
    return False


def _holds_nothing_or_a_complete_artifact(out: Path) -> None:
    if out.exists():
        engine = clipfast.Engine(out, backend="onnxruntime")  # checksums and self-check
        assert engine.self_check_figures["passed"]


@pytest.mark.slow
def test_sigkill_at_any_stage_leaves_nothing_or_a_complete_artifact(tmp_path):
    pytest.importorskip("torch")
    from hf_models import save_clip

    src = save_clip(tmp_path / "clip", "small")
    model, out = f"transformers:{src}", tmp_path / "art"
    stages = ("export: export image tower", "export: fuse graphs",
              "export: write tokenizer + manifest", "export: measure fidelity")
    for stage in stages:
        assert _kill_at(_start_export(model, out), stage), f"export ended before {stage!r}"
        _holds_nothing_or_a_complete_artifact(out)
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".art.")]
        assert leftovers, "a killed export leaves its work directory until the next one"
    # a killed overwrite keeps the old artifact or puts the new one: never half of either
    done = subprocess.run([sys.executable, "-c", _EXPORT, "export", "--model", model,
                           "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "left by an export to" in done.stderr  # the stale directories were removed, and said
    load_manifest(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".art")] == []
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXPORT, "-v", "export", "--model", model, "--out", str(out),
         "--overwrite", "--quiet"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True)
    assert _kill_at(proc, "export: measure fidelity")
    _holds_nothing_or_a_complete_artifact(out)
    assert out.is_dir()  # the previous artifact is still there


@pytest.mark.slow
def test_concurrent_exports_to_one_out(tmp_path):
    pytest.importorskip("torch")
    from hf_models import save_clip

    from clipfast.export.pipeline import ExportOptions, run_export

    src = save_clip(tmp_path / "clip", "small")
    out = tmp_path / "art"
    first = _start_export(f"transformers:{src}", out)
    try:
        for line in first.stderr:
            if "export: load source" in line:
                break
        with pytest.raises(ExportError, match="another export to .* is running"):
            run_export(ExportOptions(model=f"transformers:{src}", out=out, overwrite=True,
                                     progress=False))
    finally:
        first.stderr.read()
        assert first.wait(timeout=300) == 0
    load_manifest(out)
