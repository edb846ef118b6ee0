"""`reco neighbors`: each training pair's k neighbours, precomputed (DESIGN.md sections 1, 3).

Uni-modal search, cross-modal fusion: a pair's image retrieves its nearest memory images
and keeps their TEXTS (`nn_text`); its caption retrieves its nearest memory texts and
keeps their IMAGES (`nn_image`). The ablations: `neighbors.search=cross` searches the
other modality's index instead; `train.fuse=uni` also keeps the neighbours' own-modality
embeddings (`nn_image_uni`, `nn_text_uni`). The pair itself (by id) and every memory pair whose
image nearly copies the query's image are left out of both; identical captions are not
duplicates. The unit of work is one input shard: an actor (reco/shard_jobs.py) searches it and writes
one output shard, so a re-run only redoes missing shards; the manifest is written last.
A sharded memory, or a cluster of several nodes, is searched through the memory service
(`reco.search.memory_service`: one Ray actor per index shard), started once by the driver
and passed to every searcher; otherwise each searcher memory-maps the one local shard.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Literal

import pyarrow as pa
import faiss
import ray

from reco import storage
from reco.cluster import cluster_gpus, init_ray
from reco.config import ConfigError, RecoConfig
from reco.contracts import (MANIFEST, MEMORY_DIR, MODALITIES, MemoryManifest, IndexManifest, NeighborsManifest,
                            NeighborsShard, embeddings_to_numpy, index_folder, neighbors_folder, neighbors_schema,
                            neighbors_table)
from reco.depends import stage_depends
from reco.search import MemoryIndex, memory_service, retrieve
from reco.shard_jobs import ShardActor, actor_resources, find_finished, run_shard_jobs

log = logging.getLogger(__name__)

META_KEY = b"reco.neighbors"


def _fingerprint(cfg: RecoConfig, input_dir: str, index_generation: int) -> str:
    """What an output shard depends on: a new index generation (the memory grew, or was
    re-indexed) makes every shard stale."""
    n = cfg.neighbors
    return json.dumps({"input": input_dir, "k": n.k, "dedup_threshold": n.dedup_threshold,
                       "search": n.search, "uni": cfg.writes_uni, "index_generation": index_generation})


class ShardSearcher(ShardActor):
    """An actor searching the memory (the service's client, or its own in-process
    copy when `memory` is None); turns input shards into neighbour shards."""

    def start(self, cfg_json: str, input_dir: str, out_dir: str, fingerprint: str, threads: int,
              memory: MemoryIndex | None):
        faiss.omp_set_num_threads(max(1, threads))
        self.cfg = RecoConfig.model_validate_json(cfg_json)
        self.memory = (memory if memory is not None
                       else MemoryIndex.open(self.cfg.workdir, use_gpu=bool(ray.get_gpu_ids())))
        self.is_memory = input_dir.rstrip("/") == self.cfg.path(MEMORY_DIR).rstrip("/")
        self.out_dir, self.fingerprint = out_dir, fingerprint

    def process(self, source: str, path: str) -> NeighborsShard:
        """Search every query of one input shard; write its neighbour shard with its record."""
        t0 = time.perf_counter()
        table = storage.read_parquet(source)
        n, dtype = self.cfg.neighbors, self._dtype(table)
        parts, short = [], 0
        for start in range(0, table.num_rows, n.batch_size):
            rows = table.slice(start, n.batch_size)
            image = embeddings_to_numpy(rows["image_embedding"])
            text = embeddings_to_numpy(rows["text_embedding"])
            ids = rows["id"].to_numpy()
            common = dict(k=n.k, query_images=image, query_ids=ids if self.is_memory else None,
                          dedup_threshold=n.dedup_threshold, margin=n.margin, search=n.search)
            nn_text_ids, nn_text = retrieve(self.memory, image, "image", **common)
            nn_image_ids, nn_image = retrieve(self.memory, text, "text", **common)
            short += int(((nn_text_ids < 0).any(1) | (nn_image_ids < 0).any(1)).sum())
            uni = ((self.memory.fetch(nn_text_ids, "image"), self.memory.fetch(nn_image_ids, "text"))
                   if self.cfg.writes_uni else None)
            parts.append(neighbors_table(ids, rows["key"].to_pylist(), image, text, nn_text_ids, nn_text,
                                         nn_image_ids, nn_image, dtype, uni))
        shard = NeighborsShard(path=path, rows=table.num_rows, source=source, short=short,
                               seconds=round(time.perf_counter() - t0, 3))
        out = pa.concat_tables(parts) if parts else \
            neighbors_schema(self.memory.d, n.k, dtype, self.cfg.writes_uni).empty_table()
        out = out.replace_schema_metadata({META_KEY: json.dumps({"fingerprint": self.fingerprint,
                                                                 "shard": shard.model_dump(mode="json")})})
        storage.write_parquet_atomic(storage.join(self.out_dir, path), out)
        return shard

    @staticmethod
    def _dtype(table: pa.Table) -> Literal["float16", "float32"]:
        return "float16" if table.schema.field("image_embedding").type.value_type == pa.float16() else "float32"


def _finished(url: str, fingerprint: str) -> NeighborsShard | None:
    """The record of a finished output shard made with the same settings, else None."""
    meta = json.loads((storage.parquet_schema(url).metadata or {}).get(META_KEY, b"{}"))
    if meta.get("fingerprint") != fingerprint:
        return None
    return NeighborsShard.model_validate(meta["shard"])


def _check_index_files(index: IndexManifest, folder: str) -> None:
    """Each index shard present at its recorded size, checked here on the driver: in the
    searchers, a missing or truncated file would fail every actor, after Ray's retries."""
    for shard in index.shards:
        url = storage.join(folder, shard.path)
        fs, path = storage.filesystem(url)
        size = fs.size(path) if fs.exists(path) else None
        if size != shard.bytes:
            found = "is missing" if size is None else f"has {size} bytes, the manifest says {shard.bytes}: truncated"
            raise ConfigError(f"workdir: index file {url} {found}; re-run `reco index` to rebuild it")


def _validate(cfg: RecoConfig, input_dir: str) -> tuple[MemoryManifest, int]:
    """The query split's manifest and the index generation, after checking both."""
    memory = MemoryManifest.read(cfg.path(MEMORY_DIR))
    if memory is None:
        raise ConfigError(f"workdir: no finished memory in {cfg.path(MEMORY_DIR)}; run `reco embed` "
                          "and `reco index` first")
    for modality in MODALITIES:
        index = IndexManifest.read(index_folder(cfg.workdir, modality))
        if index is None:
            raise ConfigError(f"workdir: no {modality} index in {index_folder(cfg.workdir, modality)}; "
                              "run `reco index` first")
        _check_index_files(index, index_folder(cfg.workdir, modality))
        if index.total_rows != memory.total_rows:
            raise ConfigError(f"workdir: the {modality} index covers {index.total_rows} pairs, the memory "
                              f"holds {memory.total_rows}; run `reco index` to bring it up to date")
    queries = MemoryManifest.read(input_dir)
    if queries is None:
        raise ConfigError(f"neighbors.input: {input_dir} holds no finished memory-format split "
                          "(_manifest.json missing); give a folder written by `reco embed`")
    if queries.total_rows == 0:
        raise ConfigError(f"neighbors.input: the split in {input_dir} is empty (0 pairs)")
    if queries.d != memory.d or (queries.model, queries.pretrained) != (memory.model, memory.pretrained):
        raise ConfigError(f"neighbors.input: {input_dir} was embedded with {queries.model}/"
                          f"{queries.pretrained} d={queries.d}, the memory with {memory.model}/"
                          f"{memory.pretrained} d={memory.d}; embed both with the same model")
    if cfg.neighbors.k >= memory.total_rows:
        raise ConfigError(f"neighbors.k: {cfg.neighbors.k} neighbours but the memory holds only "
                          f"{memory.total_rows} pairs; lower neighbors.k")
    return queries, index.generation


def _search_shards(cfg: RecoConfig, todo: list[tuple[str, str]], queries: MemoryManifest,
                   service: MemoryIndex | None, input_dir: str, out_dir: str, fingerprint: str):
    """The records of the `todo` shards as the searchers finish them. Beside the service a
    searcher only filters, gathers and writes: one CPU, no GPU (the shard actors search)."""
    light = {"cpus_per_actor": 1.0, "gpus_per_actor": 0.0} if service is not None else {}
    resources = actor_resources(len(todo), num_actors=cfg.neighbors.num_actors, cpus_per_cpu_actor=4, **light)
    kwargs = {"cfg_json": cfg.model_dump_json(), "input_dir": input_dir, "out_dir": out_dir,
              "fingerprint": fingerprint, "threads": int(resources.cpus), "memory": service}
    rows = {s.path: s.rows for s in queries.shards}
    yield from run_shard_jobs([{"source": s, "path": p} for s, p in todo], ShardSearcher, kwargs, resources,
                              NeighborsShard, desc="neighbors", unit="query",
                              total=sum(rows[path] for _, path in todo), size=lambda shard: shard.rows)


def neighbors(cfg: RecoConfig) -> NeighborsManifest:
    """`reco neighbors`: write `<workdir>/neighbors/<split>/` for the pairs of
    `neighbors.input` (default the memory), skipping shards already written."""
    input_dir = cfg.neighbors.input or cfg.path(MEMORY_DIR)
    queries, generation = _validate(cfg, input_dir)
    depends = stage_depends(cfg, "neighbors")
    out_dir = neighbors_folder(cfg.workdir, cfg.neighbors.split, cfg.neighbors.search)
    fingerprint = _fingerprint(cfg, input_dir, generation)
    jobs = [(storage.join(input_dir, s.path), s.path) for s in queries.shards]
    done = find_finished(out_dir, [path for _, path in jobs], lambda url: _finished(url, fingerprint))
    todo = [(src, path) for src, path in jobs if done[path] is None]
    log.info("%d query shards: %d done, %d to search", len(jobs), len(jobs) - len(todo), len(todo))
    if todo:
        storage.remove(storage.join(out_dir, MANIFEST))  # readers must not mix old and new shards
        init_ray()
        service = memory_service(cfg.workdir, cfg.index, use_gpu=cluster_gpus() > 0)
        try:
            for shard in _search_shards(cfg, todo, queries, service, input_dir, out_dir, fingerprint):
                done[shard.path] = shard
        finally:
            if service is not None:
                service.close()
    shards = [done[path] for _, path in jobs]
    manifest = NeighborsManifest(
        split=cfg.neighbors.split, input=input_dir, model=queries.model, pretrained=queries.pretrained,
        d=queries.d, k=cfg.neighbors.k, dtype=queries.dtype, dedup_threshold=cfg.neighbors.dedup_threshold,
        search=cfg.neighbors.search, uni=cfg.writes_uni, shards=shards, total_rows=sum(s.rows for s in shards),
        short=sum(s.short for s in shards), depends=depends)
    if manifest == NeighborsManifest.read(out_dir):
        log.info("%s is up to date (%d queries)", out_dir, manifest.total_rows)
        return manifest
    manifest.write(out_dir)  # last: its presence means every shard above is complete
    log.info("%s: %d queries in %d shards (%d with fewer than k=%d neighbours)", out_dir,
             manifest.total_rows, len(shards), manifest.short, manifest.k)
    return manifest
