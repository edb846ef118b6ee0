"""`retrieve` and `reco neighbors`: the query's own pair and its image near-duplicates are
never neighbours, other pairs with the same caption are; shards resume; the search and
fusion ablations; bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexing.build import build_index
from indexing.neighbors import ShardSearcher, _fingerprint, neighbors
from reco.contracts import NeighborsManifest, embeddings_to_numpy, nested_to_numpy
from reco.search import MemoryIndex, retrieve
from reco.config import ConfigError
from tests.conftest import make_config, write_memory

pytestmark = pytest.mark.usefixtures("ray_local")

D, K, N = 16, 5, 240
NEAR_DUPS = [1, 2]
"""Pairs whose images nearly copy pair 0's image (cosine ~0.99): never its neighbours."""
SAME_CAPTION = [3, 4, 5]
"""Pairs with pair 0's caption (identical text embedding) but other images: text neighbours."""
CROWD = list(range(200, 240))
"""40 near-copies of pair 199's image: more than k + margin, so the search must widen."""


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def memory_pairs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((12, D))
    labels = rng.integers(0, 12, N)
    image = _unit(centres[labels] + 0.6 * rng.standard_normal((N, D)))
    text = _unit(image + 0.4 * rng.standard_normal((N, D)))
    image[NEAR_DUPS] = _unit(image[0] + 0.03 * rng.standard_normal((len(NEAR_DUPS), D)))
    image[SAME_CAPTION] = _unit(image[0] + 0.5 * rng.standard_normal((len(SAME_CAPTION), D)))
    text[SAME_CAPTION] = text[0]
    image[CROWD] = _unit(image[199] + 0.03 * rng.standard_normal((len(CROWD), D)))
    return image, text


def config(workdir: Path, **neighbors_cfg):
    return make_config(workdir, index={"key": "Flat"}, neighbors={"k": K, "margin": 3, **neighbors_cfg})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from tests.conftest import start_local_ray

    start_local_ray()
    path = tmp_path_factory.mktemp("neighbors")
    write_memory(path, *memory_pairs(), shard_rows=80)
    build_index(config(path))
    return path


def brute_force(image: np.ndarray, text: np.ndarray, q: int, modality: str, threshold: float) -> list[int]:
    """The k admissible neighbours of pair q, by exact similarity over the whole memory."""
    x = image if modality == "image" else text
    sims = x @ x[q]
    ok = (np.arange(N) != q) & (image @ image[q] <= threshold)
    return [int(i) for i in np.argsort(-sims, kind="stable") if ok[i]][:K]


def test_retrieve_drops_self_and_near_duplicates_only(workdir):
    memory = MemoryIndex.open(str(workdir))
    image, text = (x.astype(np.float16).astype(np.float32) for x in memory_pairs())
    ids = np.arange(N)
    common = dict(k=K, query_images=image, query_ids=ids, dedup_threshold=0.95, margin=3)
    img_ids, img_texts = retrieve(memory, image, "image", **common)
    txt_ids, txt_images = retrieve(memory, text, "text", **common)
    for q in range(N):
        for x, got in ((image, img_ids[q]), (text, txt_ids[q])):
            want = brute_force(image, text, q, "image" if x is image else "text", 0.95)
            # Compared by similarity: ties (identical captions) may come in any order.
            np.testing.assert_allclose(x[got] @ x[q], x[want] @ x[q], atol=1e-5, err_msg=str(q))
            assert q not in got and (image[got] @ image[q] <= 0.95).all(), q
    assert not set(NEAR_DUPS) & (set(img_ids[0]) | set(txt_ids[0]))
    assert set(SAME_CAPTION) <= set(txt_ids[0]), "identical captions are not duplicates"
    # The crowd of near-copies is skipped by widening the search, and k neighbours remain.
    assert (img_ids[199] >= 0).all() and not set(CROWD) & set(img_ids[199])
    # Cross-modal gather: the texts of the image neighbours, the images of the text neighbours.
    np.testing.assert_allclose(img_texts, text[img_ids], atol=1e-6)
    np.testing.assert_allclose(txt_images, image[txt_ids], atol=1e-6)


def test_retrieve_excludes_ids_and_pads_when_too_few_remain(workdir):
    memory = MemoryIndex.open(str(workdir))
    image, _ = memory_pairs()
    got, _ = retrieve(memory, image[:1], "image", K, exclude_ids=np.array(NEAR_DUPS))
    assert got[0, 0] == 0 and not set(NEAR_DUPS) & set(got[0])  # no query_ids: the pair itself may come
    # Only 3 admissible pairs in the whole memory: the search widens to all of it, then pads.
    ids, emb = retrieve(memory, image[:2], "image", K, exclude_ids=np.setdiff1d(np.arange(N), [10, 11, 12]))
    assert [sorted(row[:3]) for row in ids.tolist()] == [[10, 11, 12]] * 2
    assert (ids[:, 3:] == -1).all() and not emb[:, 3:].any() and emb[:, :3].any()


def test_stage_writes_resumable_shards(workdir):
    cfg = config(workdir)
    manifest = neighbors(cfg)
    out = workdir / "neighbors" / "train"
    assert (manifest.total_rows, manifest.k, manifest.d, len(manifest.shards)) == (N, K, D, 3)
    table = pq.read_table(out / "part-00000.parquet")
    assert table["id"].to_pylist() == list(range(80))
    image, text = (x.astype(np.float16).astype(np.float32) for x in memory_pairs())
    nn_text_ids = np.array(table["nn_text_ids"].to_pylist())
    nn_image_ids = np.array(table["nn_image_ids"].to_pylist())
    np.testing.assert_allclose(nested_to_numpy(table["nn_text"]), text[nn_text_ids], atol=1e-3)
    np.testing.assert_allclose(nested_to_numpy(table["nn_image"]), image[nn_image_ids], atol=1e-3)
    np.testing.assert_allclose(embeddings_to_numpy(table["image_embedding"]), image[:80])
    assert sorted(nn_text_ids[0]) == sorted(brute_force(image, text, 0, "image", 0.95))
    assert set(SAME_CAPTION) <= set(nn_image_ids[0])

    # A re-run skips everything; a lost shard is redone alone.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert neighbors(cfg) == manifest
    (out / "part-00001.parquet").unlink()
    assert neighbors(cfg).total_rows == N
    assert (out / "part-00000.parquet").stat().st_mtime_ns == mtimes["part-00000.parquet"]
    assert (out / "part-00001.parquet").exists()


def test_other_input_split_is_deduplicated_by_image(workdir, tmp_path):
    """A split that is not the memory: no id exclusion, but a copy of a memory image is dropped."""
    image, text = memory_pairs()
    write_memory(tmp_path, image[:40], text[:40], shard_rows=40)
    cfg = config(workdir, input=str(tmp_path / "memory"), split="other")
    manifest = neighbors(cfg)
    assert NeighborsManifest.read(str(workdir / "neighbors" / "other")) == manifest
    table = pq.read_table(workdir / "neighbors" / "other" / "part-00000.parquet")
    first = table["nn_text_ids"].to_pylist()[0]
    assert 0 not in first and not set(NEAR_DUPS) & set(first)


@pytest.mark.parametrize("case, message", [
    ("no memory", "no finished memory"),
    ("no index", "no image index"),
    ("no input", "holds no finished memory-format split"),
    ("empty input", "is empty"),
    ("k too large", "holds only 240 pairs"),
])
def test_bad_input_is_a_clear_error(workdir, tmp_path, case, message):
    cfg = config(workdir)
    if case == "no memory":
        cfg = config(tmp_path)
    elif case == "no index":
        write_memory(tmp_path, *memory_pairs(), shard_rows=240)
        cfg = config(tmp_path)
    elif case == "no input":
        cfg = config(workdir, input=str(tmp_path / "nothing"))
    elif case == "empty input":
        write_memory(tmp_path, np.zeros((0, D), np.float32), np.zeros((0, D), np.float32), shard_rows=1)
        cfg = config(workdir, input=str(tmp_path / "memory"))
    elif case == "k too large":
        cfg = config(workdir, k=240)
    with pytest.raises(ConfigError, match=message):
        neighbors(cfg)


def test_cross_search_finds_the_pairs_whose_text_is_nearest_to_the_image(workdir):
    """search=cross: an image query searches the memory's texts (and a text query its
    images); what is gathered is `fuse`'s choice, independent of the search."""
    memory = MemoryIndex.open(str(workdir))
    image, text = (x.astype(np.float16).astype(np.float32) for x in memory_pairs())
    q = np.array([7, 100])
    common = dict(k=K, query_ids=q, margin=3, search="cross")
    ids, tokens = retrieve(memory, image[q], "image", **common)
    for row, query in enumerate(q):
        sims = text @ image[query]
        want = [int(i) for i in np.argsort(-sims, kind="stable") if i != query][:K]
        np.testing.assert_allclose(sims[ids[row]], sims[want], atol=1e-5)
    assert not np.array_equal(ids, retrieve(memory, image[q], "image", K, query_ids=q, margin=3)[0])
    np.testing.assert_allclose(tokens, text[ids], atol=1e-6)  # fuse=cross: still their texts
    text_ids, _ = retrieve(memory, text[q], "text", **common)
    sims = image @ text[q[0]]
    np.testing.assert_allclose(sims[text_ids[0]], np.sort(sims[np.arange(N) != q[0]])[::-1][:K], atol=1e-5)


def test_uni_fusion_gathers_the_neighbours_same_modality(workdir):
    memory = MemoryIndex.open(str(workdir))
    image, text = (x.astype(np.float16).astype(np.float32) for x in memory_pairs())
    ids, tokens = retrieve(memory, image[:3], "image", K, query_ids=np.arange(3), fuse="uni")
    np.testing.assert_allclose(tokens, image[ids], atol=1e-6)
    ids, tokens = retrieve(memory, text[:3], "text", K, query_ids=np.arange(3), fuse="uni")
    np.testing.assert_allclose(tokens, text[ids], atol=1e-6)


def test_shard_search_follows_the_ablation_settings(workdir, tmp_path):
    """One input shard through the stage's searcher: search=cross changes the neighbours,
    train.fuse=uni adds the neighbours' same-modality embeddings; both change the fingerprint."""
    image, text = (x.astype(np.float16).astype(np.float32) for x in memory_pairs())
    memory_dir = str(workdir / "memory")

    def shard(cfg) -> pq.ParquetFile:
        fingerprint = _fingerprint(cfg, memory_dir, 0)
        ShardSearcher(cfg.model_dump_json(), memory_dir, str(tmp_path), fingerprint, 1, None).process(
            f"{memory_dir}/part-00000.parquet", "out.parquet")
        return pq.read_table(tmp_path / "out.parquet"), fingerprint

    plain, plain_fp = shard(config(workdir))
    assert "nn_image_uni" not in plain.column_names
    cross, cross_fp = shard(config(workdir, search="cross"))
    assert cross["nn_text_ids"] != plain["nn_text_ids"] and cross_fp != plain_fp
    cfg = make_config(workdir, index={"key": "Flat"}, neighbors={"k": K, "margin": 3}, train={"fuse": "uni"})
    uni, uni_fp = shard(cfg)
    assert uni["nn_text_ids"] == plain["nn_text_ids"] and uni_fp not in (plain_fp, cross_fp)
    nn_text_ids, nn_image_ids = (np.array(uni[c].to_pylist()) for c in ("nn_text_ids", "nn_image_ids"))
    np.testing.assert_allclose(nested_to_numpy(uni["nn_image_uni"]), image[nn_text_ids], atol=1e-3)
    np.testing.assert_allclose(nested_to_numpy(uni["nn_text_uni"]), text[nn_image_ids], atol=1e-3)
    np.testing.assert_allclose(nested_to_numpy(uni["nn_text"]), text[nn_text_ids], atol=1e-3)
