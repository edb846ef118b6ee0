"""What each stage's output depends on: the config values that shape it and the generation of its inputs.

A stage records `stage_depends(cfg, stage)` with its output (the manifest's `depends`,
the fusion model's `config.json`, the report's `config`); `reco run` skips a stage only
when the record equals what the stage would record now (reco/run.py). Settings that do
not change the output (batch sizes, actor counts, GPUs, logging) are left out, so
changing them re-runs nothing. An input's generation is a small identity of what the
previous stage wrote (row and shard counts, the index generation, a digest), read from
its manifest, never from the data itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from reco import storage
from reco.config import ABLATIONS, RecoConfig
from reco.contracts import (CORPUS_DIR, EVAL_DIR, FUSION_META, MEMORY_DIR, CorpusManifest, IndexManifest,
                            Manifest, MemoryManifest, NeighborsManifest, fusion_model_dir, index_folder,
                            neighbors_folder)
from reco.tars import list_shards

Depends = dict[str, dict[str, Any]]
"""{"config": {dotted key: value}, "inputs": {dotted name: generation}}."""

DOWNLOAD_RUNTIME = {"processes_count", "thread_count", "max_shard_retry", "incremental_mode"}
INDEX_RUNTIME = {"use_gpu", "growth_warning", "retrain"}
"""`retrain` says what to do when the memory grew, not what the index is."""
NEIGHBORS_RUNTIME = {"batch_size", "num_actors"}
TRAIN_RUNTIME = {"num_workers", "use_gpu", "cpus_per_worker", "checkpoint_every", "log_every", "max_failures",
                 "in_memory_gb"}
"""Train settings that may change between a run and its resumption."""
EVALUATE_RUNTIME = {"batch_size"}
REPORT = "report.json"


def digest(value: Any) -> str:
    """A short, stable hash of any JSON-able value."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def embed_input(cfg: RecoConfig) -> str:
    """The webdataset shards `reco embed` reads: `embed.input`, else the download's output."""
    return cfg.embed.input or cfg.download.output or cfg.path(CORPUS_DIR)


def _section(prefix: str, section: BaseModel, exclude: set[str] = frozenset()) -> dict[str, Any]:
    return {f"{prefix}.{key}": value for key, value in section.model_dump(mode="json").items()
            if key not in exclude}


def model_settings(cfg: RecoConfig) -> dict[str, Any]:
    """What fixes the memory's embedding space; the seed only matters for random weights."""
    return {**_section("model", cfg.model), "embed.dtype": cfg.embed.dtype,
            "seed": cfg.seed if cfg.model.pretrained is None else None}


def _memory_generation(folder: str, name: str) -> dict[str, Any]:
    memory = MemoryManifest.read(folder)
    return {f"{name}.total_rows": memory.total_rows if memory else None,
            f"{name}.shards": len(memory.shards) if memory else None}


def _index_generation(cfg: RecoConfig) -> int | None:
    manifest = IndexManifest.read(index_folder(cfg.workdir, "image"))
    return manifest.generation if manifest else None


def neighbors_generation(manifest: NeighborsManifest | None) -> str | None:
    """Changes whenever the split is re-made: its settings, inputs, totals (not per-shard timings)."""
    return digest(manifest.model_dump(mode="json", exclude={"shards"})) if manifest else None


def model_generation(model_dir: str) -> str | None:
    """Changes whenever the fusion model in `model_dir` is re-trained."""
    url = storage.join(model_dir, FUSION_META)
    if not storage.exists(url):
        return None
    meta = storage.read_json(url)
    return digest([meta.get("fingerprint"), meta.get("depends"), meta.get("steps")])


def _url_list_generation(cfg: RecoConfig) -> dict[str, Any]:
    """Every file under the URL list with its size: a file added, removed or rewritten counts."""
    fs, path = storage.filesystem(cfg.download.url_list)
    sizes = fs.du(path, total=False) if fs.exists(path) else {}
    return {"url_list.files": len(sizes), "url_list.digest": digest(sorted(sizes.items()))}


def _download(cfg: RecoConfig) -> Depends:
    return {"config": _section("download", cfg.download, DOWNLOAD_RUNTIME), "inputs": _url_list_generation(cfg)}


def _embed(cfg: RecoConfig, sources: list[str] | None) -> Depends:
    sources = sorted(sources if sources is not None else list_shards(embed_input(cfg)))
    return {"config": model_settings(cfg), "inputs": {"corpus.shards": len(sources), "corpus.digest": digest(sources)}}


def _index(cfg: RecoConfig) -> Depends:
    return {"config": _section("index", cfg.index, INDEX_RUNTIME),
            "inputs": _memory_generation(cfg.path(MEMORY_DIR), "memory")}


def _neighbors(cfg: RecoConfig) -> Depends:
    queries = cfg.neighbors.input or cfg.path(MEMORY_DIR)
    return {"config": {**_section("neighbors", cfg.neighbors, NEIGHBORS_RUNTIME),
                       "neighbors.uni_columns": cfg.writes_uni},
            "inputs": {"index.generation": _index_generation(cfg), **_memory_generation(queries, "queries")}}


def _train(cfg: RecoConfig) -> Depends:
    split = NeighborsManifest.read(neighbors_folder(cfg.workdir, cfg.train.split, cfg.neighbors.search))
    return {"config": {**_section("train", cfg.train, TRAIN_RUNTIME), "seed": cfg.seed},
            "inputs": {"neighbors.generation": neighbors_generation(split)}}


def _evaluate(cfg: RecoConfig) -> Depends:
    return {"config": {**_section("evaluate", cfg.evaluate, EVALUATE_RUNTIME),
                       "neighbors.dedup_threshold": cfg.neighbors.dedup_threshold},
            "inputs": {**_memory_generation(cfg.path(MEMORY_DIR), "memory"),
                       "index.generation": _index_generation(cfg),
                       "model.generation": model_generation(fusion_model_dir(cfg.workdir, cfg.variant)),
                       # every variant a column could come from, trained or not: all ablations
                       # with `evaluate.ablations`, else the control where one exists
                       # (evaluation.evaluate.compared_variants)
                       **{f"{variant}.generation": model_generation(fusion_model_dir(cfg.workdir, variant))
                          for variant in (ABLATIONS if cfg.evaluate.ablations else ["no_retrieval"])}}}


_STAGES = {"download": _download, "index": _index, "neighbors": _neighbors, "train": _train,
           "evaluate": _evaluate}
MANIFEST_TYPES: dict[str, type[Manifest]] = {"download": CorpusManifest, "embed": MemoryManifest,
                                             "index": IndexManifest, "neighbors": NeighborsManifest}


def stage_depends(cfg: RecoConfig, stage: str, sources: list[str] | None = None) -> Depends:
    """What `stage` would record now (`sources`: embed's input shards, when already listed)."""
    return _embed(cfg, sources) if stage == "embed" else _STAGES[stage](cfg)


def recorded_depends(cfg: RecoConfig, stage: str) -> Depends | None:
    """What `stage` recorded with its finished output, or None when there is none."""
    if stage == "train":
        url = storage.join(fusion_model_dir(cfg.workdir, cfg.variant), FUSION_META)
        return storage.read_json(url).get("depends") if storage.exists(url) else None
    if stage == "evaluate":
        url = cfg.path(EVAL_DIR, REPORT)
        return storage.read_json(url)["config"].get("depends") if storage.exists(url) else None
    folder = {"download": cfg.download.output or cfg.path(CORPUS_DIR), "embed": cfg.path(MEMORY_DIR),
              "index": index_folder(cfg.workdir, "image"),
              "neighbors": neighbors_folder(cfg.workdir, cfg.neighbors.split, cfg.neighbors.search)}[stage]
    manifest = MANIFEST_TYPES[stage].read(folder)
    return (manifest.depends or None) if manifest else None


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every key whose value differs."""
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]

