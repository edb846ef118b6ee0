"""`reco embed`: webdataset shards -> the Parquet memory (DESIGN.md section 3).

The unit of work is one input shard: a replica of the frozen model (a Ray Data actor)
reads it, decodes and preprocesses images in threads ahead of the forward pass,
encodes images and captions, and writes one staged Parquet file carrying its stats.
Finished staged files are skipped on a re-run. Ids depend on the row counts of all
earlier shards, so they are assigned once every input is staged: Ray tasks copy each
staged file to its `part-NNNNN.parquet` with ids, and the manifest is written last.
New input shards embedded later are appended with ids continuing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image
from tqdm import tqdm

from reco import storage
from reco.cluster import cluster_cpus, cluster_gpus, init_ray
from reco.config import ConfigError, RecoConfig
from reco.models import embed_dim, load_clip, validate_model_config
from reco.schema import (MEMORY_DIR, InputShardStats, MemoryManifest, MemoryShard, SkipStats,
                         embedding_array, memory_schema)
from reco.tars import TarSample, TruncatedShard, iter_tar_samples, list_shards

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
STATS_KEY = b"reco.input_stats"
MODEL_KEY = b"reco.model"


def staged_name(source: str) -> str:
    """A staging file name unique to an input shard URL."""
    stem = source.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:12]}.parquet"


def model_fingerprint(cfg: RecoConfig) -> str:
    m = cfg.model
    return f"{m.name}|{m.pretrained}|{m.config}|{cfg.embed.dtype}|seed={cfg.seed if m.pretrained is None else ''}"


def _decode(sample: TarSample, preprocess) -> torch.Tensor | str:
    """The preprocessed image tensor, or the reason the sample is skipped."""
    if sample.image is None:
        return "missing image"
    if sample.caption is None:
        return "missing caption"
    if not sample.caption:
        return "empty caption"
    try:
        with Image.open(io.BytesIO(sample.image)) as img:
            return preprocess(img.convert("RGB"))
    except Exception as err:  # PIL raises many types for bad bytes; all mean "unreadable"
        return f"unreadable image ({type(err).__name__})"


def _resolved(value: object) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class ShardEmbedder:
    """A Ray Data actor holding one frozen model replica; embeds whole input shards."""

    def __init__(self, cfg_json: str, staging: str, cpus: float, decode_threads: int):
        self.cfg = RecoConfig.model_validate_json(cfg_json)
        self.staging = staging
        torch.set_num_threads(max(1, int(cpus)))
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.clip = load_clip(self.cfg.model, seed=self.cfg.seed, device=self.device)
        # On CPU the forward pass owns every core: a decoding thread beside torch's OpenMP
        # threads stalls them more than decoding in line costs (decode_threads=0).
        self.pool = ThreadPoolExecutor(decode_threads) if decode_threads > 0 else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = [self.embed_shard(str(source)).model_dump_json() for source in batch["source"]]
        return {"source": batch["source"], "stats": np.array(stats, dtype=object)}

    def _batches(self, source: str, stats: InputShardStats) -> Iterator[tuple[list[TarSample], list[torch.Tensor]]]:
        """Whole batches of decodable samples; decoding runs one batch ahead in threads."""
        batch_size = self.cfg.embed.batch_size
        ahead: tuple[list[TarSample], list[Future]] | None = None
        raw: list[TarSample] = []

        def collect(pending: tuple[list[TarSample], list[Future]]):
            samples, futures = pending
            kept, images = [], []
            for sample, fut in zip(samples, futures):
                out = fut.result()
                if isinstance(out, str):
                    stats.skipped.add(sample.key, out, source)
                else:
                    kept.append(sample)
                    images.append(out)
            return kept, images

        def submit(samples: list[TarSample]):
            if self.pool is None:
                return samples, [_resolved(_decode(s, self.clip.preprocess)) for s in samples]
            return samples, [self.pool.submit(_decode, s, self.clip.preprocess) for s in samples]

        try:
            for sample in iter_tar_samples(source):
                stats.samples += 1
                raw.append(sample)
                if len(raw) == batch_size:
                    current, ahead = ahead, submit(raw)
                    raw = []
                    if current is not None:
                        yield collect(current)
        except TruncatedShard as err:
            if err.partial_key is not None:
                stats.samples += 1
                stats.skipped.add(err.partial_key, "truncated tar", source)
            log.warning("%s: %s; kept the %d samples before it", source, err, stats.samples - 1)
        for pending in (ahead, submit(raw) if raw else None):
            if pending is not None:
                yield collect(pending)

    @torch.inference_mode()
    def _encode(self, images: list[torch.Tensor], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pixels = torch.stack(images).to(self.device, non_blocking=True)
        tokens = self.clip.tokenizer(captions).to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device == "cuda"):
            img = self.clip.model.encode_image(pixels, normalize=True)
            txt = self.clip.model.encode_text(tokens, normalize=True)
        return img.float().cpu().numpy(), txt.float().cpu().numpy()

    def embed_shard(self, source: str) -> InputShardStats:
        stats = InputShardStats(source=source, samples=0, written=0, skipped=SkipStats())
        keys, captions, urls, img_parts, txt_parts = [], [], [], [], []
        t_wait = t_fwd = 0.0
        t = time.perf_counter()
        for samples, images in self._batches(source, stats):
            t_wait += time.perf_counter() - t
            t = time.perf_counter()
            if samples:
                img, txt = self._encode(images, [s.caption for s in samples])
                img_parts.append(img)
                txt_parts.append(txt)
                keys += [s.key for s in samples]
                captions += [s.caption for s in samples]
                urls += [s.url for s in samples]
            t_fwd += time.perf_counter() - t
            t = time.perf_counter()
        t_wait += time.perf_counter() - t
        t = time.perf_counter()
        d, dtype = self.clip.embed_dim, self.cfg.embed.dtype
        empty = np.zeros((0, d), np.float32)
        table = pa.table({
            "key": pa.array(keys, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "url": pa.array(urls, pa.string()),
            "image_embedding": embedding_array(np.concatenate(img_parts) if img_parts else empty, dtype),
            "text_embedding": embedding_array(np.concatenate(txt_parts) if txt_parts else empty, dtype),
        })
        stats.written = table.num_rows
        stats.seconds = {"read_decode_wait": round(t_wait, 3), "forward": round(t_fwd, 3)}
        stats.seconds["write"] = round(time.perf_counter() - t, 3)
        table = table.replace_schema_metadata({STATS_KEY: stats.model_dump_json(),
                                               MODEL_KEY: model_fingerprint(self.cfg)})
        storage.write_parquet_atomic(storage.join(self.staging, staged_name(source)), table)
        return stats


@ray.remote
def _finalize_shard(staged_url: str, part_url: str, id_start: int, schema: pa.Schema) -> int:
    """Copy a staged shard to its memory part with ids id_start.. added in front."""
    table = storage.read_parquet(staged_url)
    ids = pa.array(np.arange(id_start, id_start + table.num_rows, dtype=np.int64))
    table = table.add_column(0, "id", ids).replace_schema_metadata(None).cast(schema)
    storage.write_parquet_atomic(part_url, table)
    return table.num_rows


def _staged_stats(url: str, fingerprint: str) -> InputShardStats | None:
    """The stats of a finished staged file, or None if it is from another model."""
    meta = storage.parquet_schema(url).metadata or {}
    if meta.get(MODEL_KEY, b"").decode() != fingerprint:
        log.warning("%s was embedded with another model config; embedding it again", url)
        return None
    return InputShardStats.model_validate_json(meta[STATS_KEY])


def _find_staged(staging: str, sources: list[str], fingerprint: str) -> dict[str, InputShardStats | None]:
    """Stats of the sources already staged: one listing, then the footers read in parallel."""
    present = {url.rsplit("/", 1)[-1] for url in storage.list_files(staging, ".parquet")}
    found = [s for s in sources if staged_name(s) in present]
    with ThreadPoolExecutor(16) as pool:
        stats = pool.map(lambda s: _staged_stats(storage.join(staging, staged_name(s)), fingerprint), found)
        return {**dict.fromkeys(sources), **dict(zip(found, stats))}


def _check_compatible(previous: MemoryManifest, cfg: RecoConfig, d: int, out_dir: str) -> None:
    ours = (cfg.model.name, cfg.model.pretrained, d, cfg.embed.dtype)
    theirs = (previous.model, previous.pretrained, previous.d, previous.dtype)
    if ours != theirs:
        raise ConfigError(
            f"model: {out_dir} holds embeddings of model={previous.model} "
            f"pretrained={previous.pretrained} d={previous.d} dtype={previous.dtype}, not "
            f"{ours[0]}/{ours[1]}/d={d}/{ours[3]}: appending would mix embedding spaces. "
            "Use the same model, or another workdir.")


def _replica_resources(cfg: RecoConfig) -> tuple[int, float, float, int]:
    """(replicas, cpus each, gpus each, decode threads) for this cluster."""
    e = cfg.embed
    gpus = cluster_gpus()
    gpus_each = e.gpus_per_actor if e.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    replicas = e.num_actors or (max(1, int(gpus // gpus_each)) if gpus_each else 1)
    cpus_each = e.cpus_per_actor or max(1.0, min(8.0, cluster_cpus() / replicas))
    threads = e.decode_threads if e.decode_threads is not None else (int(cpus_each) if gpus_each else 0)
    return replicas, cpus_each, gpus_each, threads


def embed(cfg: RecoConfig) -> MemoryManifest:
    """`reco embed`: embed every corpus shard not yet in `<workdir>/memory`."""
    sources = list_shards(cfg.embed.input or cfg.download.output or cfg.path("corpus"))
    return embed_shards(cfg, sources, cfg.path(MEMORY_DIR))


def embed_shards(cfg: RecoConfig, sources: list[str], out_dir: str) -> MemoryManifest:
    """Embed webdataset shards into a memory-format folder (Parquet parts + manifest).

    Shards already recorded in `out_dir`'s manifest are skipped, new ones appended with
    ids continuing. Evaluation sets use this too, so they are embedded by the same code.
    """
    validate_model_config(cfg.model)
    d = embed_dim(cfg.model)
    previous = MemoryManifest.read(out_dir)
    if previous is not None:
        _check_compatible(previous, cfg, d, out_dir)
    done = {s.source for s in previous.inputs} if previous else set()
    pending = [s for s in sources if s not in done]
    if not pending:
        log.info("memory is up to date: all %d input shards embedded", len(sources))
        return previous

    staging = storage.join(out_dir, STAGING_DIR)
    fingerprint = model_fingerprint(cfg)
    staged = _find_staged(staging, pending, fingerprint)
    todo = [s for s in pending if staged[s] is None]
    log.info("%d input shards: %d in memory, %d staged, %d to embed",
             len(sources), len(done), len(pending) - len(todo), len(todo))
    if todo:
        init_ray()
        replicas, cpus_each, gpus_each, threads = _replica_resources(cfg)
        replicas = min(replicas, len(todo))
        ds = ray.data.from_items([{"source": s} for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardEmbedder, batch_size=1,
            fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "staging": staging, "cpus": cpus_each,
                                   "decode_threads": threads},
            compute=ray.data.ActorPoolStrategy(size=replicas),
            num_cpus=cpus_each, num_gpus=gpus_each)
        start = time.perf_counter()
        with tqdm(total=len(todo), unit="shard", desc="embed", disable=None) as bar:
            for row in ds.iter_rows():
                stats = InputShardStats.model_validate_json(row["stats"])
                staged[stats.source] = stats
                bar.update(1)
                bar.set_postfix(samples=stats.samples, skipped=stats.skipped.total)
        log.info("embedded %d shards in %.1fs", len(todo), time.perf_counter() - start)
    return _finalize(cfg, out_dir, previous, pending, staged, d)


def _finalize(cfg: RecoConfig, out_dir: str, previous: MemoryManifest | None, pending: list[str],
              staged: dict[str, InputShardStats], d: int) -> MemoryManifest:
    manifest = previous or MemoryManifest(model=cfg.model.name, pretrained=cfg.model.pretrained,
                                          model_config_file=cfg.model.config, d=d, dtype=cfg.embed.dtype)
    staging = storage.join(out_dir, STAGING_DIR)
    schema = memory_schema(d, cfg.embed.dtype)
    jobs = []
    for source in pending:
        stats = staged[source]
        manifest.inputs.append(stats)
        manifest.skipped.merge(stats.skipped)
        if stats.written == 0:
            continue
        name = f"part-{len(manifest.shards):05d}.parquet"
        manifest.shards.append(MemoryShard(path=name, rows=stats.written, id_start=manifest.total_rows,
                                           id_end=manifest.total_rows + stats.written, source=source))
        jobs.append((storage.join(staging, staged_name(source)), storage.join(out_dir, name),
                     manifest.total_rows))
        manifest.total_rows += stats.written
    if jobs:
        init_ray()
        start = time.perf_counter()
        ray.get([_finalize_shard.remote(*job, schema) for job in jobs])
        log.info("wrote %d memory parts with ids in %.1fs", len(jobs), time.perf_counter() - start)
    manifest.write(out_dir)  # last: its presence means the parts above are complete
    storage.remove(staging, recursive=True)
    log.info("%s: %d rows in %d shards (%d skipped)", out_dir, manifest.total_rows,
             len(manifest.shards), manifest.skipped.total)
    return manifest
