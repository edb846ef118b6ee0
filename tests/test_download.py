"""`reco download`: real img2dataset on Ray against the corpus server on 127.0.0.1."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import ray

from evaluation.datasets import prepare_dataset
from pipeline.download import CorpusManifest, DownloadError, download
from pipeline.embed import embed
from reco.cli import main as cli_main
from reco.config import ConfigError
from reco.demo import synthetic
from reco.demo.corpus_server import CorpusServer, write_url_list
from reco.encode import ShardEmbedder, staged_name
from reco.tars import iter_tar_samples, list_shards
from tests.conftest import make_config, start_local_ray

SHARD = 20
DOWNLOAD = {"number_sample_per_shard": SHARD, "timeout": 1, "image_size": 64, "thread_count": 16}


@pytest.fixture(scope="module")
def server():
    with CorpusServer(100, seed=5, slow_seconds=5) as s:
        yield s


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    """80 URLs, a quarter broken (every kind), 3 empty rows, downloaded into 4 shards."""
    start_local_ray()
    root = tmp_path_factory.mktemp("downloaded")
    urls = write_url_list(str(root / "urls.parquet"), server, broken_share=0.25, empty_rows=3, n=80)
    cfg = make_config(root / "work", download={**DOWNLOAD, "url_list": urls.path})
    start = len(server.requests)
    manifest = download(cfg)
    return cfg, urls, manifest, server.requests[start:]


def corpus_samples(folder: str) -> list:
    return [s for shard in list_shards(folder) for s in iter_tar_samples(shard)]


def test_every_row_accounted_for(downloaded):
    cfg, urls, manifest, requests = downloaded
    kinds = urls.kinds
    assert kinds["ok"] > 40 and all(kinds[k] > 0 for k in ("404", "slow", "loop", "text", "truncated",
                                                           "null url", "empty url", "empty caption"))
    assert manifest.input_rows == 80 and manifest.shards == 4
    assert manifest.successes == urls.downloadable
    assert manifest.successes + sum(manifest.failures.values()) == 80
    by_kind = Counter()
    for reason, n in manifest.failures.items():
        kind = ("404" if "404" in reason else "slow" if "timed out" in reason
                else "loop" if "infinite loop" in reason else "undecodable" if reason == "Image decoding error"
                else "no url" if reason.startswith("unknown url type") else reason)
        by_kind[kind] += n
    assert by_kind == {"404": kinds["404"], "slow": kinds["slow"], "loop": kinds["loop"],
                       "undecodable": kinds["text"] + kinds["truncated"],
                       "no url": kinds["null url"] + kinds["empty url"]}
    assert manifest.failed_to_resize == kinds["text"] + kinds["truncated"]
    assert CorpusManifest.read(cfg.path("corpus")) == manifest
    # the good samples are all there, each with its own caption and url
    captions = {u: c for u, c in zip(*pq.read_table(urls.path, columns=["url", "caption"]).to_pydict().values())}
    samples = corpus_samples(cfg.path("corpus"))
    assert len(samples) == manifest.successes
    assert all(captions[s.url] == s.caption and "/images/" in s.url for s in samples)
    assert len({s.key for s in samples}) == len(samples)
    leftovers = {p.name for p in Path(cfg.path("corpus")).iterdir()} - {"_manifest.json"}
    assert all(n.endswith((".tar", ".parquet", "_stats.json")) for n in leftovers)
    assert len(requests) >= 80 - kinds["null url"] - kinds["empty url"]


def test_rerun_of_finished_download_does_nothing(downloaded, server):
    cfg, _, manifest, _ = downloaded
    before = len(server.requests)
    assert download(cfg) == manifest
    assert len(server.requests) == before


def test_download_then_embed(downloaded, tiny_checkpoint, tmp_path):
    cfg, urls, manifest, _ = downloaded
    cfg = make_config(tmp_path / "work", model={"pretrained": tiny_checkpoint},
                      embed={"input": cfg.path("corpus")})
    memory = embed(cfg)
    # the one downloaded sample with an empty caption is skipped by embed, and counted
    assert memory.skipped.by_reason == {"empty caption": urls.kinds["empty caption"]}
    assert memory.total_rows == manifest.successes - urls.kinds["empty caption"]
    table = pa.concat_tables(pq.read_table(Path(cfg.path("memory"), s.path)) for s in memory.shards)
    by_key = {s.key: s for s in corpus_samples(cfg.embed.input)}
    assert table.num_rows == memory.total_rows
    for key, caption, url in zip(*table.select(["key", "caption", "url"]).to_pydict().values()):
        assert (by_key[key].caption, by_key[key].url) == (caption, url) and caption


def wide_image() -> bytes:
    """A 96x48 JPEG with a red and a blue band at its left and right edges, a disc between."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 48), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, 15, 47], fill=(220, 30, 30))
    draw.rectangle([80, 0, 95, 47], fill=(30, 30, 220))
    draw.ellipse([36, 12, 60, 36], fill=(240, 220, 40))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_memory_copy_embeds_like_the_evaluation_image(tiny_checkpoint, tmp_path):
    """A non-square image downloaded into the memory (the default resize_mode, and `border`)
    embeds as the same file does as an evaluation image: the near-duplicate exclusion and
    retrieval rest on this. The embedding is the embed actor's own code, run in-process
    (a Ray actor would add a process importing torch, ~20 s here, and nothing to check)."""
    start_local_ray()
    image = wide_image()
    folder = tmp_path / "eval-images" / "wide"
    folder.mkdir(parents=True)
    (folder / "0.jpg").write_bytes(image)
    cfg = make_config(tmp_path / "eval", model={"name": "reco-tiny", "pretrained": tiny_checkpoint},
                      evaluate={"datasets": [{"name": "wide", "kind": "imagefolder", "path": str(folder.parent),
                                              "templates": ["a {c}."]}]})
    sources = {"evaluation": prepare_dataset(cfg, cfg.evaluate.datasets[0]).shards[0]}
    with CorpusServer(1) as server:
        server.samples[0] = synthetic.Sample("wide", image, "a wide image", 0)
        url_list = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [server.image_url(0)], "caption": ["a wide image"]}), url_list)
        for mode in ("default", "border"):
            resize = {} if mode == "default" else {"resize_mode": mode}
            # 10 s: a 1 s timeout on a loaded machine would fail this one URL for nothing checked here
            download_cfg = {**DOWNLOAD, "url_list": str(url_list), "timeout": 10, **resize}
            downloaded = make_config(tmp_path / mode, download=download_cfg)
            corpus = download(downloaded)
            assert corpus.successes == 1, corpus.failures
            sources[mode] = list_shards(downloaded.path("corpus"))[0]
    embedder = ShardEmbedder(cfg.model_dump_json(), str(tmp_path / "staged"), cpus=1, decode_processes=0)
    emb = {}
    for name, source in sources.items():
        assert embedder.process(source).written == 1
        staged = pq.read_table(tmp_path / "staged" / staged_name(source))
        emb[name] = np.asarray(staged["image_embedding"][0].as_py(), np.float32)
    cosine = {mode: round(float(emb[mode] @ emb["evaluation"]), 4) for mode in ("default", "border")}
    # measured: default (keep_ratio) 0.9998, border 0.8462
    assert cosine["default"] >= 0.99, cosine
    assert cosine["border"] < 0.95, cosine  # the padded copy shows CLIP white bars


def slow_first_rows(server: CorpusServer, path: Path, n: int) -> str:
    """n working URLs, except that each shard's first URL times out (so every shard takes > 1 s)."""
    urls = [server.broken_url("slow", i) if i % SHARD == 0 else server.image_url(i) for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [s.caption for s in server.samples[:n]]}), path)
    return str(path)


def test_interrupted_download_resumes_missing_shards_only(server, tmp_path):
    """Kill `reco download` after its first shard; the re-run fetches the other shards only."""
    start_local_ray()
    url_list = slow_first_rows(server, tmp_path / "urls.parquet", 100)
    out = tmp_path / "work" / "corpus"
    config = tmp_path / "download.yaml"
    config.write_text(f"workdir: {tmp_path / 'work'}\ndownload: {{url_list: {url_list}, processes_count: 1, "
                      f"number_sample_per_shard: {SHARD}, timeout: 1, image_size: 64}}\n")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "reco.cli", "download", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("*_stats.json")):
            assert proc.poll() is None, "download finished before it could be interrupted"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(1)  # Ray stops the dead driver's task
    done = {p.name.split("_")[0] for p in out.glob("*_stats.json")}
    assert 1 <= len(done) < 5 and not (out / "_manifest.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in out.iterdir() if p.name[:5] in done}
    server.requests.clear()

    manifest = download(make_config(tmp_path / "work", download={**DOWNLOAD, "url_list": url_list}))
    assert manifest.input_rows == 100 and manifest.successes == 95
    assert manifest.failures == {"timed out": 5}
    refetched = {f"{int(p.rsplit('/', 1)[1].split('.')[0]) // SHARD:05d}" for p in server.requests}
    assert refetched and not refetched & done
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert len(corpus_samples(str(out))) == 95


def test_a_shard_that_cannot_be_finished_fails_alone(server, tmp_path, caplog):
    """A shard whose stats file cannot land in the output (a folder holds its name): the other
    shards are finished and kept, no manifest is written, and the error names the shard, its
    cause and the fix; the retry's warning is one line with the same cause."""
    start_local_ray()
    urls = write_url_list(str(tmp_path / "urls.parquet"), server, broken_share=0, n=3 * SHARD, seed=3)
    out = tmp_path / "work" / "corpus"
    (out / "00001_stats.json").mkdir(parents=True)
    cfg = make_config(tmp_path / "work", download={**DOWNLOAD, "url_list": urls.path, "max_shard_retry": 1})
    with caplog.at_level(logging.WARNING, logger="pipeline.download"), pytest.raises(DownloadError) as failed:
        download(cfg)
    assert str(failed.value).startswith("download (each shard tried 2 times): 1 of 3 shards failed (2 done); "
                                        "re-run the same command to retry them:\n  00001: IsADirectoryError: ")
    [retried] = [r.getMessage() for r in caplog.records if r.getMessage().endswith("retrying")]
    assert retried.startswith("shard 00001 failed (IsADirectoryError: ") and "\n" not in retried, retried
    assert not (out / "_manifest.json").exists()
    finished = sorted(p.name for p in out.glob("*_stats.json") if p.is_file())
    assert finished == ["00000_stats.json", "00002_stats.json"]
    # The cause gone, the same command fetches that shard only.
    shutil.rmtree(out / "00001_stats.json")
    server.requests.clear()
    assert download(cfg).successes == 3 * SHARD
    assert {int(p.rsplit("/", 1)[1].split(".")[0]) // SHARD for p in server.requests} == {1}


def test_folder_of_csv_files(server, tmp_path):
    """A folder of CSVs (other column names): shard ids run on across the files."""
    start_local_ray()
    folder = tmp_path / "urls"
    folder.mkdir()
    for part, rows in enumerate((range(0, 25), range(25, 40))):
        table = pa.table({"link": [server.image_url(i) for i in rows],
                          "text": [server.samples[i].caption for i in rows]})
        pa_csv.write_csv(table, folder / f"part{part}.csv")
    (folder / "notes.txt").write_text("not part of the list")
    cfg = make_config(tmp_path / "work", download={**DOWNLOAD, "url_list": str(folder), "input_format": "csv",
                                                   "url_col": "link", "caption_col": "text"})
    manifest = download(cfg)
    assert (manifest.shards, manifest.input_rows, manifest.successes) == (3, 40, 40)
    assert len(manifest.input_files) == 2
    assert sorted(p.name for p in Path(cfg.path("corpus")).glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert {s.caption for s in corpus_samples(cfg.path("corpus"))} == {s.caption for s in server.samples[:40]}


def test_bad_url_list_fails_before_any_work(server, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(ConfigError, match="download.url_list: .*nowhere.parquet does not exist"):
        download(make_config(work, download={"url_list": str(tmp_path / "nowhere.parquet")}))
    no_url = tmp_path / "no_url.parquet"
    pq.write_table(pa.table({"image": ["x"], "caption": ["y"]}), no_url)
    with pytest.raises(ConfigError, match="download.url_col: no column 'url' in .*image, caption"):
        download(make_config(work, download={"url_list": str(no_url)}))
    no_caption = tmp_path / "no_caption.tsv"
    no_caption.write_text("url\ttitle\nhttp://127.0.0.1/x.jpg\tx\n")
    with pytest.raises(ConfigError, match="download.caption_col: no column 'caption'"):
        download(make_config(work, download={"url_list": str(no_caption), "input_format": "tsv"}))
    with pytest.raises(ConfigError, match="download.url_list: .*not a readable parquet file"):
        download(make_config(work, download={"url_list": str(no_caption)}))
    with pytest.raises(ConfigError, match="download.save_additional_columns"):
        download(make_config(work, download={"url_list": str(no_url), "url_col": "image",
                                             "save_additional_columns": ["status"]}))
    with pytest.raises(ConfigError, match="download.url_list: required"):
        download(make_config(work))
    assert not work.exists()
    config = tmp_path / "c.yaml"
    config.write_text(f"workdir: {work}\ndownload: {{url_list: {no_url}}}\n")
    assert cli_main(["download", str(config)]) == 2
    assert not work.exists()


def test_no_url_list_with_existing_corpus_is_a_no_op(corpus_dir, tmp_path):
    """`reco run` on shards made elsewhere: download has nothing to do."""
    assert download(make_config(tmp_path / "work", embed={"input": corpus_dir})) is None
    assert not (tmp_path / "work").exists()


def test_s3_output(s3_bucket, server, tmp_path):
    import fsspec

    urls = write_url_list(str(tmp_path / "urls.parquet"), server, broken_share=0.1, n=30, seed=2)
    cfg = make_config(f"{s3_bucket}/dl", download={**DOWNLOAD, "url_list": urls.path})
    manifest = download(cfg)
    assert (manifest.input_rows, manifest.successes) == (30, urls.downloadable)
    fs = fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/dl/corpus"))
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar",
                     "00001_stats.json", "_manifest.json"]
    assert len(corpus_samples(f"{s3_bucket}/dl/corpus")) == urls.downloadable
