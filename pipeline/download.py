"""`reco download`: a URL list -> webdataset shards in `<workdir>/corpus`, img2dataset on Ray.

img2dataset's own pieces do the work: its `Reader` cuts the URL list into shards, its
`Downloader` fetches, resizes and writes one shard (a .tar, a .parquet of every row's
status, and `{shard}_stats.json` last). We drive the downloader from our own Ray tasks
instead of its Ray distributor, which submits every shard at once, ignores
`max_shard_retry` and discards the results: here at most `processes_count` shards are in
flight, a failed shard task is retried, and every shard's stats are checked.

A shard is written under `_staging/` and moved into the output folder when complete,
stats file last, so `reco embed` never reads a half-written tar and a re-run after an
interruption downloads only the shards without stats. The corpus manifest
(`_manifest.json`: totals, successes, failures by reason) is written last of all.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from reco import storage
from reco.cluster import cluster_cpus, init_ray
from reco.config import ConfigError, DownloadConfig, RecoConfig
from reco.errors import RecoError, raised_in_task, shards_failed_message
from reco.contracts import CORPUS_DIR, MANIFEST, CorpusManifest
from reco.depends import stage_depends

# albumentations (imported by img2dataset) asks PyPI for a newer version on import unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.main import arguments_validator  # noqa: E402
from img2dataset.reader import Reader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from img2dataset.writer import WebDatasetSampleWriter  # noqa: E402

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
"""Shards being written; moved into the output folder when complete."""
TMP_DIR = "_tmp"
"""img2dataset's Reader writes each pending shard's rows here as a .feather file."""
SHARD_DIGITS = 5
"""Shard names are `{id:05d}` (img2dataset's default `oom_shard_count`)."""
STATS_SUFFIX = "_stats.json"
MAX_REASONS = 50
"""Failure reasons listed in the manifest; the rest are counted as `other`."""
PARQUET_MAGIC = b"PAR1"
"""A Parquet file's first bytes: one given as CSV/TSV would be parsed as garbage columns."""
WRITE_FAILURE = "failed while writing the sample (see the worker log)"


class DownloadError(RecoError, RuntimeError):
    """Shards still missing after `download.max_shard_retry` attempts; a re-run retries them."""


@dataclass
class UrlListPlan:
    """The URL list's files, their rows, and so the shard ids img2dataset's Reader gives them."""
    url_list: str
    files: list[str]
    rows: list[int]
    per_shard: int

    @property
    def shard_ids(self) -> list[int]:
        return list(range(sum(math.ceil(n / self.per_shard) for n in self.rows)))


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def _input_files(d: DownloadConfig) -> list[str]:
    """The URL list's files, as img2dataset's Reader lists them (a folder: sorted `*.<format>`)."""
    fs, path = storage.filesystem(d.url_list)
    if not fs.exists(path):
        raise ConfigError(f"download.url_list: {d.url_list} does not exist")
    if not fs.isdir(path):
        return [path]
    files = sorted(fs.glob(path.rstrip("/") + f"/*.{d.input_format}"))
    if not files:
        raise ConfigError(f"download.url_list: no .{d.input_format} files in {d.url_list}; "
                          "set download.input_format to the files' format")
    return files


def _columns_and_rows(fs, path: str, d: DownloadConfig) -> tuple[pa.Schema, int]:
    """The file's columns (with their types) and row count. A CSV's url and caption columns
    are read whole, as strings, so bytes that are not UTF-8 fail here, not in img2dataset."""
    with fs.open(path, "rb") as f:
        if d.input_format == "parquet":
            pf = pq.ParquetFile(f)
            return pf.schema_arrow, pf.metadata.num_rows
        if f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC:
            raise ConfigError(f"download.url_list: {path} is a Parquet file, not {d.input_format}; "
                              "set download.input_format=parquet")
        f.seek(0)
        parse = pa_csv.ParseOptions(delimiter="\t" if d.input_format == "tsv" else ",")
        schema = pa_csv.open_csv(f, parse_options=parse).schema
        text_columns = [c for c in (d.url_col, d.caption_col) if c in schema.names]
        if d.url_col not in schema.names:
            return schema, 0
        f.seek(0)
        as_text = pa_csv.ConvertOptions(include_columns=text_columns,
                                        column_types={c: pa.string() for c in text_columns})
        return schema, pa_csv.read_csv(f, parse_options=parse, convert_options=as_text).num_rows


def _check_columns(path: str, schema: pa.Schema, d: DownloadConfig) -> None:
    """Every configured column present; in Parquet, whose columns are typed, url and caption strings
    (a CSV's columns are all text, however pyarrow would infer them)."""
    names = schema.names
    for key, column in (("download.url_col", d.url_col), ("download.caption_col", d.caption_col),
                        *(("download.save_additional_columns", c) for c in d.save_additional_columns)):
        if column not in names:
            raise ConfigError(f"{key}: no column {column!r} in {path} (its columns: {', '.join(names)}); "
                              f"set {key} to the right column")
    if d.input_format != "parquet":
        return
    for key, column in (("download.url_col", d.url_col), ("download.caption_col", d.caption_col)):
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise ConfigError(f"{key}: column {column!r} in {path} holds {kind}, not strings; cast it to "
                              "string (img2dataset would store str() of each value)")


def _unreadable(path: str, d: DownloadConfig, err: Exception) -> ConfigError:
    if "UTF8" in str(err):
        return ConfigError(f"download.url_list: {path} is not UTF-8 ({str(err).splitlines()[0]}); "
                           "re-encode it as UTF-8")
    return ConfigError(f"download.url_list: {path} is not a readable {d.input_format} file ({err}); "
                       "set download.input_format to its format")


def plan_url_list(d: DownloadConfig) -> UrlListPlan:
    """Check the URL list (files exist and readable, columns present) and count its rows."""
    try:
        arguments_validator({"compute_hash": "sha256", "verify_hash": None,
                             "save_additional_columns": d.save_additional_columns or None})
    except ValueError as err:
        raise ConfigError(f"download.save_additional_columns: {err}") from None
    files = _input_files(d)
    fs, _ = storage.filesystem(d.url_list)
    rows = []
    for path in files:
        try:
            schema, n = _columns_and_rows(fs, path, d)
        except (pa.ArrowInvalid, OSError) as err:
            raise _unreadable(path, d, err) from None
        _check_columns(path, schema, d)
        rows.append(n)
    if not sum(rows):
        raise ConfigError(f"download.url_list: {d.url_list} has no rows; give a list with at least one URL")
    plan = UrlListPlan(d.url_list, [storage.full_url(fs, p) for p in files], rows, d.number_sample_per_shard)
    if len(plan.shard_ids) > 10**SHARD_DIGITS:
        raise ConfigError(f"download.number_sample_per_shard: {sum(rows)} rows make more than "
                          f"{10**SHARD_DIGITS} shards; raise it")
    return plan


def _make_downloader(d: DownloadConfig, staging: str, column_list: list[str]) -> Downloader:
    """img2dataset's downloader with its defaults (`img2dataset.download`) but our options."""
    resizer = Resizer(image_size=d.image_size, resize_mode=d.resize_mode, resize_only_if_bigger=False,
                      min_image_size=d.min_image_size)
    return Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=d.thread_count,
        save_caption=True, extract_exif=True, output_folder=staging, column_list=column_list,
        timeout=d.timeout, number_sample_per_shard=d.number_sample_per_shard,
        oom_shard_count=SHARD_DIGITS, compute_hash="sha256", verify_hash_type=None, encode_format="jpg",
        retries=d.retries, user_agent_token=d.user_agent_token,
        disallowed_header_directives=d.disallowed_header_directives or None)


@ray.remote(num_cpus=1, max_retries=0)  # retried by the driver, up to download.max_shard_retry
def _download_shard(downloader: Downloader, shard_id: int, feather: str, out_dir: str) -> dict:
    """Download one shard into staging, then move it into `out_dir`, stats file last.

    img2dataset deletes the input shard (`feather`) once the download is done, so a retry
    after a failure in the move moves what the earlier attempt staged instead of downloading."""
    feather_fs, feather_path = storage.filesystem(feather)
    if feather_fs.exists(feather_path):
        downloader.download_shard((shard_id, feather))
    fs, staging = storage.filesystem(downloader.output_folder)
    _, out_path = storage.filesystem(out_dir)
    name = shard_name(shard_id)
    for suffix in (".tar", ".parquet", STATS_SUFFIX):
        if fs.exists(f"{staging}/{name}{suffix}"):  # not moved by an earlier attempt
            fs.mv(f"{staging}/{name}{suffix}", f"{out_path}/{name}{suffix}")
    return storage.read_json(storage.join(out_dir, name + STATS_SUFFIX))


def _done_shards(out_dir: str) -> set[int]:
    """Shards with both a stats file (written last) and a tar."""
    def ids(suffix: str) -> set[int]:
        names = (url.rsplit("/", 1)[-1].removesuffix(suffix) for url in storage.list_files(out_dir, suffix))
        return {int(n) for n in names if n.isdigit()}
    return ids(STATS_SUFFIX) & ids(".tar")


def _download_pending(cfg: RecoConfig, out_dir: str, pending: list[int], done: set[int]) -> None:
    """Download the pending shards, at most `processes_count` at once, retrying failed tasks."""
    d = cfg.download
    for folder in (TMP_DIR, STAGING_DIR):
        fs, path = storage.filesystem(storage.join(out_dir, folder))
        fs.makedirs(path, exist_ok=True)
    reader = Reader(d.url_list, d.input_format, d.url_col, d.caption_col, None, None,
                    d.save_additional_columns or None, d.number_sample_per_shard, done,
                    storage.join(out_dir, TMP_DIR))
    init_ray()
    downloader = ray.put(_make_downloader(d, storage.join(out_dir, STAGING_DIR), reader.column_list))
    slots = d.processes_count or cluster_cpus()
    shards = iter(reader)
    retry: list[tuple[int, str, int]] = []
    in_flight: dict[ray.ObjectRef, tuple[int, str, int]] = {}
    failed: dict[int, str] = {}
    totals = Counter()
    with tqdm(total=len(pending), unit="shard", desc="download", disable=None) as bar:
        while True:
            while len(in_flight) < slots:
                job = retry.pop() if retry else next(((i, f, 0) for i, f in shards), None)
                if job is None:
                    break
                in_flight[_download_shard.remote(downloader, job[0], job[1], out_dir)] = job
            if not in_flight:
                break
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            shard_id, feather, attempt = in_flight.pop(ref)
            try:
                stats = ray.get(ref)
            except ray.exceptions.RayError as err:
                if attempt < d.max_shard_retry:
                    log.warning("shard %s failed (%s); retrying", shard_name(shard_id), _task_error(err))
                    retry.append((shard_id, feather, attempt + 1))
                else:
                    failed[shard_id] = _task_error(err)
                continue
            totals.update(count=stats["count"], successes=stats["successes"])
            bar.update(1)
            bar.set_postfix(images=totals["count"], ok=totals["successes"])
    if failed:
        raise DownloadError(shards_failed_message(
            f"download (each shard tried {d.max_shard_retry + 1} times)",
            [f"{shard_name(i)}: {e}" for i, e in sorted(failed.items())], len(pending)))


def _task_error(err: ray.exceptions.RayError) -> str:
    """What went wrong in a shard task, in one line: the task's own exception where Ray
    wrapped one (the first line of Ray's text is only the task's name and pid)."""
    cause = raised_in_task(err)
    return (str(err) if cause is err else f"{type(cause).__name__}: {cause}").splitlines()[0]


def _reason(message: str) -> str:
    """img2dataset's error message, first line (the redirect-loop one runs over several)."""
    return (message or "unknown error").strip().splitlines()[0]


def _aggregate(plan: UrlListPlan, out_dir: str) -> CorpusManifest:
    names = [shard_name(i) for i in plan.shard_ids]
    with ThreadPoolExecutor(16) as pool:  # object stores answer small reads slowly, but in parallel
        all_stats = list(pool.map(lambda n: storage.read_json(storage.join(out_dir, n + STATS_SUFFIX)), names))
    totals, reasons = Counter(), Counter()
    for stats in all_stats:
        totals.update({k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")})
        for message, n in stats["status_dict"].items():
            if message != "success":
                reasons[_reason(message)] += n
        # img2dataset logs, but does not count, a sample that failed while being written
        lost = stats["count"] - stats["successes"] - stats["failed_to_download"] - stats["failed_to_resize"]
        if lost:
            reasons[WRITE_FAILURE] += lost
    if totals["count"] != sum(plan.rows):
        raise DownloadError(f"{out_dir} holds {totals['count']} rows but the URL list has {sum(plan.rows)}: "
                            "it changed since the shards were downloaded. Set download.incremental_mode="
                            "overwrite, or download.output to another folder.")
    failures = dict(reasons.most_common(MAX_REASONS))
    other = totals["count"] - totals["successes"] - sum(failures.values())
    if other:
        failures["other"] = other  # reasons beyond MAX_REASONS, or past img2dataset's capped counter
    return CorpusManifest(url_list=plan.url_list, input_files=plan.files, shards=len(names),
                          input_rows=totals["count"], successes=totals["successes"],
                          failed_to_download=totals["failed_to_download"],
                          failed_to_resize=totals["failed_to_resize"], failures=failures)


def _no_url_list(cfg: RecoConfig, out_dir: str) -> None:
    """Without a URL list the corpus must come from elsewhere (`reco run` on existing shards)."""
    if cfg.embed.input or storage.list_files(out_dir, ".tar"):
        log.info("download.url_list is not set: nothing to download; embed reads %s",
                 cfg.embed.input or out_dir)
        return
    raise ConfigError("download.url_list: required, e.g. download.url_list=urls.parquet (a Parquet, "
                      "CSV or TSV file or folder with url and caption columns, any fsspec URL)")


def download(cfg: RecoConfig) -> CorpusManifest | None:
    """`reco download`: fetch every shard of `download.url_list` not yet in the corpus folder.

    Returns the corpus manifest, or None when no URL list is configured and the corpus
    already exists (so `reco run` works on shards made elsewhere).
    """
    d = cfg.download
    out_dir = d.output or cfg.path(CORPUS_DIR)
    if d.url_list is None:
        return _no_url_list(cfg, out_dir)
    plan = plan_url_list(d)
    depends = stage_depends(cfg, "download")
    if d.incremental_mode == "overwrite":
        storage.remove(out_dir, recursive=True)
    done = _done_shards(out_dir)
    pending = [i for i in plan.shard_ids if i not in done]
    previous = CorpusManifest.read(out_dir)
    if not pending and previous is not None and previous.input_files == plan.files \
            and previous.input_rows == sum(plan.rows):
        log.info("corpus is up to date: all %d shards downloaded", len(plan.shard_ids))
        if previous.depends != depends:  # settings that changed nothing: recorded, so `reco run` skips
            previous.depends = depends
            previous.write(out_dir)
        return previous
    log.info("%d rows in %d shards: %d downloaded, %d to download", sum(plan.rows),
             len(plan.shard_ids), len(plan.shard_ids) - len(pending), len(pending))
    storage.remove(storage.join(out_dir, MANIFEST))
    if pending:
        _download_pending(cfg, out_dir, pending, done)
    manifest = _aggregate(plan, out_dir)
    manifest.depends = depends
    manifest.write(out_dir)
    for folder in (TMP_DIR, STAGING_DIR):
        storage.remove(storage.join(out_dir, folder), recursive=True)
    log.info("%s: %d of %d rows downloaded; failures: %s", out_dir, manifest.successes,
             manifest.input_rows, manifest.failures or "none")
    return manifest
