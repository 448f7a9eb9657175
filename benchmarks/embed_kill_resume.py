"""Kill `clipfast embed` with SIGKILL at random points, resume, compare with an uninterrupted run.

    python benchmarks/embed_kill_resume.py [--artifact ARTIFACT] [--kills 10] [--seed 0]
                                           [--change-every K]

Without --artifact, a tiny random-weight transformers CLIP (tests/hf_models.py, 64 px input)
is exported to a temporary folder: the check is about the output folder, not the model. The
dataset: 1500 PNG/JPEG images of assorted sizes in nested folders plus 3 corrupt files; batch
4, shard 8 (188 shards). The first kill lands during start-up, the others after a random
number (1-12) of further shard commits plus a random 0-0.25 s, so they fall anywhere in the
commit cycle. After each kill the folder is inspected (committed shards, a torn journal tail,
orphan shard files, temporaries) to show where it stopped. Passes when the resumed output
equals the uninterrupted one: same keys in the same order, bitwise-equal embeddings, 0
duplicates, 0 lost, the corrupt files in the failures table.

--change-every K: after every K-th kill, two images are rewritten under their names (new
pixels), one already embedded and one not yet. The next plain run must be refused, naming the
changed input (nothing mixed); the job then goes on with --reembed-changed, and the final
output must equal an uninterrupted run on the final content.
Writes benchmarks/results/embed-kill-resume[-changed].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def make_dataset(d: Path, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(x) for x in rng.integers(40, 300, 2))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sub = d / f"part{i % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(sub / f"img{i:04d}.{'jpg' if i % 2 else 'png'}")
    corrupt = [d / "part1" / "bad_a.jpg", d / "part3" / "bad_b.png", d / "bad_c.jpg"]
    corrupt[0].write_bytes(b"\xff\xd8\xff\xe0 truncated")
    corrupt[1].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    good = Image.new("RGB", (300, 200))
    good.save(corrupt[2], quality=90)
    data = corrupt[2].read_bytes()
    corrupt[2].write_bytes(data[: len(data) // 3])  # a truncated JPEG
    return [str(p) for p in corrupt]


def inspect(out: Path) -> dict:
    j = out / "journal.jsonl"
    data = j.read_bytes() if j.exists() else b""
    lines = data.count(b"\n")
    named = set()
    for line in data.split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        named.add(rec["file"])
        if rec.get("failures_file"):
            named.add(rec["failures_file"])
    files = {f"{p.parent.name}/{p.name}" for p in out.glob("*/part-*.parquet")}
    return {"committed_shards": lines, "torn_journal_tail": bool(data) and not
            data.endswith(b"\n"), "orphan_shard_files": len(files - named),
            "temp_files": len(list(out.rglob("*.tmp")))}


def rewrite(path: Path, rng: random.Random) -> None:
    """New pixels under the same name (and the same size in pixels)."""
    with Image.open(path) as im:
        size = im.size
    arr = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (size[1], size[0], 3),
                                                                  dtype=np.uint8)
    Image.fromarray(arr).save(path)


def committed(out: Path) -> int:
    j = out / "journal.jsonl"
    return j.read_bytes().count(b"\n") if j.exists() else 0


def export_tiny(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import save_clip

    from clipfast.export.pipeline import ExportOptions, run_export

    src = save_clip(work / "src", "small")
    return run_export(ExportOptions(model=f"transformers:{src}", pretrained=None,
                                    out=work / "art", progress=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--change-every", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "benchmarks" / "results" / (
        "embed-kill-resume" + ("-changed" if args.change_every else "")))

    import clipfast
    from clipfast.embed import EmbedOptions, read_failures, run_embed

    work = Path(tempfile.mkdtemp(prefix="embed-kill-"))
    art = Path(args.artifact) if args.artifact else export_tiny(work)
    src = work / "data"
    corrupt = make_dataset(src, args.images, args.seed)
    common = ["--batch-size", "4", "--shard-size", "8", "--quiet"]
    t0 = time.perf_counter()
    run_embed(EmbedOptions(artifact=str(art), sources=[str(src)], out=str(work / "ref"),
                           batch_size=4, shard_size=8, progress=False))
    ref_seconds = time.perf_counter() - t0
    ref_keys, ref = clipfast.read_embeddings(work / "ref")

    out = work / "out"
    cmd = [sys.executable, "-m", "clipfast.cli", "embed", str(art), str(src), "--out", str(out),
           *common]
    rng = random.Random(args.seed)
    kills = []
    changes = []
    reembed: list[str] = []
    while len(kills) < args.kills:
        proc = subprocess.Popen(cmd + reembed, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        t_start = time.perf_counter()
        if not kills:
            # The first kill lands during start-up (enumeration, Engine load).
            time.sleep(rng.uniform(0.2, 1.5))
        else:
            # Later ones after a random number of further commits plus a random sliver of
            # time, so they fall anywhere in the commit cycle (decode, write, rename, append).
            target = committed(out) + rng.randint(1, 12)
            while committed(out) < target and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is not None:
            raise SystemExit(f"the job finished before kill {len(kills) + 1}: use more --images")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append({"after_s": round(time.perf_counter() - t_start, 2), **inspect(out)})
        print(f"kill {len(kills)}: {kills[-1]}", file=sys.stderr)
        if args.change_every and len(kills) % args.change_every == 0:
            done = clipfast.read_embeddings(out, require_complete=False).keys
            if not done:
                continue
            old = rng.choice(done)
            new = rng.choice(sorted(set(ref_keys) - set(done)))
            for k in (old, new):
                rewrite(Path(k), rng)
            refused = subprocess.run(cmd, capture_output=True, text=True)
            changes.append({"after_kill": len(kills), "embedded_one": old,
                            "pending_one": new, "plain_rerun_exit": refused.returncode,
                            "refused_naming_it": refused.returncode == 1 and old in
                            refused.stderr and "changed" in refused.stderr})
            print(f"change: {changes[-1]}", file=sys.stderr)
            reembed = ["--reembed-changed"]
    final = subprocess.run(cmd + reembed, capture_output=True, text=True)
    if changes:  # the reference is an uninterrupted run on the final content
        run_embed(EmbedOptions(artifact=str(art), sources=[str(src)], out=str(work / "ref2"),
                               batch_size=4, shard_size=8, progress=False))
        ref_keys, ref = clipfast.read_embeddings(work / "ref2")
    keys, emb = clipfast.read_embeddings(out)
    fails = read_failures(out)
    manifest = json.loads((out / "manifest.json").read_text())
    checks = {
        "same_keys_same_order": keys == ref_keys,
        "duplicates": len(keys) - len(set(keys)),
        "lost": len(set(ref_keys) - set(keys)),
        "embeddings_bitwise_equal": bool(emb.shape == ref.shape and np.array_equal(emb, ref)),
        "failures_are_the_corrupt_files": sorted(f["key"] for f in fails) == sorted(corrupt),
        "final_exit_code": final.returncode,  # 2: some inputs failed (the corrupt ones)
        "temp_files_left": len(list(out.rglob("*.tmp"))),
    }
    if changes:
        checks["changes_refused_naming_the_input"] = all(c["refused_naming_it"]
                                                         for c in changes)
    passed = (checks["same_keys_same_order"] and checks["duplicates"] == 0
              and checks["lost"] == 0 and checks["embeddings_bitwise_equal"]
              and checks["failures_are_the_corrupt_files"] and final.returncode == 2
              and checks["temp_files_left"] == 0
              and checks.get("changes_refused_naming_the_input", True))
    doc = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "job": " ".join(["clipfast", "embed", "ART", "DATA", "--out", "OUT", *common]),
           "inputs": len(ref_keys) + len(fails), "embedded": len(ref_keys),
           "shards": manifest["counts"]["shards"], "uninterrupted_seconds": round(ref_seconds, 2),
           "kills": kills, "source_changes": changes, "checks": checks, "passed": passed}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    md = ["# clipfast embed: kill -9 and resume", "",
          f"Command: `{doc['command']}`; job: `{doc['job']}` on {doc['inputs']} inputs "
          f"({len(corrupt)} corrupt), {doc['shards']} shards.", "",
          "| kill | after (s) | committed shards | torn journal tail | orphan shard files | "
          "temp files |", "|---|---|---|---|---|---|"]
    md += [f"| {i + 1} | {k['after_s']} | {k['committed_shards']} | {k['torn_journal_tail']} | "
           f"{k['orphan_shard_files']} | {k['temp_files']} |" for i, k in enumerate(kills)]
    if changes:
        md += ["", "| after kill | rewritten (embedded) | rewritten (pending) | plain rerun "
               "exit | refused naming it |", "|---|---|---|---|---|"]
        md += [f"| {c['after_kill']} | {Path(c['embedded_one']).name} | "
               f"{Path(c['pending_one']).name} | {c['plain_rerun_exit']} | "
               f"{c['refused_naming_it']} |" for c in changes]
    md += ["", "| check | result |", "|---|---|",
           *[f"| {k} | {v} |" for k, v in checks.items()], "",
           f"**{'PASSED' if passed else 'FAILED'}**"]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
