"""`clipfast embed --ray` past one machine: a simulated cluster (ray.cluster_utils.Cluster: a
head and two worker nodes, each its own raylet, all on 127.0.0.1, one CPU each) gives the local
job's output row for row, and a worker node killed mid-job still yields every input exactly
once. Bounded: 41 tiny images, the tests' tiny CLIP, a watchdog on the job; marked slow (about
a minute, most of it starting the nodes)."""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402
from test_embed import make_images  # noqa: E402

import clipfast  # noqa: E402
from clipfast.embed import EmbedOptions, read_failures, run_embed  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    # A private temp dir: Cluster writes its address to <temp>/ray/ray_current_cluster, where a
    # plain ray.init() elsewhere on this machine would otherwise find and join it.
    tmp = tempfile.mkdtemp(prefix="cfray", dir="/tmp")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", tmp)
    # Ray turns 127.0.0.1 in an address into the host's outward IP, where nodes pinned to
    # 127.0.0.1 do not listen; its "no cluster networking" switch keeps the loopback (read by
    # the node processes from the environment, by this one from the constant).
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray._private.ray_constants as rc

    mp.setattr(rc, "ENABLE_RAY_CLUSTER", False)
    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1,
            "object_store_memory": 100 * 1024 * 1024, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=dict(node))
    workers = [c.add_node(**node) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()
    mp.undo()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def job(small_clip_artifact, tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster-imgs")
    make_images(d, 40, seed=11)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    common = {"artifact": str(small_clip_artifact), "sources": [str(d)], "batch_size": 2,
              "shard_size": 4, "progress": False}
    ref = d.parent / "local"
    run_embed(EmbedOptions(out=str(ref), **common))
    return common, clipfast.read_embeddings(ref), read_failures(ref)


def _watchdog(seconds: int):
    def hung(*_a):
        raise TimeoutError(f"the cluster job did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    return old


def _run(common, out, concurrency=2) -> None:
    old = _watchdog(300)
    try:
        s = run_embed(EmbedOptions(out=str(out), ray=True, ray_concurrency=concurrency,
                                   **common))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert s.complete


def _same(out, ref, ref_fail) -> None:
    keys, emb = clipfast.read_embeddings(out)
    assert keys == ref.keys and len(set(keys)) == len(keys) == 40
    np.testing.assert_allclose(emb, ref.embeddings, atol=1e-6)
    assert read_failures(out) == ref_fail


def test_three_node_cluster_writes_the_local_jobs_rows(cluster, job, tmp_path):
    common, ref, ref_fail = job
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    _run(common, tmp_path / "o")
    _same(tmp_path / "o", ref, ref_fail)


def _actor_nodes() -> set[str]:
    """Nodes running a Ray Data map actor (from the GCS: no dashboard on these nodes)."""
    from ray._private.state import actors

    return {a["Address"]["NodeID"] for a in actors().values()
            if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"]}


def test_a_worker_node_killed_mid_job_still_gives_every_input_once(cluster, job, tmp_path):
    c, workers = cluster
    common, ref, ref_fail = job
    killed: list[str] = []

    def kill_a_worker_with_an_actor():
        end = time.monotonic() + 240
        while time.monotonic() < end and not killed:
            with_actor = _actor_nodes()
            for w in workers:
                if w.node_id in with_actor:
                    c.remove_node(w, allow_graceful=False)
                    killed.append(w.node_id)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=kill_a_worker_with_an_actor, daemon=True)
    t.start()
    _run(common, tmp_path / "o")
    t.join(timeout=10)
    assert killed, "no worker node held an actor while the job ran"
    _same(tmp_path / "o", ref, ref_fail)
