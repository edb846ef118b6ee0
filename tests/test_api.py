"""`reco.load`: the API computes what `reco evaluate` computes, and refuses bad input clearly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

import reco
from evaluation.datasets import prepare_dataset
from evaluation.evaluate import embed_images, evaluate
from evaluation.metrics import class_embeddings
from reco.api import InputError
from reco.config import ConfigError
from reco.encode import encode_texts
from reco.fusion import refine
from reco.search import near_duplicate_ids, neighbour_embeddings
from tests.conftest import API_TEMPLATES


@pytest.fixture(scope="module")
def world(api_world):
    """(config, the loaded API, evaluate's report, the set's image paths in evaluate's order
    with their labels, evaluate's frozen image embeddings of them)."""
    cfg = api_world
    report = evaluate(cfg)
    ds = prepare_dataset(cfg, cfg.evaluate.datasets[0])
    stored = embed_images(cfg, ds.shards)  # embedded by evaluate already: only reads
    keys = [k for s in ds.shards for k in stored[s][0]]
    frozen = np.concatenate([stored[s][1] for s in ds.shards])
    # Keys are <label>_<index in its folder>; the folders' files in sorted order.
    root = Path(cfg.evaluate.datasets[0].path)
    files = {f"{label:05d}_{i:06d}": path for label, folder in enumerate(sorted(root.iterdir()))
             for i, path in enumerate(sorted(folder.iterdir()))}
    paths = [files[k] for k in keys]
    labels = np.array([int(k.split("_")[0]) for k in keys])
    model = reco.load(cfg.workdir)
    yield cfg, model, report, paths, labels, frozen, ds
    model.close()


def evaluate_refinement(model, queries: np.ndarray, modality: str, exclude: np.ndarray) -> np.ndarray:
    """What evaluate_set computes for these queries: neighbour_embeddings, then refine."""
    module = model.fusion.image if modality == "image" else model.fusion.text
    ids, retrieved = neighbour_embeddings(model.memory, queries, modality, model.k, exclude,
                                          model.dedup_threshold)
    return refine(module, queries, retrieved, ids)


def test_load_reads_the_saved_config(world):
    cfg, model, *_ = world
    assert model.k == 4 and model.dedup_threshold == cfg.neighbors.dedup_threshold == 0.999
    assert model.d == 64 and model.memory.ntotal == 42


def test_frozen_embeddings_equal_evaluates(world):
    cfg, model, _, paths, _, frozen, ds = world
    ours = model.encode_image(paths, refine=False)
    assert ours.dtype == np.float32 and ours.shape == frozen.shape
    np.testing.assert_allclose(ours, frozen, atol=1e-5)
    # Bytes and PIL images give the same embeddings as paths.
    as_bytes = [p.read_bytes() for p in paths[:3]]
    np.testing.assert_allclose(model.encode_image(as_bytes, refine=False), frozen[:3], atol=1e-5)
    pil = [Image.open(io.BytesIO(b)) for b in as_bytes]
    np.testing.assert_allclose(model.encode_image(pil, refine=False), frozen[:3], atol=1e-5)
    prompts = [t.format(c=c) for c in ds.classnames for t in API_TEMPLATES]
    theirs = ray.get(encode_texts.remote(cfg.model_dump_json(), prompts, cfg.evaluate.batch_size))
    np.testing.assert_allclose(model.encode_text(prompts, refine=False), theirs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_refined_embeddings_equal_evaluates(world):
    _, model, _, paths, _, frozen, ds = world
    exclude = near_duplicate_ids(model.memory, frozen, model.dedup_threshold)
    assert len(exclude) >= 2  # the two planted copies
    expected = evaluate_refinement(model, frozen, "image", exclude)
    ours = model.encode_image(paths, exclude_ids=exclude)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert np.abs(ours - frozen).max() > 0.1  # the refinement changed them
    np.testing.assert_allclose(model.near_duplicate_ids(paths), exclude)
    # Without exclusion a copied image retrieves past its copy only by the per-query dedup,
    # which evaluate also applies: the same as evaluate's refinement with nothing excluded.
    np.testing.assert_allclose(model.encode_image(paths[:2]),
                               evaluate_refinement(model, frozen[:2], "image", np.zeros(0, np.int64)),
                               atol=1e-5)
    texts = [f"a photo of a {c}." for c in ds.classnames]
    expected = evaluate_refinement(model, model.encode_text(texts, refine=False), "text", exclude)
    np.testing.assert_allclose(model.encode_text(texts, exclude_ids=exclude), expected, atol=1e-5)


def accuracy(predicted: list[str], labels: np.ndarray, classnames: list[str]) -> float:
    return round(100.0 * float(np.mean([classnames.index(p) == y for p, y in zip(predicted, labels)])), 2)


def test_classify_equals_evaluates_report(world):
    _, model, report, paths, labels, frozen, ds = world
    top1 = {r["metric"]: r for r in report["results"]}["top1"]
    refined = model.classify(paths, ds.classnames, API_TEMPLATES, exclude_near_duplicates=True)
    baseline = model.classify(paths, ds.classnames, API_TEMPLATES, refine=False)
    assert accuracy(refined.labels, labels, ds.classnames) == top1["reco"]
    assert accuracy(baseline.labels, labels, ds.classnames) == top1["baseline"]
    # The scores are cosines with evaluate's class embeddings (template means).
    prompts = [t.format(c=c) for c in ds.classnames for t in API_TEMPLATES]
    classes = class_embeddings(model.encode_text(prompts, refine=False), len(ds.classnames))
    assert baseline.scores.shape == (len(paths), len(ds.classnames))
    np.testing.assert_allclose(baseline.scores, frozen @ classes.T, atol=1e-5)
    assert baseline.labels == [ds.classnames[j] for j in baseline.scores.argmax(1)]
    # The default templates are evaluate's default (clip_benchmark's imagenet1k set).
    assert model.classify(paths[:1], ds.classnames).scores.shape == (1, len(ds.classnames))


def test_bad_input_is_named(world):
    _, model, _, paths, *_ = world
    with pytest.raises(InputError, match="images: the list is empty"):
        model.encode_image([])
    with pytest.raises(InputError, match="texts: the list is empty"):
        model.encode_text([])
    with pytest.raises(InputError, match=r"images\[1\]: not an image"):
        model.encode_image([paths[0], b"these bytes are no image"])
    with pytest.raises(InputError, match=r"images\[0\]: cannot read .*nowhere.jpg"):
        model.encode_image(["/nowhere.jpg"])
    with pytest.raises(InputError, match=r"images\[0\]: expected a PIL image, bytes or a path, got int"):
        model.encode_image([3])
    with pytest.raises(InputError, match="texts: expected a list, got str"):
        model.encode_text("a photo")
    with pytest.raises(InputError, match=r"texts\[1\]: expected a string, got int"):
        model.encode_text(["a photo", 7])
    with pytest.raises(InputError, match=r"templates: every template needs \{c\}"):
        model.classify(paths[:1], ["a", "b"], ["a photo"])
    with pytest.raises(InputError, match="classnames: the list is empty"):
        model.classify(paths[:1], [])


def test_workdir_without_trained_model_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no trained fusion model at .*train/model.*run `reco train`"):
        reco.load(str(tmp_path))
