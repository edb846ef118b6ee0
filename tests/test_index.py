"""`reco index` and `MemoryIndex`: ids map to memory rows, shards agree, recall, append, Ray nodes, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from indexing.build import build_index, index_recall
from reco.config import ConfigError
from reco.contracts import IndexManifest, MemoryManifest, embedding_array, index_folder, memory_schema
from reco.demo.synthetic import clustered_embeddings
from reco.search import MemoryIndex, MemoryIndexError
from tests.conftest import make_config, start_local_ray, write_memory

pytestmark = pytest.mark.usefixtures("ray_local")

D = 64


def clustered(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return clustered_embeddings(n, D, seed)


def exact_search(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]


def cfg_for(workdir: Path, **index):
    return make_config(workdir, index=index)


@pytest.fixture(scope="module")
def pairs():
    return clustered(1200, seed=1)


def test_ids_map_back_to_memory_rows_and_fetch(tmp_path, pairs):
    image, text = pairs
    write_memory(tmp_path, image, text, shard_rows=400)
    manifests = build_index(cfg_for(tmp_path, key="Flat", shards=2))
    assert manifests["image"].ntotal == 1200 and len(manifests["image"].shards) == 2
    memory = MemoryIndex.open(str(tmp_path))
    assert (memory.d, memory.ntotal) == (D, 1200)
    x16 = image.astype(np.float16).astype(np.float32)  # the memory stores float16
    queries = image[[5, 450, 1199]]
    scores, ids = memory.search(queries, 5, "image")
    assert ids[:, 0].tolist() == [5, 450, 1199]  # each row finds itself first
    np.testing.assert_array_equal(ids, exact_search(x16, queries, 5))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ x16.T, ids, 1), rtol=1e-5, atol=1e-5)
    # Fetch: any shape, -1 gives zeros, values are the memory's (float16) rows.
    want = np.array([[3, -1], [1199, 400]])
    got = memory.fetch(want, "text")
    assert got.shape == (2, 2, D) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0, 0], text[3].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got[1], text[[1199, 400]].astype(np.float16).astype(np.float32))
    assert not got[0, 1].any()
    # Text search answers in the text index.
    _, tids = memory.search(text[[7]], 1, "text")
    assert tids[0, 0] == 7
    # The embedding copies are memory-mapped .npy files, row = id - id_start.
    copy = np.load(tmp_path / "index/image/embeddings/part-00001.npy", mmap_mode="r")
    assert copy.dtype == np.float16 and copy.shape == (400, D)


def test_one_and_three_shards_agree(tmp_path, pairs):
    image, text = pairs
    write_memory(tmp_path / "a", image, text, shard_rows=200)
    write_memory(tmp_path / "b", image, text, shard_rows=200)
    # Same seed -> same sample and trained quantizer; same nprobe -> the same probed lists.
    one = build_index(cfg_for(tmp_path / "a", key="IVF16,Flat", index_param="nprobe=4", shards=1))
    three = build_index(cfg_for(tmp_path / "b", key="IVF16,Flat", index_param="nprobe=4", shards=3))
    assert len(three["text"].shards) == 3 and three["text"].ntotal == one["text"].ntotal == 1200
    queries = clustered(50, seed=7)[0]
    for modality in ("image", "text"):
        s1, i1 = MemoryIndex.open(str(tmp_path / "a")).search(queries, 10, modality)
        s3, i3 = MemoryIndex.open(str(tmp_path / "b")).search(queries, 10, modality)
        np.testing.assert_array_equal(i1, i3)
        np.testing.assert_allclose(s1, s3, rtol=1e-6)


def test_recall_at_default_budget(tmp_path):
    image, text = clustered(6000, seed=2)
    write_memory(tmp_path, image, text, shard_rows=2000)
    manifests = build_index(cfg_for(tmp_path, shards=2))  # autofaiss chooses key and nprobe
    assert manifests["image"].key.startswith("IVF")
    for modality, x in (("image", image), ("text", text)):
        assert manifests[modality].recall_at_10 >= 0.95
        # Independent check on fresh queries against brute force.
        queries = clustered(200, seed=8)[0 if modality == "image" else 1]
        _, ids = MemoryIndex.open(str(tmp_path)).search(queries, 10, modality)
        exact = exact_search(x.astype(np.float16).astype(np.float32), queries, 10)
        assert index_recall(ids, exact) >= 0.95
    on_disk = json.loads((tmp_path / "index/image/_manifest.json").read_text())
    assert on_disk["shards"][1]["memory_shards"][0]["id_start"] == 4000


def test_append_adds_new_shards_without_retraining(tmp_path, caplog):
    old_img, old_txt = clustered(600, seed=3)
    new_img, new_txt = clustered(600, seed=4)
    write_memory(tmp_path / "inc", old_img, old_txt, shard_rows=300)
    cfg = cfg_for(tmp_path / "inc", key="Flat", shards=2)
    first = build_index(cfg)
    files = {s.path: (tmp_path / "inc/index/image" / s.path).stat().st_mtime_ns for s in first["image"].shards}
    write_memory(tmp_path / "inc", new_img, new_txt, shard_rows=300, append=True)
    with caplog.at_level(logging.INFO, logger="indexing.build"):
        second = build_index(cfg)
    assert second["image"].train_id == first["image"].train_id  # no retraining
    assert second["image"].generation == first["image"].generation + 1
    assert second["image"].ntotal == 1200
    assert "adding 2 memory shards" in caplog.text
    # Queries on the new rows find them.
    _, ids = MemoryIndex.open(str(tmp_path / "inc")).search(new_img[[0, 599]], 1, "image")
    assert ids[:, 0].tolist() == [600, 1199]
    # Equals a from-scratch build on the same rows.
    write_memory(tmp_path / "full", np.concatenate([old_img, new_img]), np.concatenate([old_txt, new_txt]), 300)
    build_index(cfg_for(tmp_path / "full", key="Flat", shards=2))
    queries = clustered(40, seed=9)[1]
    inc = MemoryIndex.open(str(tmp_path / "inc")).search(queries, 10, "text")
    full = MemoryIndex.open(str(tmp_path / "full")).search(queries, 10, "text")
    np.testing.assert_array_equal(inc[1], full[1])
    np.testing.assert_allclose(inc[0], full[0], rtol=1e-6)
    # A re-run with nothing new changes nothing; files of the previous generation are gone.
    assert build_index(cfg)["image"].generation == second["image"].generation
    left = {p.name for p in (tmp_path / "inc/index/image").glob("shard-*")}
    assert left == {s.path for s in second["image"].shards} and len(left) == 2
    assert not (tmp_path / "inc/index/_pieces").exists()
    assert files  # the first generation's files existed


def test_retrain_and_growth_warning(tmp_path, caplog):
    image, text = clustered(400, seed=5)
    write_memory(tmp_path, image[:100], text[:100], shard_rows=100)
    cfg = cfg_for(tmp_path, key="IVF4,Flat", index_param="nprobe=4", growth_warning=2.0)
    first = build_index(cfg)
    write_memory(tmp_path, image[100:], text[100:], shard_rows=100, append=True)
    with caplog.at_level(logging.WARNING, logger="indexing.build"):
        build_index(cfg)
    assert "4.0x the 100 the index was trained on" in caplog.text
    write_memory(tmp_path, image[:100], text[:100], shard_rows=100, append=True)
    retrained = build_index(cfg.model_copy(update={"index": cfg.index.model_copy(update={"retrain": True})}))
    assert retrained["image"].train_id != first["image"].train_id
    assert retrained["image"].trained_on_rows == 500 and retrained["image"].ntotal == 500


def test_interrupted_update_is_refused_then_repaired(tmp_path):
    image, text = clustered(400, seed=12)
    write_memory(tmp_path, image, text, shard_rows=100)
    cfg = cfg_for(tmp_path, key="Flat", shards=2)
    build_index(cfg)
    # A crash between the two manifest writes leaves generations that differ.
    path = tmp_path / "index/image/_manifest.json"
    stale = json.loads(path.read_text())
    stale["generation"] -= 1
    path.write_text(json.dumps(stale))
    with pytest.raises(MemoryIndexError, match="generations 0 and 1.*re-run `reco index`"):
        MemoryIndex.open(str(tmp_path))
    repaired = build_index(cfg)
    assert repaired["image"].generation == repaired["text"].generation == 2 and repaired["image"].ntotal == 400
    _, ids = MemoryIndex.open(str(tmp_path)).search(image[[399]], 1, "image")
    assert ids[0, 0] == 399


@pytest.mark.timeout(300)
def test_two_node_cluster_search_equals_local(tmp_path, pairs):
    image, text = pairs
    write_memory(tmp_path, image, text, shard_rows=400)
    build_index(cfg_for(tmp_path, key="IVF8,Flat", index_param="nprobe=3", shards=3))
    queries = clustered(30, seed=11)[0]
    local = MemoryIndex.open(str(tmp_path))
    want = local.search(queries, 10, "image")
    want_fetch = local.fetch(want[1], "text")
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        remote = MemoryIndex.open(str(tmp_path), distributed=True)
        got = remote.search(queries, 10, "image")
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        np.testing.assert_array_equal(remote.fetch(got[1], "text"), want_fetch)
        nodes = ray.get([s.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                         for s in remote._servers])
        assert len(set(nodes)) == 2  # spread over both nodes
        remote.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
        start_local_ray()


# ---- bad input ------------------------------------------------------------------------------

def test_nan_and_zero_vectors_are_skipped_and_counted(tmp_path):
    image, text = clustered(300, seed=6)
    image[[10, 20]] = 0.0
    text[30] = np.nan
    write_memory(tmp_path, image, text, shard_rows=150)
    manifests = build_index(cfg_for(tmp_path, key="Flat"))
    assert manifests["image"].ntotal == 298 and manifests["text"].ntotal == 299
    assert manifests["image"].skipped.by_reason == {"zero vector": 2}
    assert manifests["text"].skipped.by_reason == {"non-finite vector": 1}
    assert {e["key"] for e in manifests["image"].skipped.examples} == {"10", "20"}
    memory = MemoryIndex.open(str(tmp_path))
    _, ids = memory.search(image[[10, 11]] + 0.01, 300, "image")
    assert 10 not in ids and 20 not in ids and 11 in ids


def test_wrong_width_shard_is_an_error_naming_it(tmp_path):
    image, text = clustered(200, seed=6)
    write_memory(tmp_path, image, text, shard_rows=100)
    bad = tmp_path / "memory/part-00001.parquet"
    other = pa.table({"id": pa.array(np.arange(100, 200), pa.int64()), "key": ["k"] * 100, "caption": ["c"] * 100,
                      "url": ["u"] * 100, "image_embedding": embedding_array(image[100:, :32]),
                      "text_embedding": embedding_array(text[100:, :32])}, schema=memory_schema(32))
    pq.write_table(other, bad)
    with pytest.raises(MemoryIndexError, match=r"part-00001\.parquet: image_embedding has width 32.*d=64"):
        build_index(cfg_for(tmp_path))
    assert not (tmp_path / "index").exists()  # nothing written


def test_missing_shard_and_empty_memory_are_errors(tmp_path):
    with pytest.raises(MemoryIndexError, match="run `reco embed"):
        build_index(cfg_for(tmp_path))
    MemoryManifest(model="reco-tiny", pretrained=None, d=D, dtype="float16").write(str(tmp_path / "memory"))
    with pytest.raises(MemoryIndexError, match="is empty"):
        build_index(cfg_for(tmp_path))
    image, text = clustered(200, seed=6)
    write_memory(tmp_path, image, text, shard_rows=100)
    (tmp_path / "memory/part-00000.parquet").unlink()
    with pytest.raises(MemoryIndexError, match=r"part-00000\.parquet named in the memory manifest is missing"):
        build_index(cfg_for(tmp_path))


def test_missing_or_truncated_index_file_is_an_error(tmp_path):
    image, text = clustered(300, seed=6)
    write_memory(tmp_path, image, text, shard_rows=100)
    manifests = build_index(cfg_for(tmp_path, key="IVF4,Flat", shards=3))
    shard = tmp_path / "index/text" / manifests["text"].shards[1].path
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(MemoryIndexError, match=rf"{shard.name} has \d+ bytes.*truncated"):
        MemoryIndex.open(str(tmp_path))
    shard.unlink()
    with pytest.raises(MemoryIndexError, match=rf"{shard.name} is missing"):
        MemoryIndex.open(str(tmp_path))
    (tmp_path / "index/image/embeddings/part-00002.npy").unlink()
    shard.write_bytes(data)
    with pytest.raises(MemoryIndexError, match=r"part-00002\.npy is missing"):
        MemoryIndex.open(str(tmp_path))


def test_config_errors_before_any_work(tmp_path):
    image, text = clustered(200, seed=6)
    write_memory(tmp_path, image, text, shard_rows=100)
    with pytest.raises(ConfigError, match="index.key='HNSW32'.*IVF"):
        build_index(cfg_for(tmp_path, key="HNSW32"))
    with pytest.raises(ConfigError, match="index.key='Nonsense'"):
        build_index(cfg_for(tmp_path, key="Nonsense"))
    with pytest.raises(ConfigError, match="index.max_memory"):
        build_index(cfg_for(tmp_path, max_memory="lots"))
    with pytest.raises(ConfigError, match="index.shards=3 but the memory has only 2 shards"):
        build_index(cfg_for(tmp_path, shards=3))
    assert not list((tmp_path / "index").glob("*/_manifest.json"))
    build_index(cfg_for(tmp_path, key="Flat"))
    with pytest.raises(ConfigError, match="index.retrain=true"):
        build_index(cfg_for(tmp_path, key="IVF4,Flat"))
    assert IndexManifest.read(index_folder(str(tmp_path), "image")).key == "Flat"
