"""The frozen CLIP over data: webdataset shards -> memory-format Parquet, and texts -> embeddings.

The unit of work is one input shard: a replica of the frozen model (a Ray actor) reads it,
decodes its samples (reco/decode.py: in line on CPU, in worker processes ahead of the
forward pass beside a GPU), encodes images and captions, and writes one staged Parquet
file carrying its stats.
Finished staged files are skipped on a re-run. Ids depend on the row counts of all
earlier shards, so they are assigned once every input is staged: each staged file is
copied to its `part-NNNNN.parquet` with ids (by driver threads when the parts are few,
else by Ray tasks), and the manifest is written last.
New input shards embedded later are appended with ids continuing.

`reco embed` writes the memory with it; `reco evaluate` embeds its test sets with the
same code, so both sides of every comparison pass through one path.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
import torch

from reco import storage
from reco.cluster import init_ray
from reco.config import ConfigError, RecoConfig
from reco.contracts import InputShardStats, MemoryManifest, MemoryShard, SkipStats, embedding_array, memory_schema
from reco.decode import SampleDecoder
from reco.malloc import keep_freed_memory
from reco.models import embed_dim, encode_text, load_clip, validate_model_config
from reco.shard_jobs import ActorResources, ShardActor, actor_resources, find_finished, run_shard_jobs
from reco.tars import TarSample, TruncatedShard, iter_tar_samples

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


class ShardEmbedder(ShardActor):
    """A Ray actor holding one frozen model replica; embeds whole input shards."""

    def start(self, cfg_json: str, staging: str, cpus: float, decode_processes: int):
        self.cfg = RecoConfig.model_validate_json(cfg_json)
        self.staging = staging
        keep_freed_memory()
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        # Decoding processes own the CPUs where there are any; else the forward pass does.
        torch.set_num_threads(1 if decode_processes else max(1, int(cpus)))
        self.clip = load_clip(self.cfg.model, seed=self.cfg.seed, device=self.device)
        self.decoder = SampleDecoder(self.clip.preprocess, self.clip.tokenizer, decode_processes)

    def _batches(self, source: str, stats: InputShardStats) -> Iterator[tuple[list[TarSample], torch.Tensor, torch.Tensor]]:
        """Whole batches of decodable samples with their pixels and tokens. Worker processes
        decode batches ahead, so none waits while the replica encodes one."""
        batch_size = self.cfg.embed.batch_size
        depth = self.decoder.batches_ahead(batch_size)
        ahead: deque[tuple[list[TarSample], list[Future]]] = deque()
        raw: list[TarSample] = []

        def collect(samples: list[TarSample], futures: list[Future]):
            kept, pixels, tokens, offset = [], [], [], 0
            for future in futures:
                run = self.decoder.result(future, source)
                for i, reason in run.skipped:
                    stats.skipped.add(samples[offset + i].key, reason, source)
                if run.kept:
                    kept += [samples[offset + i] for i in run.kept]
                    pixels.append(run.pixels)
                    tokens.append(run.tokens)
                offset += len(run.kept) + len(run.skipped)
            if not kept:
                return kept, None, None
            return kept, self.decoder.preprocess.batch(pixels, self.device), torch.cat(tokens)

        try:
            for sample in iter_tar_samples(source):
                stats.samples += 1
                raw.append(sample)
                if len(raw) == batch_size:
                    ahead.append((raw, self.decoder.submit(raw, source)))
                    raw = []
                    if len(ahead) > depth:
                        yield collect(*ahead.popleft())
        except TruncatedShard as err:
            # The sample it cut; or, for a file with no readable member, the shard as one entry.
            stats.samples += 1
            stats.skipped.add(err.partial_key or "*", err.reason, source)
            log.warning("%s: %s; kept the %d samples before it", source, err, stats.samples - 1)
        if raw:
            ahead.append((raw, self.decoder.submit(raw, source)))
        while ahead:
            yield collect(*ahead.popleft())

    def close(self) -> None:
        # Its decoding processes exit while it lives: killed with it, they would unregister
        # their queues' semaphores from a resource tracker already gone, each with a traceback.
        if self.start_error is None:  # else there may be no decoder
            self.decoder.close()

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        tokens = tokens.to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device == "cuda"):
            img = self.clip.model.encode_image(pixels, normalize=True)
            txt = encode_text(self.clip.model, tokens)
        return img.float().cpu().numpy(), txt.float().cpu().numpy()

    def process(self, source: str) -> InputShardStats:
        """Embed one input shard into a staged Parquet file carrying its stats."""
        stats = InputShardStats(source=source, samples=0, written=0, skipped=SkipStats())
        keys, captions, urls, img_parts, txt_parts = [], [], [], [], []
        t_start = self.decoder.wait_started()
        t_wait = t_fwd = 0.0
        t = time.perf_counter()
        for samples, pixels, tokens in self._batches(source, stats):
            t_wait += time.perf_counter() - t
            t = time.perf_counter()
            if samples:
                img, txt = self._encode(pixels, tokens)
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
        stats.seconds = {"decoder_start": round(t_start, 3), "read_decode_wait": round(t_wait, 3),
                         "forward": round(t_fwd, 3)}
        stats.seconds["write"] = round(time.perf_counter() - t, 3)
        table = table.replace_schema_metadata({STATS_KEY: stats.model_dump_json(),
                                               MODEL_KEY: model_fingerprint(self.cfg)})
        storage.write_parquet_atomic(storage.join(self.staging, staged_name(source)), table)
        return stats


def _write_part(staged_url: str, part_url: str, id_start: int, schema: pa.Schema) -> int:
    """Copy a staged shard to its memory part with ids id_start.. added in front."""
    table = storage.read_parquet(staged_url)
    ids = pa.array(np.arange(id_start, id_start + table.num_rows, dtype=np.int64))
    table = table.add_column(0, "id", ids).replace_schema_metadata(None).cast(schema)
    storage.write_parquet_atomic(part_url, table)
    return table.num_rows


_write_part_task = ray.remote(_write_part)

# Up to this many parts are copied by driver threads: a Ray task's fresh worker first imports
# this module (torch, open_clip), seconds, where a thread copies a small part in milliseconds.
# Beyond it the copies' I/O is spread over the cluster's workers instead.
DRIVER_PARTS_MAX = 64


def _write_parts(jobs: list[tuple[str, str, int]], schema: pa.Schema) -> None:
    """Every staged shard copied to its part with ids: in threads when few, else as Ray tasks."""
    if len(jobs) <= DRIVER_PARTS_MAX:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda job: _write_part(*job, schema), jobs))
        return
    init_ray()
    ray.get([_write_part_task.remote(*job, schema) for job in jobs])


def _staged_stats(url: str, fingerprint: str) -> InputShardStats | None:
    """The stats of a finished staged file, or None if it is from another model."""
    meta = storage.parquet_schema(url).metadata or {}
    if meta.get(MODEL_KEY, b"").decode() != fingerprint:
        log.warning("%s was embedded with another model config; embedding it again", url)
        return None
    return InputShardStats.model_validate_json(meta[STATS_KEY])


def _check_compatible(previous: MemoryManifest, cfg: RecoConfig, d: int, out_dir: str) -> None:
    ours = (cfg.model.name, cfg.model.pretrained, d, cfg.embed.dtype)
    theirs = (previous.model, previous.pretrained, previous.d, previous.dtype)
    if ours != theirs:
        raise ConfigError(
            f"model: {out_dir} holds embeddings of model={previous.model} "
            f"pretrained={previous.pretrained} d={previous.d} dtype={previous.dtype}, not "
            f"{ours[0]}/{ours[1]}/d={d}/{ours[3]}: appending would mix embedding spaces. "
            "Use the same model, or another workdir.")


# On a CPU-only cluster, one single-threaded replica per CPU: replicas need no sync between
# threads, and one replica's decoding overlaps another's forward pass. On 2 cores, 2 x 1
# thread embedded 1,024 pairs (ViT-S-32, whole command) in 64-65 s against 69-75 s for
# 1 x 2 threads (docs/performance.md). Each replica holds its own copy of the model.
CPUS_PER_CPU_REPLICA = 1


def _decode_processes(cfg: RecoConfig, cpus: float, gpus: float) -> int:
    """Decoding processes per replica: one per CPU beside a GPU; none (decode in line) on CPU."""
    if cfg.embed.decode_processes is not None:
        return cfg.embed.decode_processes
    return int(cpus) if gpus else 0


def replica_resources(cfg: RecoConfig, shards: int) -> ActorResources:
    """How many model replicas embed `shards` input shards on this cluster, and what each reserves."""
    e = cfg.embed
    return actor_resources(shards, num_actors=e.num_actors, cpus_per_actor=e.cpus_per_actor,
                           gpus_per_actor=e.gpus_per_actor, cpus_per_cpu_actor=CPUS_PER_CPU_REPLICA, max_cpus=8)


def embed_shards(cfg: RecoConfig, sources: list[str], out_dir: str, depends: dict | None = None) -> MemoryManifest:
    """Embed webdataset shards into a memory-format folder (Parquet parts + manifest).

    Shards already recorded in `out_dir`'s manifest are skipped, new ones appended with
    ids continuing. Evaluation sets use this too, so they are embedded by the same code.
    `depends` (reco/depends.py), if given, is recorded in the manifest.
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
        if depends is not None and previous.depends != depends:  # e.g. an input shard removed
            previous.depends = depends
            previous.write(out_dir)
        return previous

    staging = storage.join(out_dir, STAGING_DIR)
    fingerprint = model_fingerprint(cfg)
    found = find_finished(staging, [staged_name(s) for s in pending], lambda url: _staged_stats(url, fingerprint))
    staged = {source: found[staged_name(source)] for source in pending}
    todo = [s for s in pending if staged[s] is None]
    log.info("%d input shards: %d in memory, %d staged, %d to embed",
             len(sources), len(done), len(pending) - len(todo), len(todo))
    if todo:
        init_ray()
        resources = replica_resources(cfg, len(todo))
        start = time.perf_counter()
        kwargs = {"cfg_json": cfg.model_dump_json(), "staging": staging, "cpus": resources.cpus,
                  "decode_processes": _decode_processes(cfg, resources.cpus, resources.gpus)}
        for stats in run_shard_jobs([{"source": s} for s in todo], ShardEmbedder, kwargs, resources,
                                    InputShardStats, desc="embed"):
            staged[stats.source] = stats
        log.info("embedded %d shards in %.1fs", len(todo), time.perf_counter() - start)
    return _finalize(cfg, out_dir, previous, pending, staged, d, depends)


def _finalize(cfg: RecoConfig, out_dir: str, previous: MemoryManifest | None, pending: list[str],
              staged: dict[str, InputShardStats], d: int, depends: dict | None) -> MemoryManifest:
    manifest = previous or MemoryManifest(model=cfg.model.name, pretrained=cfg.model.pretrained,
                                          model_config_file=cfg.model.config, d=d, dtype=cfg.embed.dtype)
    if depends is not None:
        manifest.depends = depends
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
        start = time.perf_counter()
        _write_parts(jobs, schema)
        log.info("wrote %d memory parts with ids in %.1fs", len(jobs), time.perf_counter() - start)
    manifest.write(out_dir)  # last: its presence means the parts above are complete
    storage.remove(staging, recursive=True)
    log.info("%s: %d rows in %d shards (%d skipped)", out_dir, manifest.total_rows,
             len(manifest.shards), manifest.skipped.total)
    return manifest


@ray.remote
def encode_texts(cfg_json: str, texts: list[str], batch_size: int) -> np.ndarray:
    """Unit text embeddings (n, d) float32 from the frozen text tower."""
    cfg = RecoConfig.model_validate_json(cfg_json)
    keep_freed_memory()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = load_clip(cfg.model, seed=cfg.seed, device=device)
    parts = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            tokens = clip.tokenizer(texts[i:i + batch_size]).to(device)
            parts.append(encode_text(clip.model, tokens).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, clip.embed_dim), np.float32)
