"""`clipfast embed`: every source kind gives the Engine's own rows, failures are listed, the
output folder resumes exactly (in-process stops, a torn journal, orphan shards, kill -9 of the
CLI), foreign jobs are refused, memory stays bounded. A tiny transformers CLIP (64 px input,
48-d), exported once per test session into the session's temp folder (~12 s)."""

from __future__ import annotations

import csv
import io
import json
import os
import random
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

import clipfast
from clipfast.cli import main
from clipfast.embed import EmbedOptions, read_failures, run_embed
from clipfast.embed.sources import Item
from clipfast.errors import ClipfastError


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(30, 110, 2))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        p = folder / (f"sub/img{i:03d}.jpg" if i % 4 == 1 else f"img{i:03d}.png")
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def art(small_clip_artifact) -> Path:
    return small_clip_artifact


@pytest.fixture(scope="module")
def engine(art):
    return clipfast.Engine(art, backend="onnxruntime", batch_size=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    make_images(d, 21)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (10, 200, 30)).save(buf, "JPEG")
    (d / "no_suffix").write_bytes(buf.getvalue())  # an image by content
    (d / "README.md").write_text("not an image")
    (d / ".hidden.png").write_bytes(buf.getvalue())
    return d


def _opts(art, sources, out, **kw) -> EmbedOptions:
    kw.setdefault("batch_size", 4)
    kw.setdefault("shard_size", 8)
    kw.setdefault("progress", False)
    return EmbedOptions(artifact=str(art), sources=[str(s) for s in sources], out=str(out), **kw)


def test_folder_rows_equal_the_engine_and_failures_are_listed(art, engine, folder, tmp_path):
    s = run_embed(_opts(art, [folder], tmp_path / "o"))
    keys, emb = clipfast.read_embeddings(tmp_path / "o")
    assert (s.items, s.embedded, s.failed) == (23, 22, 1)
    assert keys[-1].startswith(str(folder / "sub")) and keys[0] == str(folder / "img000.png")
    assert str(folder / "no_suffix") in keys and str(folder / "README.md") not in keys
    assert not any(".hidden" in k for k in keys)
    assert emb.dtype == np.float32 and emb.shape == (22, 48)
    np.testing.assert_array_equal(emb, engine.encode_images(keys))
    fails = read_failures(tmp_path / "o")
    assert [f["key"] for f in fails] == [str(folder / "broken.jpg")]
    assert "cannot identify image data" in fails[0]["reason"]
    table = pq.read_table(tmp_path / "o" / "failures.parquet").to_pylist()
    assert table == fails
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["counts"] == {"items": 23, "embedded": 22, "failed": 1, "shards": 3}
    assert [(r["start"], r["end"]) for r in m["shards"]] == [(0, 8), (8, 16), (16, 23)]
    assert m["artifact"]["digest"] and m["source"]["specs"][0]["kind"] == "folder"
    schema = pq.read_schema(tmp_path / "o" / m["shards"][0]["file"])
    assert schema.field("embedding").type == pa.list_(pa.float32(), 48)


def test_list_csv_jsonl_parquet_and_tar_sources_give_the_same_rows(art, engine, folder,
                                                                     tmp_path):
    paths = sorted(str(p) for p in folder.rglob("img*"))
    (tmp_path / "list.txt").write_text("# images\n" + "\n".join(paths) + "\n\n")
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        w.writerows([[f"id{i}", p] for i, p in enumerate(paths)])
    with open(tmp_path / "t.jsonl", "w") as f:
        for i, p in enumerate(paths):
            f.write(json.dumps({"id": f"id{i}", "image": p}) + "\n")
    blobs = [Path(p).read_bytes() for p in paths]
    pq.write_table(pa.table({"id": [f"id{i}" for i in range(len(paths))],
                             "jpg": pa.array(blobs, type=pa.binary())}),
                   tmp_path / "t.parquet", row_group_size=5)
    for s in range(2):  # webdataset shards: key.jpg / key.txt members
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tf:
            for i in range(s * 11, min(len(paths), s * 11 + 11)):
                for ext, data in (("png", blobs[i]), ("txt", f"caption {i}".encode())):
                    info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    ref = engine.encode_images(paths)
    cases = {
        "list": ([tmp_path / "list.txt"], {}, paths),
        "csv": ([tmp_path / "t.csv"], {"key_column": "id"}, [f"id{i}" for i in range(21)]),
        "jsonl": ([tmp_path / "t.jsonl"], {}, paths),
        "parquet": ([tmp_path / "t.parquet"], {"key_column": "id"},
                    [f"id{i}" for i in range(21)]),
        "tar": ([str(tmp_path / "shard-{000..001}.tar")], {},
                [f"sample{i:04d}" for i in range(21)]),
    }
    for name, (src, kw, want_keys) in cases.items():
        run_embed(_opts(art, src, tmp_path / f"o-{name}", **kw))
        keys, emb = clipfast.read_embeddings(tmp_path / f"o-{name}")
        assert keys == want_keys, name
        np.testing.assert_array_equal(emb, ref, err_msg=name)

    texts = [f"caption {i}" for i in range(21)]
    run_embed(_opts(art, [str(tmp_path / "shard-{000..001}.tar")], tmp_path / "o-txt",
                    text_column="txt"))
    keys, emb = clipfast.read_embeddings(tmp_path / "o-txt")
    np.testing.assert_allclose(emb, engine.encode_texts(texts), atol=1e-6)


def test_text_table_float16_and_bad_rows(art, engine, tmp_path):
    rows = [{"text": f"a photo of thing {i}"} for i in range(9)] + [{"text": None}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_embed(_opts(art, [tmp_path / "t.jsonl"], tmp_path / "o", text_column="text",
                        dtype="float16"))
    assert (s.embedded, s.failed) == (9, 1)
    keys, emb = clipfast.read_embeddings(tmp_path / "o")
    assert keys == [f"t.jsonl:{i}" for i in range(9)] and emb.dtype == np.float16
    ref = engine.encode_texts([r["text"] for r in rows[:9]])
    np.testing.assert_array_equal(emb, ref.astype(np.float16))
    assert "NoneType" in read_failures(tmp_path / "o")[0]["reason"]


def test_stopped_job_resumes_to_the_uninterrupted_result(art, folder, tmp_path):
    full = run_embed(_opts(art, [folder], tmp_path / "full"))
    ref_keys, ref = clipfast.read_embeddings(tmp_path / "full")
    out = tmp_path / "part"
    s = run_embed(_opts(art, [folder], out, stop_after_shards=1))
    assert not s.complete and s.shards == 1
    with pytest.raises(ClipfastError, match="not completed"):
        clipfast.read_embeddings(out)
    assert len(clipfast.read_embeddings(out, require_complete=False).keys) == 7  # 1 broken
    # A kill inside the next commit: an orphan shard file and a torn journal line.
    (out / "shards" / "part-000001.parquet").write_bytes(b"half a parquet file")
    with open(out / "journal.jsonl", "ab") as f:
        f.write(b'{"index": 1, "start": 8, "end"')
    s = run_embed(_opts(art, [folder], out))
    assert s.complete and s.resumed_from == 8 and (s.items, s.failed) == (full.items, 1)
    keys, emb = clipfast.read_embeddings(out)
    assert keys == ref_keys and len(set(keys)) == len(keys)
    np.testing.assert_array_equal(emb, ref)
    # Done: a third run changes nothing.
    before = (out / "journal.jsonl").read_bytes()
    assert run_embed(_opts(art, [folder], out)).complete
    assert (out / "journal.jsonl").read_bytes() == before


def test_another_job_in_out_is_refused_unless_overwrite(art, folder, tmp_path):
    other = tmp_path / "other"
    make_images(other, 3, seed=1)
    out = tmp_path / "o"
    run_embed(_opts(art, [folder], out))
    with pytest.raises(ClipfastError, match=r"made from .*--overwrite"):
        run_embed(_opts(art, [other], out))
    with pytest.raises(ClipfastError, match="another job's output: it was made with"):
        run_embed(_opts(art, [folder], out, dtype="float16"))
    m = json.loads((out / "manifest.json").read_text())
    m["artifact"]["digest"] = "0" * 16
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ClipfastError, match="artifact .*digest 0000000000000000"):
        run_embed(_opts(art, [folder], out))
    assert run_embed(_opts(art, [other], out, overwrite=True)).embedded == 3
    assert len(clipfast.read_embeddings(out).keys) == 3
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.bin").write_bytes(b"x")
    with pytest.raises(ClipfastError, match="not a clipfast embed output"):
        run_embed(_opts(art, [folder], tmp_path / "foreign"))


def test_fast_decode_records_its_measured_cost(art, engine, photos, tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    for name, arr in photos.items():
        big = np.asarray(Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2)))
        Image.fromarray(big).save(d / f"{name}.jpg", quality=92)
    run_embed(_opts(art, [d], tmp_path / "fast", fast_decode=True))
    run_embed(_opts(art, [d], tmp_path / "exact"))
    fid = json.loads((tmp_path / "fast" / "manifest.json").read_text())["fast_decode_fidelity"]
    assert fid["sample"] == 5 and fid["draft_factor"] == 2.0
    assert 0 < fid["pixel_max_levels"] <= 40
    assert 0 < fid["centred_rel_error_max"] < 0.2 and fid["cosine_min"] > 0.98
    keys, fast = clipfast.read_embeddings(tmp_path / "fast")
    _, exact = clipfast.read_embeddings(tmp_path / "exact")
    assert not np.array_equal(fast, exact)  # draft really ran
    from clipfast.artifact.fidelity import centred_relative_error

    assert centred_relative_error(fast, exact).max() == pytest.approx(
        fid["centred_rel_error_max"], rel=1e-4)


def test_decode_runs_ahead_by_at_most_prefetch_batches(engine):
    from clipfast.embed.job import _run_local

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    pulled = []

    def batches():
        for b in range(12):
            pulled.append(b)
            yield [Item(b * 4 + i, f"k{b}-{i}", "bytes", buf.getvalue()) for i in range(4)]

    opts = _opts("unused", [], "unused", workers=2, prefetch=3)
    results = _run_local(opts, engine, batches())
    seen = 0
    for first, good, _emb, fails in results:
        assert first == seen * 4 and len(good) == 4 and not fails
        seen += 1
        assert len(pulled) - seen <= 3
    assert seen == 12


def test_cli_help_imports_neither_pyarrow_nor_ray():
    code = ("import sys, clipfast.cli as c; c.build_parser().parse_args(['embed', 'a', 'b', "
            "'--out', 'o']); print('pyarrow' in sys.modules, 'ray' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_cli_embed_exit_code_and_summary(art, folder, tmp_path, capsys):
    rc = main(["embed", str(art), str(folder), "--out", str(tmp_path / "o"), "--quiet",
               "--batch-size", "4"])
    assert rc == 2  # one input failed
    assert "22 of 23 inputs embedded, 1 failed" in capsys.readouterr().err


def _committed(out: Path) -> int:
    j = out / "journal.jsonl"
    return j.read_bytes().count(b"\n") if j.exists() else 0


# Run in the killed job: reports on an inherited pipe "s" once imported (the job not started),
# "c" after each shard commit and "b" after each batch reaches the shard writer.
_REPORTING_JOB = """
import os, sys
from clipfast.embed import job, output
fd = int(sys.argv.pop(1))
commit, add = output.OutputDir.commit, job._ShardWriter.add
def reported_commit(self, *a, **kw):
    rec = commit(self, *a, **kw)
    os.write(fd, b"c")
    return rec
def reported_add(self, *a, **kw):
    add(self, *a, **kw)
    os.write(fd, b"b")
output.OutputDir.commit, job._ShardWriter.add = reported_commit, reported_add
os.write(fd, b"s")
from clipfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_resume(art, src: Path, out: Path, kills: int, seed: int, batch: int, shard: int
                 ) -> dict:
    """Run the CLI and SIGKILL it ``kills`` times (once as soon as it has started, then each
    time after a random number of further batches or commits, as the job itself reports them
    on a pipe: events, not the clock), then let it finish."""
    rng = random.Random(seed)
    args = ["embed", str(art), str(src), "--out", str(out), "--quiet", "--batch-size",
            str(batch), "--shard-size", str(shard)]
    killed = []
    for k in range(kills):
        r, w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-c", _REPORTING_JOB, str(w), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                pass_fds=(w,))
        os.close(w)
        with os.fdopen(r, "rb", buffering=0) as events:
            wanted = 1 if k == 0 else rng.randint(2, 16)  # "s", then batches and commits
            seen = 0
            while seen < wanted and events.read(1):  # blocks until the job reports
                seen += 1
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed.append(_committed(out))
            proc.wait()
    final = subprocess.run([sys.executable, "-m", "clipfast.cli", *args], capture_output=True,
                           text=True)
    return {"killed_at_shards": killed, "rc": final.returncode, "stderr": final.stderr}


def test_kill_9_at_random_points_then_resume_equals_uninterrupted(art, tmp_path):
    src = tmp_path / "imgs"
    make_images(src, 150, seed=3)
    (src / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    run_embed(_opts(art, [src], tmp_path / "ref", batch_size=2, shard_size=2))
    ref_keys, ref = clipfast.read_embeddings(tmp_path / "ref")
    res = _kill_resume(art, src, tmp_path / "out", kills=4, seed=0, batch=2, shard=2)
    assert res["rc"] == 2, res["stderr"]
    assert len(res["killed_at_shards"]) == 4, res  # every kill hit a running job
    assert max(res["killed_at_shards"]) > 0, res  # and some after commits
    keys, emb = clipfast.read_embeddings(tmp_path / "out")
    assert keys == ref_keys and len(set(keys)) == len(keys) == 150
    np.testing.assert_array_equal(emb, ref)
    assert [f["key"] for f in read_failures(tmp_path / "out")] == [str(src / "zz_corrupt.png")]
    assert not list((tmp_path / "out").rglob("*.tmp"))
