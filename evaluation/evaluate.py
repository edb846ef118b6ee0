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
   (`reco.search.retrieve`). Beside it, every report has the parameter-free `mean`
   column (the normalised mean of the same neighbours: what the fusion must beat to earn
   its parameters) and, when present, the `no_retrieval` control (the same modules fed no
   neighbours); with `evaluate.ablations` also each variant of `ABLATIONS`, retrieving
   as it was trained, and RECO over a `evaluate.memory_fraction` share of the memory;
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
from reco.config import ABLATIONS, ConfigError, RecoConfig
from reco.contracts import (EVAL_DIR, EVAL_EMBEDDINGS_DIR, FUSION_META, MANIFEST, MEMORY_DIR, MODALITIES,
                            MemoryManifest, embeddings_to_numpy, fusion_model_dir, index_folder)
from reco.depends import stage_depends
from reco.encode import embed_shards, encode_texts
from reco.fusion import MeanFusion, RecoFusion, load_fusion, refine
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
    check_ablations(cfg)
    # The trained model first: it is what a user is most likely to lack, and it implies the rest.
    model_dir = fusion_model_dir(cfg.workdir, cfg.variant)
    if not storage.exists(storage.join(model_dir, FUSION_META)):
        raise ConfigError(f"workdir: no trained fusion model at {model_dir} ({FUSION_META} missing); run "
                          "`reco train` first")
    d = storage.read_json(storage.join(model_dir, FUSION_META))["d"]
    if d != embed_dim(cfg.model):
        raise ConfigError(f"model: the fusion model at {model_dir} has width {d}, "
                          f"{cfg.model.name} embeds in {embed_dim(cfg.model)}")
    check_variants(cfg)
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


VARIANT_MAY_DIFFER = {"no_retrieval": {"k", "retrieval", "fuse", "search"},
                      "search_cross": {"search", "generation"}, "fuse_uni": {"fuse"}}
"""Training-fingerprint keys in which each variant differs from RECO by design (the
control sees no neighbours, so how they would be searched and fused does not reach it;
cross-modal search trains on its own neighbour split); every other key must be equal."""


def check_ablations(cfg: RecoConfig) -> None:
    if cfg.evaluate.ablations and cfg.variant != "reco":
        raise ConfigError(f"evaluate.ablations: the ablations are variants of RECO's own settings "
                          f"(neighbors.search=uni, train.fuse=cross, train.retrieval=true), but this config "
                          f"trains the variant {cfg.variant}; restore those settings")


def compared_variants(cfg: RecoConfig) -> list[str]:
    """The variants evaluated beside RECO: every ablation with `evaluate.ablations`, else the
    no-retrieval control where one was trained."""
    if cfg.evaluate.ablations:
        return list(ABLATIONS)
    control = storage.join(fusion_model_dir(cfg.workdir, "no_retrieval"), FUSION_META)
    return ["no_retrieval"] if storage.exists(control) else []


def check_variants(cfg: RecoConfig) -> None:
    """A variant's column is only an ablation of a RECO model trained on the same pairs with
    the same config; another one beside it would compare two different runs."""
    ours = storage.read_json(storage.join(fusion_model_dir(cfg.workdir, cfg.variant), FUSION_META))
    for variant in compared_variants(cfg):
        model_dir = fusion_model_dir(cfg.workdir, variant)
        url = storage.join(model_dir, FUSION_META)
        if not storage.exists(url):
            raise ConfigError(f"evaluate.ablations: no trained {variant} model at {model_dir}; `reco run` "
                              f"trains every ablation (or `reco train` with {' '.join(ABLATIONS[variant])})")
        mine, theirs = ({k: v for k, v in meta.get("fingerprint", {}).items() if k not in VARIANT_MAY_DIFFER[variant]}
                        for meta in (ours, storage.read_json(url)))
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if diff:
            differ = ", ".join(f"{k}={theirs.get(k)!r} there, {mine.get(k)!r} for RECO" for k in diff)
            raise ConfigError(f"workdir: the {variant} model at {model_dir} was trained with other settings "
                              f"than the RECO model ({differ}); retrain it with {' '.join(ABLATIONS[variant])} "
                              "and the RECO model's config, or delete it")


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


def memory_keys(workdir: str) -> np.ndarray:
    """The memory's sample keys by id (`keys[id]`)."""
    folder = storage.join(workdir, MEMORY_DIR)
    tables = [storage.read_parquet(url, ["id", "key"]) for url in MemoryManifest.read(folder).shard_urls(folder)]
    keys = np.empty(sum(t.num_rows for t in tables), dtype=object)
    for table in tables:
        keys[table["id"].to_numpy()] = table["key"].to_numpy(zero_copy_only=False)
    return keys


def memory_subset_exclusion(keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The ids left out for the memory-size ablation: all but a seeded random `fraction` of
    the pairs (`keys[id]`), drawn in key order, so the same pairs stay whatever ids the embed
    stage gave them (the order of a downloaded shard's samples varies between runs)."""
    draw = np.empty(len(keys))
    draw[np.argsort(keys, kind="stable")] = np.random.default_rng(seed).random(len(keys))
    return np.flatnonzero(draw >= fraction)


def evaluate_set(ds: EvalSet, emb: Embedded, memory: MemoryIndex, models: dict[str, tuple[RecoFusion, dict]],
                 k: int, threshold: float, subset: tuple[str, np.ndarray] | None = None
                 ) -> tuple[list[dict[str, Any]], int]:
    """(result rows, memory pairs excluded as near-duplicates of this set's images). `models`:
    column -> (fusion model, its metadata), `reco` first; `subset`: (column, ids left out) of
    the memory-size ablation, refined by RECO's model."""
    exclude = near_duplicate_ids(memory, emb.images, threshold)
    retrieved: dict[tuple, tuple] = {}

    def refined(fusion: RecoFusion, modules: tuple | None = None, without: np.ndarray = exclude):
        """`fusion`'s refinement (or `modules`' over the neighbours `fusion` retrieves); each
        retrieval (search, fuse, exclusion) runs once, shared by the columns that use it."""
        key = (fusion.search, fusion.fuse, len(without))
        if key not in retrieved:
            retrieved[key] = tuple(neighbour_embeddings(memory, queries, modality, k, without, threshold,
                                                        search=fusion.search, fuse=fusion.fuse)
                                   for queries, modality in ((emb.images, "image"), (emb.texts, "text")))
        (image_ids, image_tokens), (text_ids, text_tokens) = retrieved[key]
        image_module, text_module = modules or (fusion.image, fusion.text)
        return (refine(image_module, emb.images, image_tokens, image_ids),
                refine(text_module, emb.texts, text_tokens, text_ids))

    scores = {"baseline": _score(ds, emb, emb.images, emb.texts)}
    for column, (fusion, meta) in models.items():
        if meta.get("retrieval", True):
            scores[column] = _score(ds, emb, *refined(fusion))
        else:  # the control: the same modules fed no neighbours
            scores[column] = _score(ds, emb, refine(fusion.image, emb.images, None),
                                    refine(fusion.text, emb.texts, None))
    reco = models["reco"][0]
    if reco.fuse != "mean":  # the parameter-free reference over RECO's own neighbours
        scores["mean"] = _score(ds, emb, *refined(reco, (MeanFusion(), MeanFusion())))
    if subset is not None:
        column, left_out = subset
        scores[column] = _score(ds, emb, *refined(reco, without=np.union1d(exclude, left_out)))
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
    model_dirs = {"reco": fusion_model_dir(cfg.workdir, cfg.variant),
                  **{v: fusion_model_dir(cfg.workdir, v) for v in compared_variants(cfg)}}
    models = {column: load_fusion(model_dir) for column, model_dir in model_dirs.items()}
    meta = models["reco"][1]
    k = cfg.evaluate.k or meta.get("k") or cfg.neighbors.k
    threshold = cfg.neighbors.dedup_threshold
    subset = None
    if cfg.evaluate.ablations:
        subset = (f"memory_{cfg.evaluate.memory_fraction:g}",
                  memory_subset_exclusion(memory_keys(cfg.workdir), cfg.evaluate.memory_fraction, cfg.seed))
    results, datasets = [], []
    for ds, emb in zip(sets, embedded):
        rows, excluded = evaluate_set(ds, emb, memory, models, k, threshold, subset)
        results += rows
        datasets.append({"dataset": ds.name, "task": ds.task, "samples": int(len(emb.images)),
                         "skipped": emb.skipped, "classes": len(ds.classnames),
                         "memory_excluded": excluded})
        log.info("%s: %s", ds.name, "; ".join(
            f"{r['metric']} {r['baseline']:.1f} -> {r['reco']:.1f}" for r in rows))
    memory.close()
    seconds["retrieve_refine_score"] = round(time.perf_counter() - t, 2)
    config = {"model": cfg.model.model_dump(), "memory_pairs": int(memory.ntotal), "k": int(k),
              "dedup_threshold": threshold, "fusion_model": model_dirs["reco"], "fusion_steps": meta.get("steps"),
              "variant_models": {v: d for v, d in model_dirs.items() if v != "reco"},
              "memory_fraction": cfg.evaluate.memory_fraction if subset else None,
              "seed": cfg.seed, "seconds": seconds, "depends": depends}
    return write_report(cfg.path(EVAL_DIR), results, datasets, config)
