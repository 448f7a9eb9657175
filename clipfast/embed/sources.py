"""What ``clipfast embed`` reads: folders, list files, webdataset tar shards and tables, turned
into one deterministic stream of items.

Every item gets an ordinal, its position in that stream. The order is a function of the
sources alone (sorted folder walks, file order in a tar, row order in a table), so a resumed job
enumerates the same items with the same ordinals and skips the ones already committed. A
``Plan`` (item count and a hash of every key) is taken first: it sizes the progress bar and lets
a resumed job refuse a source whose content changed under it.

Nothing here holds the whole dataset: items are produced one by one, and the payload of an
item the caller skips (already embedded) is not read where that can be avoided (tar members).

Every item whose payload is read also gets a fingerprint: what its content was when it was
read (a file: size, mtime_ns and inode; bytes and texts: a hash of them). The job stores it
with each embedding and compares it on resume, so a changed input is never mixed in.

Every input is accounted for: a truncated tar, a CSV with an unbalanced quote, a table that is
not UTF-8 are errors naming the file; tar members that are not regular files (symbolic links,
devices, FIFOs) are failures with the reason; hard links are read as the file they link to.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipfast.errors import ClipfastError
from clipfast.inputs.listing import walk_images

LIST_SUFFIXES = (".txt", ".lst", ".list")
TAR_SUFFIXES = (".tar",)
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
# Columns tried, in order, when --image-column is not given.
IMAGE_COLUMNS = ("image", "image_path", "path", "filepath", "file", "jpg", "png", "img")
# webdataset members taken as the image of a sample, in this order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "jfif")


@dataclass
class Item:
    """One input. kind: "path" (value is a file path), "bytes" (encoded image), "text", or
    "error" (value is the reason it cannot be embedded: a row without an image, ...)."""

    ordinal: int
    key: str
    kind: str
    value: Any = None
    fingerprint: str | None = None


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def fingerprint(item: Item) -> str:
    """What the item's content is now (see the module's docstring)."""
    if item.kind == "path":
        try:
            st = os.stat(item.value)
        except OSError as e:
            return f"file:unreadable:{e.errno}"
        return f"file:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    if item.kind == "bytes":
        return "bytes:" + _digest(bytes(item.value))
    if item.kind == "text":
        return "text:" + _digest(str(item.value).encode("utf-8", "surrogatepass"))
    return "error:" + _digest(str(item.value).encode("utf-8", "surrogatepass"))


@dataclass
class SourceSpec:
    """One SOURCE argument resolved: kind is "folder", "list", "tar" or "table"."""

    kind: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, **({"options": self.options}
                                                           if self.options else {})}


@dataclass
class Plan:
    """The enumeration's shape: how many items, and a sha256 of their keys in order."""

    items: int
    keys_sha256: str


def _expand(arg: str) -> list[str]:
    """A SOURCE argument -> the paths it names (brace patterns such as ``shard-{000..009}.tar``
    expanded with braceexpand, webdataset's own notation)."""
    if "{" in arg and "}" in arg:
        try:
            from braceexpand import braceexpand
        except ImportError as e:
            raise ClipfastError("embed: brace patterns need braceexpand: pip install "
                                "'clipfast[embed]'") from e
        return list(braceexpand(arg))
    return [arg]


def resolve_sources(args: list[str], *, text_column: str | None = None,
                    image_column: str | None = None, key_column: str | None = None
                    ) -> list[SourceSpec]:
    """SOURCE arguments -> specs, in the order given; raises ClipfastError for a missing path or
    a file of no known kind."""
    if not args:
        raise ClipfastError("embed: no SOURCE given (folders, list files, .tar shards, or "
                            ".parquet / .csv / .jsonl tables)")
    specs: list[SourceSpec] = []
    for arg in args:
        for p in _expand(arg):
            path = Path(p)
            if not path.exists():
                raise ClipfastError(f"embed: source {p} does not exist")
            full = str(path.resolve())
            suffix = path.suffix.lower()
            if path.is_dir():
                if text_column:
                    raise ClipfastError(f"embed: --text-column needs tables or tar shards; {p} "
                                        "is a folder of images")
                specs.append(SourceSpec("folder", full))
            elif suffix in TAR_SUFFIXES:
                specs.append(SourceSpec("tar", full, {"text_ext": text_column}
                                        if text_column else {}))
            elif suffix in TABLE_SUFFIXES:
                opts = {k: v for k, v in (("text_column", text_column),
                                          ("image_column", image_column),
                                          ("key_column", key_column)) if v}
                specs.append(SourceSpec("table", full, opts))
            elif suffix in LIST_SUFFIXES:
                if text_column:
                    raise ClipfastError(f"embed: --text-column needs tables or tar shards; {p} "
                                        "is a list of image paths")
                specs.append(SourceSpec("list", full))
            else:
                raise ClipfastError(
                    f"embed: cannot tell what {p} is: expected a folder, a list file "
                    f"({', '.join(LIST_SUFFIXES)}), a webdataset shard (.tar) or a table "
                    f"({', '.join(TABLE_SUFFIXES)})")
    return specs


# --------------------------------------------------------------------------- folders


def _walk_folder(root: str) -> Iterator[str]:
    """Image files under ``root`` in the listing's order (``clipfast.inputs.listing``, the one
    ``clipfast encode`` uses): the order keys a resumable output."""
    return walk_images(root)


def _read_list(path: str) -> Iterator[str]:
    """Paths listed one per line (blank lines and lines starting with '#' skipped); relative
    paths are taken relative to the list file's folder."""
    base = os.path.dirname(path)
    with _open_text(path) as f:
        for line in _lines(f, path):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            yield line if os.path.isabs(line) else os.path.join(base, line)


def _open_text(path: str, **kw):
    try:
        return open(path, encoding="utf-8", **kw)
    except OSError as e:
        raise ClipfastError(f"embed: cannot read {path}: {e.strerror}; check the path and its "
                            "permissions") from e


def _not_utf8(path: str, line: int, e: UnicodeDecodeError) -> ClipfastError:
    return ClipfastError(
        f"embed: {path} is not UTF-8 text (near line {line}: {e.reason} at byte "
        f"{e.object[e.start:e.start + 1]!r}); convert it, e.g. iconv -f latin1 -t utf-8 "
        f"{path} > fixed{Path(path).suffix}")


def _lines(f, path: str) -> Iterator[str]:
    """A text file's lines; a decoding error names the file and line."""
    n = 0
    try:
        for n, line in enumerate(f, start=1):  # noqa: B007 - n is read in the handler
            yield line
    except UnicodeDecodeError as e:
        raise _not_utf8(path, n + 1, e) from e  # decoded in chunks: near that line
    except OSError as e:
        raise ClipfastError(f"embed: cannot read {path}: {e}") from e


# --------------------------------------------------------------------------- tar shards


def _wds_split(name: str) -> tuple[str, str]:
    """webdataset's key rule: the key is the member path up to the first '.' of its base name,
    the rest is the extension (``a/b.c.jpg`` -> ``a/b``, ``c.jpg``)."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _member_kind(m: tarfile.TarInfo) -> str | None:
    """Why a member holds no data of its own, or None for a regular file or a hard link (read
    as the member it links to)."""
    if m.isfile() or m.islnk():
        return None
    if m.issym():
        return f"a symbolic link (to {m.linkname!r})"
    if m.ischr() or m.isblk():
        return "a device"
    if m.isfifo():
        return "a FIFO"
    return f"not a regular file (tar type {m.type!r})"


def _check_tar_end(tf: tarfile.TarFile, path: str, last: str | None) -> None:
    """tarfile ends its member loop silently at a truncated header or past the end of the
    file; a whole archive ends with its end-of-archive marker (two zero blocks), which is
    checked here so a cut shard is an error, not fewer samples."""
    fo = tf.fileobj
    fo.seek(tf.offset)
    if fo.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
        raise ClipfastError(f"embed: tar shard {path} is truncated or damaged after member "
                            f"{last!r} (no end-of-archive marker at byte {tf.offset}); copy the "
                            "shard again, or leave it out")


def _tar_samples(path: str, want: Callable[[int], bool], first: int, text_ext: str | None
                 ) -> Iterator[tuple[str, str, Any]]:
    """(key, kind, value) per webdataset sample of one local shard, in file order.

    Python's tarfile reads local shards sequentially; members of samples the caller skips are
    not read (tarfile seeks past their data). ``want(ordinal)`` says whether the sample with
    that ordinal (``first`` + its position) needs its payload. A member that is not a regular
    file makes its sample a failure (when it is the member the sample would be read from).
    """
    try:
        tf = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as e:
        raise ClipfastError(f"embed: cannot open tar shard {path}: {e}") from e
    with tf:
        current: str | None = None
        members: dict[str, tarfile.TarInfo] = {}
        ordinal = first

        def emit() -> tuple[str, str, Any]:
            load = want(ordinal)
            exts = [text_ext] if text_ext else list(WDS_IMAGE_EXTS)
            for ext in exts:
                m = members.get(ext)
                if m is None:
                    continue
                why = _member_kind(m)
                if why is not None:
                    return current, "error", f"member {m.name} is {why}, not a regular file"
                if not load:
                    return current, "text" if text_ext else "bytes", None
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                if text_ext:
                    try:
                        return current, "text", data.decode("utf-8")
                    except UnicodeDecodeError as e:
                        return current, "error", f"member .{ext} is not UTF-8 text ({e})"
                return current, "bytes", data
            what = f"a .{text_ext} member" if text_ext else "an image member (" + ", ".join(
                f".{e}" for e in WDS_IMAGE_EXTS[:4]) + ", ...)"
            return current, "error", f"sample has no {what}; members: " + ", ".join(
                sorted(members))

        last = None
        try:
            for m in tf:
                last = m.name
                if m.isdir():
                    continue
                key, ext = _wds_split(m.name)
                if key.split("/")[-1] == "" or not ext:
                    continue
                if key != current:
                    if current is not None:
                        yield emit()
                        ordinal += 1
                    current, members = key, {}
                members.setdefault(ext, m)
            _check_tar_end(tf, path, last)
            if current is not None:
                yield emit()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ClipfastError(f"embed: tar shard {path} is unreadable after {current!r}: {e}"
                                ) from e


# --------------------------------------------------------------------------- tables


def _pick_image_column(names: list[str], path: str) -> str:
    for c in IMAGE_COLUMNS:
        if c in names:
            return c
    raise ClipfastError(f"embed: table {path} has no image column among {list(IMAGE_COLUMNS)} "
                        f"(its columns: {names}); name one with --image-column, or embed texts "
                        "with --text-column")


def _table_batches(path: str, columns: Callable[[list[str]], list[str]]
                   ) -> Iterator[dict[str, list]]:
    """Rows of a parquet / CSV / JSONL table in order, as column dicts of at most a few thousand
    rows (never the whole table)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            cols = columns(pf.schema_arrow.names)
            for batch in pf.iter_batches(batch_size=1024, columns=cols):
                yield batch.to_pydict()
        except (OSError, pa.ArrowException) as e:
            raise ClipfastError(f"embed: cannot read parquet table {path}: {e}; check that it "
                                "is a whole parquet file (copy it again if it was cut)") from e
    elif suffix == ".csv":
        yield from _csv_batches(path, columns)
    else:  # JSON lines, streamed line by line
        with _open_text(path) as f:
            first = True
            cols: list[str] = []
            rows = {}
            for n, line in enumerate(_lines(f, path), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ClipfastError(f"embed: {path} line {n} is not JSON: {e}") from e
                if not isinstance(obj, dict):
                    raise ClipfastError(f"embed: {path} line {n}: expected an object, got "
                                        f"{type(obj).__name__}")
                if first:
                    cols = columns(list(obj))
                    rows = {c: [] for c in cols}
                    first = False
                for c in cols:
                    rows[c].append(obj.get(c))
                if len(rows[cols[0]]) >= 1024:
                    yield rows
                    rows = {c: [] for c in cols}
            if rows and rows[cols[0]]:
                yield rows


def _csv_batches(path: str, columns: Callable[[list[str]], list[str]]
                 ) -> Iterator[dict[str, list]]:
    """A CSV's rows, strictly: an unbalanced quote, or a row with more or fewer fields than
    the header, is an error naming the line (a lenient reader merges the rows that follow)."""
    with _open_text(path, newline="") as f:
        reader = csv.reader(_lines(f, path), strict=True)
        line = 1
        try:
            header = next(reader, [])
            cols = columns(list(header))
            idx = [header.index(c) for c in cols]
            rows: dict[str, list] = {c: [] for c in cols}
            line = reader.line_num + 1
            for rec in reader:
                if rec and len(rec) != len(header):
                    raise ClipfastError(
                        f"embed: {path} line {line}: {len(rec)} fields, the header has "
                        f"{len(header)} (an unbalanced quote merges lines); fix the file")
                if rec:
                    for c, i in zip(cols, idx):
                        rows[c].append(rec[i] or None)
                line = reader.line_num + 1
                if len(rows[cols[0]]) >= 1024:
                    yield rows
                    rows = {c: [] for c in cols}
        except csv.Error as e:
            raise ClipfastError(f"embed: {path}: the record starting at line {line} is not "
                                f"valid CSV ({e}; an unbalanced quote?); fix the file") from e
        if rows[cols[0]]:
            yield rows


def _table_items(spec: SourceSpec, load: bool) -> Iterator[tuple[str, str, Any]]:
    """(key, kind, value) per table row. Keys: the --key-column, else the image path for a
    path column, else ``<file name>:<row>``."""
    opts = spec.options
    text_col, key_col = opts.get("text_column"), opts.get("key_column")
    chosen: dict[str, str] = {}

    def columns(names: list[str]) -> list[str]:
        if text_col:
            if text_col not in names:
                raise ClipfastError(f"embed: table {spec.path} has no column {text_col!r} "
                                    f"(--text-column); its columns: {names}")
            chosen["data"] = text_col
        else:
            col = opts.get("image_column")
            if col and col not in names:
                raise ClipfastError(f"embed: table {spec.path} has no column {col!r} "
                                    f"(--image-column); its columns: {names}")
            chosen["data"] = col or _pick_image_column(names, spec.path)
        if key_col and key_col not in names:
            raise ClipfastError(f"embed: table {spec.path} has no column {key_col!r} "
                                f"(--key-column); its columns: {names}")
        return [chosen["data"]] + ([key_col] if key_col and key_col != chosen["data"] else [])

    base = os.path.dirname(spec.path)
    name = os.path.basename(spec.path)
    row = 0
    for batch in _table_batches(spec.path, columns):
        data = batch[chosen["data"]]
        keys = batch.get(key_col) if key_col else None
        for i, v in enumerate(data):
            key = None if keys is None or keys[i] is None else str(keys[i])
            if isinstance(v, dict):  # Hugging Face datasets' Image feature: {bytes, path}
                v = v.get("bytes") or v.get("path")
            if text_col:
                kind, value = ("text", v) if isinstance(v, str) else (
                    "error", f"column {text_col!r} holds {type(v).__name__}, not text")
            elif isinstance(v, (bytes, bytearray)):
                kind, value = ("bytes", bytes(v)) if v else ("error", "empty image bytes")
            elif isinstance(v, str) and v:
                kind, value = "path", v if os.path.isabs(v) else os.path.join(base, v)
                key = key or v
            else:
                kind, value = "error", (f"column {chosen['data']!r} holds "
                                        f"{type(v).__name__}, not image bytes or a path")
            yield key or f"{name}:{row}", kind, value if load else None
            row += 1


# --------------------------------------------------------------------------- one stream


def iter_items(specs: list[SourceSpec], want: Callable[[int], bool] | None = None
               ) -> Iterator[Item]:
    """Every item of ``specs`` in order with its ordinal. ``want(ordinal)`` False: the item is
    still yielded (its key counts) but its payload need not be read (value may be None)."""
    want = want or (lambda _o: True)
    ordinal = 0
    for spec in specs:
        if spec.kind == "folder":
            for p in _walk_folder(spec.path):
                yield _item(ordinal, p, "path", p, want(ordinal))
                ordinal += 1
        elif spec.kind == "list":
            for p in _read_list(spec.path):
                yield _item(ordinal, p, "path", p, want(ordinal))
                ordinal += 1
        elif spec.kind == "tar":
            for key, kind, value in _tar_samples(spec.path, want, ordinal,
                                                 spec.options.get("text_ext")):
                yield _item(ordinal, key, kind, value, want(ordinal))
                ordinal += 1
        elif spec.kind == "table":
            # Table rows are read in column batches anyway; only a skipped row's payload is
            # dropped (it costs the read, not the decode).
            for key, kind, value in _table_items(spec, load=True):
                w = want(ordinal)
                yield _item(ordinal, key, kind, value if w else None, w)
                ordinal += 1
        else:  # pragma: no cover - resolve_sources only makes the kinds above
            raise ClipfastError(f"embed: unknown source kind {spec.kind!r}")


def _item(ordinal: int, key: str, kind: str, value: Any, wanted: bool) -> Item:
    item = Item(ordinal, key, kind, value)
    if wanted:
        item.fingerprint = fingerprint(item)
    return item


def plan(specs: list[SourceSpec]) -> Plan:
    """Count the items and hash their keys (one pass, payloads not read)."""
    h = hashlib.sha256()
    n = 0
    for item in iter_items(specs, want=lambda _o: False):
        h.update(item.key.encode("utf-8", "surrogateescape") + b"\n")
        n += 1
    return Plan(n, h.hexdigest())
