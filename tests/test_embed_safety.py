"""`clipfast embed` never deletes, duplicates or mixes data: --out safety (a user's files and the
sources survive, --overwrite included), the exclusive lock (a second or paused first job),
readers that refuse duplicate ordinals, content fingerprints on resume, every tar/CSV input
accounted for, non-UTF-8 names, and errors a user can act on (disk full, non-UTF-8 tables,
Ctrl-C). Same tiny CLIP as test_embed (64 px, 48-d)."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_embed import make_images

import clipfast
from clipfast.embed import EmbedOptions, read_failures, run_embed
from clipfast.errors import ClipfastError


@pytest.fixture(scope="module")
def art(small_clip_artifact) -> Path:
    return small_clip_artifact


@pytest.fixture(scope="module")
def engine(art):
    return clipfast.Engine(art, backend="onnxruntime", batch_size=8)


def _opts(art, sources, out, **kw) -> EmbedOptions:
    kw.setdefault("batch_size", 4)
    kw.setdefault("shard_size", 8)
    kw.setdefault("progress", False)
    return EmbedOptions(artifact=str(art), sources=[str(s) for s in sources], out=str(out), **kw)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _cli(art, src, out, *extra) -> list[str]:
    return [sys.executable, "-m", "clipfast.cli", "embed", str(art), str(src), "--out", str(out),
            "--quiet", "--batch-size", "2", "--shard-size", "2", *extra]


# A CLI job that signals itself right after its ``after``-th shard commit, while it still has
# work to do: a Ctrl-C (SIGINT) or a pause (SIGSTOP) that lands mid-job however fast the job runs.
_SELF_SIGNALLING_JOB = """
import os, signal, sys, threading
# Ctrl-C as a terminal delivers it: a child inherits an ignored SIGINT from whatever started it
# (nohup, a shell's `&`, a test runner in some states), and Python then never raises it.
signal.signal(signal.SIGINT, signal.default_int_handler)
from clipfast.embed import output
after, sig = int(sys.argv.pop(1)), getattr(signal, sys.argv.pop(1))
commit, n = output.OutputDir.commit, [0]
def commit_then_signal(self, *a, **kw):
    rec = commit(self, *a, **kw)
    n[0] += 1
    if n[0] == after:
        os.kill(os.getpid(), sig)
        if sig == signal.SIGINT:
            threading.Event().wait(60)  # the interrupt lands here, with shards still to do
    return rec
output.OutputDir.commit = commit_then_signal
from clipfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _signalled_cli(art, src, out, after: int, sig: str) -> list[str]:
    return [sys.executable, "-c", _SELF_SIGNALLING_JOB, str(after), sig,
            *_cli(art, src, out)[3:]]


# ------------------------------------------------------------------------------ --out safety


def test_overwrite_never_deletes_a_users_files(art, tmp_path):
    src = tmp_path / "imgs"
    make_images(src, 3)
    out = tmp_path / "mine"
    (out / "shards").mkdir(parents=True)
    (out / "failures").mkdir()
    (out / "shards" / "part-000000.parquet").write_bytes(b"my own table")
    (out / "failures" / "notes.txt").write_text("mine")
    (out / "manifest.json").write_text('{"my": "manifest"}')
    (out / "other.txt").write_text("mine too")
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(ClipfastError, match="not a clipfast embed"):
            run_embed(_opts(art, [src], out, overwrite=overwrite))
        assert _tree(out) == before
        assert sorted(p.name for p in out.iterdir()) == [
            "failures", "manifest.json", "other.txt", "shards"]  # no lock file either


def test_out_overlapping_a_source_is_refused_and_the_source_survives(art, tmp_path):
    src = tmp_path / "imgs"
    make_images(src, 4)
    (src / "shards").mkdir()
    Image.new("RGB", (40, 40)).save(src / "shards" / "a.jpg")
    (src / "journal.jsonl").write_text("mine\n")
    before = _tree(src)
    for out, overwrite in ((src, True), (src, False), (src / "emb", True)):
        with pytest.raises(ClipfastError, match="overlaps the source"):
            run_embed(_opts(art, [src], out, overwrite=overwrite))
        assert _tree(src) == before and not (src / "emb").exists()
    # a source inside --out: a list file kept in the output folder
    out = tmp_path / "o"
    out.mkdir()
    (out / "list.txt").write_text(str(src / "img000.png") + "\n")
    with pytest.raises(ClipfastError, match="overlaps the source"):
        run_embed(_opts(art, [out / "list.txt"], out, overwrite=True))
    assert (out / "list.txt").exists()


def test_a_users_file_inside_a_clipfast_output_survives_resume_and_overwrite(art, tmp_path):
    src = tmp_path / "imgs"
    make_images(src, 12)
    out = tmp_path / "o"
    run_embed(_opts(art, [src], out, stop_after_shards=1))
    (out / "shards" / "notes.txt").write_text("mine")
    (out / "failures" / "keep.parquet").write_bytes(b"mine")
    (out / "README").write_text("mine")
    assert run_embed(_opts(art, [src], out)).complete
    assert run_embed(_opts(art, [src], out, overwrite=True)).complete
    assert (out / "shards" / "notes.txt").read_text() == "mine"
    assert (out / "failures" / "keep.parquet").read_bytes() == b"mine"
    assert (out / "README").read_text() == "mine"
    assert len(clipfast.read_embeddings(out).keys) == 12


# ------------------------------------------------------------------------------ the lock


def test_a_second_job_is_refused_while_the_first_runs_or_is_paused(art, tmp_path):
    src = tmp_path / "imgs"
    make_images(src, 60, seed=5)
    run_embed(_opts(art, [src], tmp_path / "ref", batch_size=2, shard_size=2))
    ref_keys, ref = clipfast.read_embeddings(tmp_path / "ref")
    out = tmp_path / "o"
    first = subprocess.Popen(_signalled_cli(art, src, out, 1, "SIGSTOP"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # until it has paused itself
        assert os.WIFSTOPPED(status), "the first job ended before it could be paused"
        with pytest.raises(ClipfastError, match=rf"in use by another .*pid {first.pid} "):
            run_embed(_opts(art, [src], out, batch_size=2, shard_size=2))
        second = subprocess.run(_cli(art, src, out, "--overwrite"), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 1 and f"pid {first.pid}" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()
    keys, emb = clipfast.read_embeddings(out)
    assert keys == ref_keys and len(set(keys)) == 60
    np.testing.assert_array_equal(emb, ref)


def test_two_jobs_started_together_give_each_input_once(art, tmp_path):
    src = tmp_path / "imgs"
    make_images(src, 40, seed=6)
    run_embed(_opts(art, [src], tmp_path / "ref", batch_size=2, shard_size=2))
    ref_keys, ref = clipfast.read_embeddings(tmp_path / "ref")
    out = tmp_path / "o"
    procs = [subprocess.Popen(_cli(art, src, out), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert 0 in [rc for rc, _ in results], results
    for rc, err in results:  # the other one either waited its turn or was refused by name
        assert rc == 0 or (rc == 1 and "in use by another clipfast embed job" in err), err
    keys, emb = clipfast.read_embeddings(out)
    assert keys == ref_keys and len(keys) == 40
    np.testing.assert_array_equal(emb, ref)


def test_readers_and_recovery_refuse_duplicate_or_missing_ordinals(art, tmp_path):
    src = tmp_path / "imgs"
    make_images(src, 16)
    out = tmp_path / "o"
    run_embed(_opts(art, [src], out))
    journal = (out / "journal.jsonl").read_bytes()
    lines = journal.splitlines(keepends=True)
    # a second writer's line: shard 1 again, as index 2
    dup = json.loads(lines[1])
    dup["index"] = 2
    (out / "journal.jsonl").write_bytes(journal + (json.dumps(dup) + "\n").encode())
    with pytest.raises(ClipfastError, match="duplicate or missing"):
        clipfast.read_embeddings(out, require_complete=False)
    with pytest.raises(ClipfastError, match="duplicate or missing"):
        run_embed(_opts(art, [src], out))
    # a gap: shard 0 gone from the journal
    (out / "journal.jsonl").write_bytes(lines[1])
    with pytest.raises(ClipfastError, match="duplicate or missing"):
        clipfast.read_embeddings(out, require_complete=False)
    # duplicate rows inside one committed shard
    (out / "journal.jsonl").write_bytes(journal)
    t = pq.read_table(out / "shards" / "part-000000.parquet")
    pq.write_table(pa.concat_tables([t.slice(0, 4), t.slice(0, 4)]),
                   out / "shards" / "part-000000.parquet")
    with pytest.raises(ClipfastError, match="duplicate or foreign rows"):
        clipfast.read_embeddings(out)


# ------------------------------------------------------------------------------ fingerprints


def test_a_file_rewritten_under_its_name_is_refused_or_reembedded(art, engine, tmp_path):
    src = tmp_path / "imgs"
    paths = make_images(src, 16)
    out = tmp_path / "o"
    run_embed(_opts(art, [src], out, stop_after_shards=1))
    victim = sorted(paths)[2]
    Image.new("RGB", (50, 50), (250, 0, 0)).save(victim)  # same name, new picture
    with pytest.raises(ClipfastError, match=rf"1 input\(s\) changed .*{victim.name}.*"
                                            "--reembed-changed"):
        run_embed(_opts(art, [src], out))
    with pytest.raises(ClipfastError, match="changed"):
        run_embed(_opts(art, [src], out, stop_after_shards=1))
    s = run_embed(_opts(art, [src], out, reembed_changed=True))
    assert s.complete and s.resumed_from == 0
    keys, emb = clipfast.read_embeddings(out)
    np.testing.assert_array_equal(emb, engine.encode_images(keys))
    # complete, then changed: refused too (the rows no longer describe the inputs)
    Image.new("RGB", (50, 50), (0, 0, 250)).save(victim)
    with pytest.raises(ClipfastError, match="changed"):
        run_embed(_opts(art, [src], out))


def test_changed_parquet_bytes_and_jsonl_captions_are_never_mixed(art, engine, tmp_path):
    src = tmp_path / "imgs"
    paths = sorted(make_images(src, 16))
    blobs = [p.read_bytes() for p in paths]
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [f"id{i}" for i in range(16)], "jpg": blobs}), table)
    out = tmp_path / "o"
    run_embed(_opts(art, [table], out, key_column="id", stop_after_shards=1))
    blobs[3] = blobs[10]
    pq.write_table(pa.table({"id": [f"id{i}" for i in range(16)], "jpg": blobs}), table)
    with pytest.raises(ClipfastError, match=r"changed .*id3 \(input 3\)"):
        run_embed(_opts(art, [table], out, key_column="id"))
    run_embed(_opts(art, [table], out, key_column="id", reembed_changed=True))
    keys, emb = clipfast.read_embeddings(out)
    np.testing.assert_array_equal(emb, engine.encode_images([paths[10 if k == "id3" else
                                                                    int(k[2:])] for k in keys]))

    texts = [f"caption {i}" for i in range(16)]
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"caption": t}) + "\n" for t in texts))
    out = tmp_path / "t"
    run_embed(_opts(art, [jl], out, text_column="caption", stop_after_shards=1))
    texts[5] = "a different caption"
    jl.write_text("".join(json.dumps({"caption": t}) + "\n" for t in texts))
    with pytest.raises(ClipfastError, match=r"changed .*c\.jsonl:5"):
        run_embed(_opts(art, [jl], out, text_column="caption"))
    run_embed(_opts(art, [jl], out, text_column="caption", reembed_changed=True))
    _, emb = clipfast.read_embeddings(out)
    np.testing.assert_allclose(emb, engine.encode_texts(texts), atol=1e-6)


# ------------------------------------------------------------------------------ every input


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40 + i, 40), (i * 20 % 256, 100, 50)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, n: int) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            data = _png(i)
            info = tarfile.TarInfo(f"s{i:03d}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return tf.getmembers()


@pytest.mark.parametrize("cut", ["inside_header", "at_header", "inside_data"])
def test_a_truncated_tar_is_an_error_naming_the_shard(art, tmp_path, cut):
    shard = tmp_path / "shard.tar"
    members = _tar(shard, 10)
    at = {"inside_header": members[6].offset + 100, "at_header": members[6].offset,
          "inside_data": members[6].offset_data + 10}[cut]
    data = shard.read_bytes()
    shard.write_bytes(data[:at])
    with pytest.raises(ClipfastError, match=rf"tar shard {shard}"):
        run_embed(_opts(art, [shard], tmp_path / "o"))


def test_tar_links_devices_and_fifos_are_accounted_for(art, engine, tmp_path):
    shard = tmp_path / "shard.tar"
    a = _png(1)
    with tarfile.open(shard, "w") as tf:
        info = tarfile.TarInfo("a.png")
        info.size = len(a)
        tf.addfile(info, io.BytesIO(a))
        for name, typ, link in (("b.png", tarfile.LNKTYPE, "a.png"),
                                ("c.png", tarfile.SYMTYPE, "a.png"),
                                ("d.png", tarfile.CHRTYPE, ""),
                                ("e.png", tarfile.FIFOTYPE, "")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = typ, link
            tf.addfile(info)
    s = run_embed(_opts(art, [shard], tmp_path / "o"))
    assert (s.items, s.embedded, s.failed) == (5, 2, 3)
    keys, emb = clipfast.read_embeddings(tmp_path / "o")
    assert keys == ["a", "b"]  # the hard link is read as the member it links to
    np.testing.assert_array_equal(emb[1], emb[0])
    reasons = {f["key"]: f["reason"] for f in read_failures(tmp_path / "o")}
    assert "symbolic link" in reasons["c"] and "device" in reasons["d"]
    assert "FIFO" in reasons["e"]


def test_a_csv_with_an_unbalanced_quote_is_an_error_naming_the_line(art, tmp_path):
    src = tmp_path / "imgs"
    paths = sorted(make_images(src, 4))
    t = tmp_path / "t.csv"
    t.write_text("id,path\n" + "".join(
        f'id{i},{"" if i != 1 else chr(34)}{p}\n' for i, p in enumerate(paths)))
    with pytest.raises(ClipfastError, match=rf"{t}.* line 3"):
        run_embed(_opts(art, [t], tmp_path / "o"))
    t.write_text("id,path\nid0,a.png,extra\n")
    with pytest.raises(ClipfastError, match=rf"{t} line 2: 3 fields"):
        run_embed(_opts(art, [t], tmp_path / "o2"))


def test_non_utf8_file_names_become_escaped_keys(art, engine, tmp_path):
    src = tmp_path / "imgs"
    make_images(src, 3)
    raw = os.fsencode(src) + b"/caf\xff.png"
    with open(raw, "wb") as f:
        f.write(_png(3))
    with open(os.fsencode(src) + b"/bad\xfe.png", "wb") as f:
        f.write(b"not a png")
    out = tmp_path / "o"
    s = run_embed(_opts(art, [src], out))
    assert (s.embedded, s.failed) == (4, 1)
    keys, emb = clipfast.read_embeddings(out)
    assert str(src / "caf\\xff.png") in keys
    np.testing.assert_array_equal(emb[keys.index(str(src / "caf\\xff.png"))],
                                  engine.encode_images([os.fsdecode(raw)])[0])
    assert read_failures(out)[0]["key"] == str(src / "bad\\xfe.png")
    assert run_embed(_opts(art, [src], out)).complete  # resume compares the escaped keys


# ------------------------------------------------------------------------------ errors


def test_non_utf8_and_unreadable_tables_name_the_path(art, tmp_path):
    t = tmp_path / "latin1.csv"
    t.write_bytes("id,text\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ClipfastError, match=rf"{t} is not UTF-8 .*iconv"):
        run_embed(_opts(art, [t], tmp_path / "o", text_column="text"))
    j = tmp_path / "latin1.jsonl"
    j.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ClipfastError, match=rf"{j} is not UTF-8"):
        run_embed(_opts(art, [j], tmp_path / "o", text_column="text"))
    p = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"text": ["a"] * 100}), p)
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(ClipfastError, match=rf"cannot read parquet table {p}"):
        run_embed(_opts(art, [p], tmp_path / "o", text_column="text"))


def test_a_full_disk_names_the_path_and_the_job_resumes(art, engine, tmp_path, monkeypatch):
    from clipfast.embed import output

    src = tmp_path / "imgs"
    make_images(src, 20)
    out = tmp_path / "o"
    real = output.atomic_write_bytes
    calls = []

    def full(path, write):
        calls.append(path)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)

    monkeypatch.setattr(output, "atomic_write_bytes", full)
    with pytest.raises(ClipfastError, match=r"no space left writing .*rerun the same command"):
        run_embed(_opts(art, [src], out))
    monkeypatch.setattr(output, "atomic_write_bytes", real)
    s = run_embed(_opts(art, [src], out))
    assert s.complete and s.resumed_from > 0
    keys, emb = clipfast.read_embeddings(out)
    assert len(set(keys)) == 20
    np.testing.assert_array_equal(emb, engine.encode_images(keys))


def test_ctrl_c_says_what_is_saved_and_exits_130(art, tmp_path):
    src = tmp_path / "imgs"
    make_images(src, 60, seed=8)
    out = tmp_path / "o"
    proc = subprocess.Popen(_signalled_cli(art, src, out, 2, "SIGINT"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    saved = sum(r["end"] - r["start"] for r in map(json.loads, (out / "journal.jsonl")
                                                    .read_text().splitlines()))
    assert f"interrupted: {saved} of 60 saved; rerun the same command to resume" in err
    done = subprocess.run(_cli(art, src, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"resumed after {saved}" in done.stderr, done.stderr


def test_the_progress_bar_counts_what_is_saved(art, tmp_path, monkeypatch):
    import tqdm.auto

    src = tmp_path / "imgs"
    make_images(src, 20)
    out = tmp_path / "o"
    seen = []

    class Bar:
        def __init__(self, total, initial=0, **_kw):
            self.n = initial

        def update(self, n):
            self.n += n
            seen.append((self.n, sum(json.loads(x)["end"] - json.loads(x)["start"] for x in
                                     (out / "journal.jsonl").read_text().splitlines())))

        def set_postfix(self, **_kw):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    run_embed(_opts(art, [src], out, progress=True, stop_after_shards=1))
    run_embed(_opts(art, [src], out, progress=True))
    assert seen and all(shown == saved for shown, saved in seen), seen
    assert seen[-1] == (20, 20)
