"""`clipfast index` builds from the shards `clipfast embed --ray` (Ray Data) wrote: the same
index, key for key and score for score, as from a local job's shards."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("faiss")

from test_search import make_photos  # noqa: E402

from clipfast.embed import EmbedOptions, run_embed  # noqa: E402
from clipfast.search import SearchIndex, build_index, search  # noqa: E402


def test_index_from_ray_written_shards(tmp_path, small_clip_artifact, small_clip_engine):
    make_photos(tmp_path / "photos", 9)
    common = {"artifact": str(small_clip_artifact), "sources": [str(tmp_path / "photos")],
              "batch_size": 4, "shard_size": 4, "progress": False}
    run_embed(EmbedOptions(out=str(tmp_path / "local"), **common))
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True,
             _node_ip_address="127.0.0.1")  # this machine only
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        run_embed(EmbedOptions(out=str(tmp_path / "ray"), ray=True, ray_concurrency=1,
                               **common))
    finally:
        ray.shutdown()
    for name in ("local", "ray"):
        s = build_index([tmp_path / name], tmp_path / f"idx-{name}")
        assert s.count == 9
    local, remote = SearchIndex(tmp_path / "idx-local"), SearchIndex(tmp_path / "idx-ray")
    assert remote.keys == local.keys and remote.digest == local.digest
    a = search(local, small_clip_engine, text="a red car", k=9)
    b = search(remote, small_clip_engine, text="a red car", k=9)
    assert [h.key for h in b] == [h.key for h in a]
    np.testing.assert_allclose([h.score for h in b], [h.score for h in a], atol=1e-6)
