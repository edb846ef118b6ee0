"""`reco evaluate`: baseline == clip_benchmark, recall@K, de-duplication, report, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from clip_benchmark.metrics import zeroshot_classification as cb

from evaluation.datasets import clean_classname, prepare_dataset
from evaluation.evaluate import embed_images, check_evaluate, evaluate
from evaluation.metrics import retrieval_recall, topk_accuracy, topk_predictions
from evaluation.report import REPORT_FILES
from indexing.build import build_index
from pipeline.embed import embed
from reco.config import ConfigError
from reco.demo import synthetic
from reco.models import load_clip
from reco.search import MemoryIndex, near_duplicate_ids, retrieve
from tests.conftest import make_config
from reco.fusion import RecoFusion, save_fusion

TEMPLATES = ["a photo of a {c}.", "a {c}."]
N_CLASSES, PER_CLASS = 8, 5
PLANTED = 4


def write_imagefolder(root: Path, n_classes: int = N_CLASSES, per_class: int = PER_CLASS,
                      seed: int = 5) -> list[synthetic.Sample]:
    """<root>/<invented class name>/<key>.jpg."""
    classes = synthetic.classes()
    samples = list(synthetic.make_samples(n_classes * per_class, seed=seed, class_ids=range(n_classes)))
    for s in samples:
        folder = root / classes[s.label].name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{s.key}.jpg").write_bytes(s.jpeg)
    return samples


def folder_dataset(root: Path, **extra) -> dict:
    return {"name": "shapes", "kind": "imagefolder", "path": str(root), "templates": TEMPLATES, **extra}


# -- metrics on fixed embeddings ---------------------------------------------------------

def direct_recall(images: np.ndarray, texts: np.ndarray, text_image: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, one query at a time."""
    i2t = t2i = 0
    for i, v in enumerate(images):
        best = sorted(range(len(texts)), key=lambda j: -float(v @ texts[j]))[:k]
        i2t += any(text_image[j] == i for j in best)
    for j, t in enumerate(texts):
        best = sorted(range(len(images)), key=lambda i: -float(t @ images[i]))[:k]
        t2i += text_image[j] in best
    return 100 * i2t / len(images), 100 * t2i / len(texts)


def test_recall_at_k_equals_direct_computation():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((12, 8)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    text_image = np.repeat(np.arange(12), 2)  # two captions per image
    texts = images[text_image] + 0.9 * rng.standard_normal((24, 8)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    got = retrieval_recall(images, texts, text_image)
    for k in (1, 5, 10):
        i2t, t2i = direct_recall(images, texts, text_image, k)
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["image_to_text_R@1"] < 100  # the case is not trivial either way


def test_recall_and_accuracy_on_a_hand_checked_case():
    e = np.eye(3, dtype=np.float32)
    # Caption 0 is nearer image 1 than its own image 0, but image 0 still ranks it first.
    texts = np.array([[0.1, 0.9, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    got = retrieval_recall(e, texts, np.array([0, 1, 2]), ks=(1,))
    assert got == {"image_to_text_R@1": pytest.approx(100), "text_to_image_R@1": pytest.approx(200 / 3)}
    assert topk_accuracy(e, e, np.array([0, 1, 1]), ks=(1,)) == {"top1": pytest.approx(200 / 3)}


# -- the whole stage on a small world ------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint):
    """A workdir with memory (60 pairs + copies of PLANTED eval images), index, fusion models,
    two eval sets (an ImageFolder for classification, webdataset shards for retrieval), and
    the report of one `evaluate` run over them."""
    from tests.conftest import start_local_ray

    start_local_ray()
    base = tmp_path_factory.mktemp("world")
    eval_samples = write_imagefolder(base / "images")
    planted = [synthetic.Sample(f"copy{i}", s.jpeg, f"a copy {i}", s.label)
               for i, s in enumerate(eval_samples[:PLANTED])]
    memory = list(synthetic.make_samples(60, seed=11, class_ids=range(N_CLASSES))) + planted
    synthetic.write_webdataset(memory, str(base / "corpus"), samples_per_shard=32)
    retrieval = synthetic.make_samples(20, seed=12, class_ids=range(N_CLASSES), key_prefix="r")
    synthetic.write_webdataset(retrieval, str(base / "pairs"), samples_per_shard=20)
    cfg = make_config(
        base / "work", model={"name": "reco-tiny", "pretrained": tiny_checkpoint},
        embed={"input": str(base / "corpus")}, index={"key": "Flat"},
        # An untrained reco-tiny maps all these images close together: only copies pass 0.999.
        neighbors={"k": 4, "dedup_threshold": 0.999},
        evaluate={"datasets": [folder_dataset(base / "images"),
                               {"name": "pairs", "kind": "webdataset", "path": str(base / "pairs"),
                                "task": "retrieval"}]})
    embed(cfg)
    build_index(cfg)
    torch.manual_seed(0)
    meta = {"d": 64, "heads": 8, "mlp_ratio": 4.0, "steps": 0}
    save_fusion(RecoFusion(64), {**meta, "k": 4}, cfg.path("train", "model"))
    save_fusion(RecoFusion(64), {**meta, "k": 0}, cfg.path("train", "model-noretrieval"))
    return cfg, evaluate(cfg), base / "images"


def stored_images(cfg) -> tuple[list[str], np.ndarray]:
    """The shapes set's keys and image embeddings as the stage stored them."""
    ds = prepare_dataset(cfg, cfg.evaluate.datasets[0])
    found = embed_images(cfg, ds.shards)  # all embedded already: only reads
    keys = [k for s in ds.shards for k in found[s][0]]
    return keys, np.concatenate([found[s][1] for s in ds.shards])


def test_baseline_equals_clip_benchmark(world):
    cfg, report, root = world
    ds = prepare_dataset(cfg, cfg.evaluate.datasets[0])
    clip = load_clip(cfg.model)
    folder = torchvision.datasets.ImageFolder(str(root), transform=clip.preprocess)
    loader = torch.utils.data.DataLoader(folder, batch_size=7)
    theirs = cb.evaluate(clip.model, loader, clip.tokenizer, ds.classnames, ds.templates, "cpu")
    ours = {r["metric"]: r["baseline"] for r in report["results"] if r["dataset"] == "shapes"}
    assert ours == {"top1": round(100 * theirs["acc1"], 2), "top5": round(100 * theirs["acc5"], 2)}

    # To the sample: our stored image embeddings give clip_benchmark's prediction for every image.
    classifier = cb.zero_shot_classifier(clip.model, clip.tokenizer, ds.classnames, ds.templates, "cpu", amp=False)
    logits, target = cb.run_classification(clip.model, classifier, loader, "cpu", amp=False)
    keys, images = stored_images(cfg)
    order = np.argsort(keys)  # keys are <label>_<file index>: the ImageFolder's order
    assert len(keys) == len(folder) == N_CLASSES * PER_CLASS
    assert [int(k.split("_")[0]) for k in np.array(keys)[order]] == target.tolist()
    ours_pred = topk_predictions(images[order], classifier.T.numpy(), 1)[:, 0]
    assert np.array_equal(ours_pred, logits.argmax(1).numpy())


def test_dedup_removes_planted_duplicates(world):
    cfg, report, _ = world
    _, images = stored_images(cfg)
    memory = MemoryIndex.open(cfg.workdir)
    planted_ids = np.arange(60, 60 + PLANTED)  # the copies were embedded last
    excluded = near_duplicate_ids(memory, images, cfg.neighbors.dedup_threshold)
    assert set(planted_ids) <= set(excluded.tolist())
    assert len(excluded) < 60  # the threshold does not take the whole memory with it
    assert report["datasets"][0]["memory_excluded"] == len(excluded)
    # Without exclusion each copy is its original's best match; with it, never retrieved.
    _, ids = memory.search(images, 1, "image")
    assert np.isin(ids[:, 0], planted_ids).sum() >= PLANTED
    found, _ = retrieve(memory, images, "image", 4, exclude_ids=excluded)
    assert not np.isin(found, planted_ids).any()


def test_evaluate_writes_the_report(world):
    cfg, report, _ = world
    out = Path(cfg.path("eval"))
    assert all((out / name).stat().st_size > 0 for name in REPORT_FILES)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk) == {"results", "datasets", "config"}
    metrics = [(r["dataset"], r["metric"]) for r in on_disk["results"]]
    assert metrics == [("shapes", "top1"), ("shapes", "top5")] + [
        ("pairs", f"{d}_R@{k}") for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    for r in on_disk["results"]:
        assert {"task", "dataset", "metric", "baseline", "reco", "no_retrieval", "n"} <= set(r)
        assert all(0 <= r[s] <= 100 for s in ("baseline", "reco", "no_retrieval"))
    shapes, pairs = on_disk["datasets"]
    assert shapes["samples"] == N_CLASSES * PER_CLASS and shapes["memory_excluded"] >= PLANTED
    assert pairs["samples"] == 20
    assert on_disk["config"]["k"] == 4 and on_disk["config"]["memory_pairs"] == 60 + PLANTED
    table = (out / "report.md").read_text()
    assert "| classification | shapes | top1 |" in table and "RECO - baseline" in table


# -- bad input -----------------------------------------------------------------------------

def test_bad_datasets_are_named_before_any_work(tmp_path, tiny_checkpoint):
    root = tmp_path / "images"
    write_imagefolder(root, n_classes=3, per_class=1)

    def check(dataset: dict, match: str) -> None:
        cfg = make_config(tmp_path / "work", model={"name": "reco-tiny", "pretrained": tiny_checkpoint},
                          evaluate={"datasets": [dataset]})
        with pytest.raises(ConfigError, match=match):
            check_evaluate(cfg)

    check(folder_dataset(tmp_path / "nowhere"), r"evaluate.datasets\[shapes\].path: .*nowhere does not exist")
    check(folder_dataset(root, classnames=["a", "b"]), r"classnames: 2 names for 3 class folders")
    check(folder_dataset(root, classnames={"ronlo": "x"}), r"classnames: the mapping does not match")
    check(folder_dataset(root, templates=["a photo"]), r"templates: every template needs \{c\}")
    check({"name": "carz", "kind": "clip_benchmark"}, r"'carz' is not a clip_benchmark dataset.*'cars'")
    check({"name": "x", "kind": "webdataset", "path": str(root)}, r"x\]\.path: no \.tar shards")
    (root / "empty").mkdir()
    check(folder_dataset(root), r"class folder 'empty' holds no images")
    assert not (tmp_path / "work").exists()  # checked before anything was written


def test_no_trained_model_is_an_error(tmp_path, tiny_checkpoint):
    root = tmp_path / "images"
    write_imagefolder(root, n_classes=2, per_class=1)
    cfg = make_config(tmp_path / "work", model={"name": "reco-tiny", "pretrained": tiny_checkpoint},
                      evaluate={"datasets": [folder_dataset(root)]})
    with pytest.raises(ConfigError, match=r"no trained fusion model at .*train/model.*run `reco train`"):
        evaluate(cfg)
    assert not (tmp_path / "work").exists()  # nothing was written
    empty = make_config(tmp_path / "work")
    with pytest.raises(ConfigError, match="evaluate.datasets: empty"):
        evaluate(empty)


@pytest.mark.parametrize("raw, clean", [
    ("001.Black_footed_Albatross", "Black footed Albatross"),
    ("200.Common_Yellowthroat", "Common Yellowthroat"),
    ("Chuck_will_Widow", "Chuck will Widow"),
    ("2012 Tesla Model S", "2012 Tesla Model S"),  # a year is not numbering
    ("pink primrose", "pink primrose"),
])
def test_clip_benchmark_classnames_are_cleaned(raw, clean):
    assert clean_classname(raw) == clean
