"""One folder listing: `clipfast encode`, `embed`, `bench --images`, `verify --images` and the
export's `--images` all list a folder the same way, in the same order."""

from __future__ import annotations

import io

from PIL import Image


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (10, 20, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_every_folder_listing_is_the_one_listing(tmp_path):
    from clipfast.bench.workload import image_files
    from clipfast.export.verify import images_from_dir
    from clipfast.inputs.listing import expand_images, walk_images

    for rel in ("b/2.jpg", "b/10.jpg", "a.png", "b/.hidden.jpg", ".cache/x.jpg", "B/1.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(_jpeg())
    (tmp_path / "no_suffix").write_bytes(_jpeg())  # an image, found by its header
    (tmp_path / "notes.txt").write_text("not an image")
    want = list(walk_images(str(tmp_path)))
    assert [p[len(str(tmp_path)) + 1:] for p in want] == [
        "B/1.jpg", "a.png", "b/10.jpg", "b/2.jpg", "no_suffix"]
    assert expand_images([str(tmp_path)])[0] == want
    assert [str(p) for p in image_files(tmp_path)] == want
    assert [str(p) for p in images_from_dir(tmp_path)] == want
    assert [str(p) for p in images_from_dir(tmp_path, limit=2)] == want[:2]
