"""`reco evaluate`: zero-shot classification and retrieval, the frozen CLIP against RECO.

For each dataset of `evaluate.datasets`:

1. prepare: the set is written once as webdataset shards (evaluation/datasets.py);
2. embed: its images with the encoder `reco embed` uses (`reco.encode.embed_shards`), in
   float32; class prompts or captions with the frozen text tower (a Ray task);
3. de-duplicate: every memory pair whose image has cosine > `neighbors.dedup_threshold`
   with a test image (the index proposes candidates, their stored image embeddings are
   judged exactly) is left out of all retrievals, image->image and text->text (the report
   counts them);
4. refine: class/caption embeddings by phi_text over the images of their text->text
   neighbours, test images by phi_image over the texts of their image->image neighbours
   (`reco.search.retrieve`); the fusion model trained without retrieval, if
   present, gives the `no_retrieval` column with the same modules fed no neighbours;
5. measure top-1/top-5 or recall@1/5/10 for each and write `<workdir>/eval/report.*`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from evaluation.datasets import EvalSet, check_dataset, prepare_dataset
from evaluation.metrics import class_embeddings, retrieval_recall, topk_accuracy
from evaluation.report import write_report
from reco import storage
from reco.cluster import cluster_gpus, init_ray
from reco.config import ConfigError, RecoConfig
from reco.contracts import (EVAL_DIR, EVAL_EMBEDDINGS_DIR, FUSION_META, MANIFEST, MEMORY_DIR, MODALITIES,
                            MemoryManifest, embeddings_to_numpy, fusion_model_dir, index_folder)
from reco.depends import stage_depends
from reco.encode import embed_shards, encode_texts
from reco.fusion import load_fusion, refine
from reco.models import embed_dim, validate_model_config
from reco.search import MemoryIndex, memory_service, near_duplicate_ids, neighbour_embeddings

log = logging.getLogger(__name__)

@dataclass
class Embedded:
    """A dataset's frozen embeddings, aligned: images with labels, texts with their image."""
    images: np.ndarray
    labels: np.ndarray
    texts: np.ndarray
    """Class embeddings (classification) or one row per caption (retrieval)."""
    text_image: np.ndarray
    """Retrieval: the image index of each caption row."""
    skipped: int


def check_evaluate(cfg: RecoConfig) -> None:
    """Every check that needs no images read: datasets, model, memory, index, fusion model."""
    if not cfg.evaluate.datasets:
        raise ConfigError("evaluate.datasets: empty; add at least one, e.g. "
                          "{name: flowers, kind: clip_benchmark}")
    names = [d.name for d in cfg.evaluate.datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluate.datasets: names must be unique, got {names}")
    for spec in cfg.evaluate.datasets:
        check_dataset(spec)
    validate_model_config(cfg.model)
    # The trained model first: it is what a user is most likely to lack, and it implies the rest.
    meta_url = storage.join(fusion_model_dir(cfg.workdir), FUSION_META)
    if not storage.exists(meta_url):
        raise ConfigError(f"workdir: no trained fusion model at {fusion_model_dir(cfg.workdir)} ({FUSION_META} "
                          "missing); run `reco train` first")
    d = storage.read_json(meta_url)["d"]
    if d != embed_dim(cfg.model):
        raise ConfigError(f"model: the fusion model at {fusion_model_dir(cfg.workdir)} has width {d}, "
                          f"{cfg.model.name} embeds in {embed_dim(cfg.model)}")
    check_control(cfg.workdir)
    memory = MemoryManifest.read(cfg.path(MEMORY_DIR))
    if memory is None:
        raise ConfigError(f"workdir: no finished memory at {cfg.path(MEMORY_DIR)}; run `reco embed` first")
    if (memory.model, memory.pretrained) != (cfg.model.name, cfg.model.pretrained):
        raise ConfigError(f"model: the memory was embedded with {memory.model}/{memory.pretrained}, "
                          f"not {cfg.model.name}/{cfg.model.pretrained}: evaluate with the same model")
    for modality in MODALITIES:
        url = storage.join(index_folder(cfg.workdir, modality), MANIFEST)
        if not storage.exists(url):
            raise ConfigError(f"workdir: no finished index ({url} missing); run `reco index` first")


CONTROL_MAY_DIFFER = {"k", "retrieval", "fuse", "search"}
"""Training-fingerprint keys in which the no-retrieval control differs from RECO by design:
it sees no neighbours, so how they would be searched and fused does not reach it."""


def check_control(workdir: str) -> None:
    """The `no_retrieval` column is only a control for a RECO model trained on the same split
    with the same config; another one beside it would compare two different runs."""
    control_meta = storage.join(fusion_model_dir(workdir, retrieval=False), FUSION_META)
    if not storage.exists(control_meta):
        return
    ours, theirs = ({k: v for k, v in storage.read_json(url).get("fingerprint", {}).items()
                     if k not in CONTROL_MAY_DIFFER}
                    for url in (storage.join(fusion_model_dir(workdir), FUSION_META), control_meta))
    diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if diff:
        differ = ", ".join(f"{k}={theirs.get(k)!r} there, {ours.get(k)!r} for RECO" for k in diff)
        raise ConfigError(f"workdir: the no-retrieval model at {fusion_model_dir(workdir, retrieval=False)} was "
                          f"trained with other settings than the RECO model ({differ}); retrain it with "
                          "train.retrieval=false and the RECO model's config, or delete it")


# -- embedding -----------------------------------------------------------------------------

def _texts_of(ds: EvalSet) -> list[str]:
    if ds.task == "classification":
        return [t.format(c=c) for c in ds.classnames for t in ds.templates]
    return [c for caps in ds.captions for c in caps]


def embed_images(cfg: RecoConfig, shards: list[str]) -> dict[str, tuple[list[str], np.ndarray, int]]:
    """Input shard -> (keys, (n, d) image embeddings, samples skipped), embedded with the embed
    stage's own code: every set in one shard-job run, so small sets share the model replicas."""
    # float32: eval sets are small, and the baseline must equal clip_benchmark's exactly.
    eval_cfg = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"dtype": "float32"})})
    out_dir = cfg.path(EVAL_DIR, EVAL_EMBEDDINGS_DIR)
    manifest = embed_shards(eval_cfg, shards, out_dir)
    skipped = {s.source: s.skipped.total for s in manifest.inputs}
    found = {source: ([], np.zeros((0, manifest.d), np.float32), n) for source, n in skipped.items()}
    for shard in manifest.shards:  # one part per input shard that kept any sample
        table = storage.read_parquet(storage.join(out_dir, shard.path), columns=["key", "image_embedding"])
        found[shard.source] = (table["key"].to_pylist(), embeddings_to_numpy(table["image_embedding"]),
                               skipped[shard.source])
    return found


def _align(ds: EvalSet, keys: list[str], images: np.ndarray, texts: np.ndarray, skipped: int) -> Embedded:
    """Labels and caption rows for the embedded images (unreadable ones were skipped)."""
    row_of = {k: i for i, k in enumerate(ds.keys)}
    if len(row_of) != len(ds.keys):
        raise ConfigError(f"evaluate.datasets[{ds.name}]: sample keys are not unique; "
                          "give every sample its own key")
    rows = np.array([row_of[k] for k in keys], dtype=np.int64)
    if ds.task == "classification":
        return Embedded(images, ds.labels[rows], class_embeddings(texts, len(ds.classnames)),
                        np.zeros(0, np.int64), skipped)
    # Captions of skipped images are dropped with them.
    owner = np.repeat(np.arange(len(ds.keys)), [len(c) for c in ds.captions])
    position = np.full(len(ds.keys), -1)
    position[rows] = np.arange(len(rows))
    keep = position[owner] >= 0
    return Embedded(images, ds.labels[rows], texts[keep], position[owner[keep]], skipped)


def embed_sets(cfg: RecoConfig, sets: list[EvalSet]) -> list[Embedded]:
    """Every set's images and texts; the text tower runs as a Ray task while images embed."""
    init_ray()
    texts = [_texts_of(ds) for ds in sets]
    future = encode_texts.options(num_cpus=1, num_gpus=1 if cluster_gpus() else 0).remote(
        cfg.model_dump_json(), [t for group in texts for t in group], cfg.evaluate.batch_size)
    by_shard = embed_images(cfg, [s for ds in sets for s in ds.shards])
    text_parts = np.split(ray.get(future), np.cumsum([len(t) for t in texts])[:-1])
    out = []
    for ds, text in zip(sets, text_parts):
        parts = [by_shard[s] for s in ds.shards]
        keys = [k for p in parts for k in p[0]]
        images = np.concatenate([p[1] for p in parts])
        out.append(_align(ds, keys, images, text, sum(p[2] for p in parts)))
    return out


# -- retrieval and refinement --------------------------------------------------------------

def _score(ds: EvalSet, emb: Embedded, images: np.ndarray, texts: np.ndarray) -> dict[str, float]:
    if ds.task == "classification":
        return topk_accuracy(images, texts, emb.labels)
    return retrieval_recall(images, texts, emb.text_image)


def evaluate_set(ds: EvalSet, emb: Embedded, memory: MemoryIndex, fusion, control, k: int,
                 threshold: float) -> tuple[list[dict[str, Any]], int]:
    """(result rows, memory pairs excluded as near-duplicates of this set's images)."""
    exclude = near_duplicate_ids(memory, emb.images, threshold)
    how = dict(search=fusion.search, fuse=fusion.fuse)
    image_ids, image_tokens = neighbour_embeddings(memory, emb.images, "image", k, exclude, threshold, **how)
    text_ids, text_tokens = neighbour_embeddings(memory, emb.texts, "text", k, exclude, threshold, **how)
    scores = {"baseline": _score(ds, emb, emb.images, emb.texts),
              "reco": _score(ds, emb, refine(fusion.image, emb.images, image_tokens, image_ids),
                             refine(fusion.text, emb.texts, text_tokens, text_ids))}
    if control is not None:
        scores["no_retrieval"] = _score(ds, emb, refine(control.image, emb.images, None),
                                        refine(control.text, emb.texts, None))
    rows = [{"task": ds.task, "dataset": ds.name, "metric": metric, "n": int(len(emb.images)),
             **{system: round(s[metric], 2) for system, s in scores.items()}}
            for metric in scores["baseline"]]
    return rows, int(len(exclude))


def evaluate(cfg: RecoConfig) -> dict[str, Any]:
    """`reco evaluate`: every dataset, baseline vs RECO; writes and returns the report."""
    check_evaluate(cfg)
    depends = stage_depends(cfg, "evaluate")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    sets = [prepare_dataset(cfg, spec) for spec in cfg.evaluate.datasets]
    seconds["prepare"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    embedded = embed_sets(cfg, sets)
    seconds["embed"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    # The memory service where the memory is sharded or the cluster has several nodes. Its
    # actors also stop when the last handle goes, should an error leave `close` uncalled.
    memory = (memory_service(cfg.workdir, cfg.index, use_gpu=cfg.index.use_gpu)
              or MemoryIndex.open(cfg.workdir, use_gpu=cfg.index.use_gpu))
    fusion, meta = load_fusion(fusion_model_dir(cfg.workdir))
    control_dir = fusion_model_dir(cfg.workdir, retrieval=False)
    control = load_fusion(control_dir)[0] if storage.exists(storage.join(control_dir, FUSION_META)) else None
    k = cfg.evaluate.k or meta.get("k") or cfg.neighbors.k
    threshold = cfg.neighbors.dedup_threshold
    results, datasets = [], []
    for ds, emb in zip(sets, embedded):
        rows, excluded = evaluate_set(ds, emb, memory, fusion, control, k, threshold)
        results += rows
        datasets.append({"dataset": ds.name, "task": ds.task, "samples": int(len(emb.images)),
                         "skipped": emb.skipped, "classes": len(ds.classnames),
                         "memory_excluded": excluded})
        log.info("%s: %s", ds.name, "; ".join(
            f"{r['metric']} {r['baseline']:.1f} -> {r['reco']:.1f}" for r in rows))
    memory.close()
    seconds["retrieve_refine_score"] = round(time.perf_counter() - t, 2)
    config = {"model": cfg.model.model_dump(), "memory_pairs": int(memory.ntotal), "k": int(k),
              "dedup_threshold": threshold, "fusion_model": fusion_model_dir(cfg.workdir),
              "fusion_steps": meta.get("steps"), "no_retrieval_model": control_dir if control else None,
              "seed": cfg.seed, "seconds": seconds, "depends": depends}
    return write_report(cfg.path(EVAL_DIR), results, datasets, config)
