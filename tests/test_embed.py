"""`reco embed`: the memory equals open_clip's own embeddings, resumes, appends, counts bad input."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.embed import embed
from reco.config import ConfigError
from reco.contracts import MemoryManifest, embeddings_to_numpy, memory_schema
from reco.demo import synthetic
from tests.conftest import make_config

pytestmark = pytest.mark.usefixtures("ray_local")


def read_memory(workdir: str) -> pa.Table:
    manifest = MemoryManifest.read(f"{workdir}/memory")
    return pa.concat_tables(pq.read_table(u) for u in manifest.shard_urls(f"{workdir}/memory"))


def test_rows_equal_open_clip_embeddings(tiny_config, tiny_checkpoint, corpus_dir):
    cfg = tiny_config.model_copy(update={"embed": tiny_config.embed.model_copy(update={"dtype": "float32"})})
    embed(cfg)
    table = read_memory(cfg.workdir)

    model, _, preprocess = open_clip.create_model_and_transforms("reco-tiny", pretrained=tiny_checkpoint)
    model.eval()
    tokenizer = open_clip.get_tokenizer("reco-tiny")
    samples = {s.key: s for s in synthetic.make_samples(120, seed=3)}
    rows = table.to_pydict()
    keys = rows["key"][::7]
    images = torch.stack([preprocess(Image.open(io.BytesIO(samples[k].jpeg)).convert("RGB")) for k in keys])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1).numpy()
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer([samples[k].caption for k in keys])),
                                            dim=-1).numpy()
    ours_img = embeddings_to_numpy(table.column("image_embedding"))[::7]
    ours_txt = embeddings_to_numpy(table.column("text_embedding"))[::7]
    assert (np.sum(ours_img * img, axis=1) >= 0.9999).all()
    assert (np.sum(ours_txt * txt, axis=1) >= 0.9999).all()
    assert rows["caption"][::7] == [samples[k].caption for k in keys]


def test_schema_and_manifest(tiny_config):
    manifest = embed(tiny_config)
    table = read_memory(tiny_config.workdir)
    assert table.schema.equals(memory_schema(64, "float16"))
    assert table.column("id").to_pylist() == list(range(120))
    assert len(set(table.column("key").to_pylist())) == 120
    norms = np.linalg.norm(embeddings_to_numpy(table.column("text_embedding")), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)

    on_disk = json.loads(Path(tiny_config.workdir, "memory", "_manifest.json").read_text())
    assert on_disk["model"] == "reco-tiny" and on_disk["d"] == 64 and on_disk["dtype"] == "float16"
    assert on_disk["total_rows"] == 120
    assert [(s["id_start"], s["id_end"], s["rows"]) for s in on_disk["shards"]] == [(0, 40, 40), (40, 80, 40),
                                                                                    (80, 120, 40)]
    assert all(i["samples"] == i["written"] == 40 for i in on_disk["inputs"])
    assert manifest.total_rows == 120
    assert not Path(tiny_config.workdir, "memory", "_staging").exists()
    # Re-running finds nothing to do and leaves the parts as they are.
    mtimes = [p.stat().st_mtime_ns for p in sorted(Path(tiny_config.workdir, "memory").glob("part-*"))]
    embed(tiny_config)
    assert mtimes == [p.stat().st_mtime_ns for p in sorted(Path(tiny_config.workdir, "memory").glob("part-*"))]


def test_append_keeps_ids_dense(tmp_path, tiny_checkpoint, corpus_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (corpus / name).write_bytes(Path(corpus_dir, name).read_bytes())
    cfg = make_config(tmp_path / "work", model={"pretrained": tiny_checkpoint}, embed={"input": str(corpus)})
    embed(cfg)
    first = Path(cfg.workdir, "memory", "part-00000.parquet").read_bytes()

    (corpus / "00002.tar").write_bytes(Path(corpus_dir, "00002.tar").read_bytes())
    manifest = embed(cfg)
    assert manifest.total_rows == 120
    assert [s.id_start for s in manifest.shards] == [0, 40, 80]
    assert read_memory(cfg.workdir).column("id").to_pylist() == list(range(120))
    assert Path(cfg.workdir, "memory", "part-00000.parquet").read_bytes() == first
    # The appended memory equals one embedded in a single run.
    whole = make_config(tmp_path / "whole", model={"pretrained": tiny_checkpoint}, embed={"input": str(corpus)})
    embed(whole)
    assert read_memory(whole.workdir).equals(read_memory(cfg.workdir))


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bad_shard(path: Path, good: int = 8, bad_at: int = 4) -> None:
    """`good` good samples with one of each kind of bad one (5) among them, from position `bad_at`."""
    samples = list(synthetic.make_samples(good, seed=5, key_prefix="good"))
    with tarfile.open(path, "w") as tar:
        for s in samples[:bad_at]:
            _member(tar, f"{s.key}.jpg", s.jpeg)
            _member(tar, f"{s.key}.txt", s.caption.encode())
        _member(tar, "corrupt.jpg", samples[0].jpeg[: len(samples[0].jpeg) // 3])
        _member(tar, "corrupt.txt", b"a photo of a thing")
        _member(tar, "notimage.jpg", b"<html>not an image</html>")
        _member(tar, "notimage.txt", b"a photo of a thing")
        _member(tar, "emptycap.jpg", samples[1].jpeg)
        _member(tar, "emptycap.txt", b"   ")
        _member(tar, "nocap.jpg", samples[2].jpeg)
        _member(tar, "noimage.txt", b"a caption without an image")
        for s in samples[bad_at:]:
            _member(tar, f"{s.key}.jpg", s.jpeg)
            _member(tar, f"{s.key}.txt", s.caption.encode())


def test_bad_samples_are_skipped_and_counted(tmp_path, tiny_checkpoint):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _bad_shard(corpus / "00000.tar")
    # A truncated copy: cut inside the last sample's image.
    with tarfile.open(corpus / "00000.tar") as tar:
        last_image = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
    whole = (corpus / "00000.tar").read_bytes()
    (corpus / "00001.tar").write_bytes(whole[: last_image.offset_data + last_image.size // 2])
    cfg = make_config(tmp_path / "work", model={"pretrained": tiny_checkpoint}, embed={"input": str(corpus)})
    manifest = embed(cfg)

    first, second = manifest.inputs
    assert (first.samples, first.written) == (13, 8)
    reasons = {e["key"]: e["reason"] for e in first.skipped.examples}
    assert reasons["corrupt"].startswith("unreadable image")
    assert reasons["notimage"].startswith("unreadable image")
    assert reasons["emptycap"] == "empty caption"
    assert reasons["nocap"] == "missing caption"
    assert reasons["noimage"] == "missing image"
    assert second.skipped.by_reason.get("truncated tar") == 1
    assert second.written == 7 and second.samples == second.written + second.skipped.total
    assert manifest.skipped.total == first.skipped.total + second.skipped.total
    assert manifest.total_rows == 15
    keys = read_memory(cfg.workdir).column("key").to_pylist()
    assert "corrupt" not in keys and keys.count("good000000000") == 2


def test_bad_config_fails_before_work(tmp_path, tiny_checkpoint, corpus_dir):
    with pytest.raises(ConfigError, match="embed.input: .*does not exist"):
        embed(make_config(tmp_path / "w", model={"pretrained": tiny_checkpoint},
                          embed={"input": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match="model.pretrained"):
        embed(make_config(tmp_path / "w", model={"pretrained": str(tmp_path / "missing.pt")},
                          embed={"input": corpus_dir}))
    with pytest.raises(ConfigError, match=r"embed.batchsize: unknown key; did you mean embed.batch_size\?"):
        make_config(tmp_path / "w", embed={"batchsize": 3})
    with pytest.raises(ConfigError, match="embed.batch_size"):
        make_config(tmp_path / "w", embed={"batch_size": "many"})
    with pytest.raises(ConfigError, match="model.name: unknown architecture"):
        embed(make_config(tmp_path / "w", model={"name": "ViT-Q-99"}, embed={"input": corpus_dir}))
    assert not (tmp_path / "w").exists()


def test_other_model_does_not_touch_existing_memory(tiny_config):
    embed(tiny_config)
    parts = {p: p.read_bytes() for p in Path(tiny_config.workdir, "memory").iterdir()}
    other = tiny_config.model_copy(update={"embed": tiny_config.embed.model_copy(update={"dtype": "float32"})})
    with pytest.raises(ConfigError, match="appending would mix embedding spaces"):
        embed(other)
    assert parts == {p: p.read_bytes() for p in Path(tiny_config.workdir, "memory").iterdir()}


def test_resume_after_kill_equals_uninterrupted(tmp_path, tiny_checkpoint, caplog):
    corpus = tmp_path / "corpus"
    synthetic.write_webdataset(synthetic.make_samples(240, seed=11), str(corpus), samples_per_shard=40)
    config = tmp_path / "killed.yaml"
    config.write_text(f"workdir: {tmp_path / 'killed'}\nmodel: {{pretrained: {tiny_checkpoint}}}\n"
                      f"embed: {{input: {corpus}, batch_size: 8, num_actors: 1}}\n")
    staging = tmp_path / "killed" / "memory" / "_staging"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "reco.cli", "embed", str(config)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(staging.glob("*.parquet")):
            assert proc.poll() is None, "embed finished before it could be interrupted"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    staged = len(list(staging.glob("*.parquet")))
    assert 1 <= staged < 6
    assert not (tmp_path / "killed" / "memory" / "_manifest.json").exists()

    with caplog.at_level(logging.INFO, logger="reco.encode"):
        from reco.config import load_config
        resumed = embed(load_config(config))
    assert f"{staged} staged, {6 - staged} to embed" in caplog.text
    uninterrupted = make_config(tmp_path / "whole", model={"pretrained": tiny_checkpoint},
                                embed={"input": str(corpus), "batch_size": 8})
    embed(uninterrupted)
    assert resumed.total_rows == 240
    assert read_memory(str(tmp_path / "killed")).equals(read_memory(uninterrupted.workdir))


def test_s3_workdir(s3_bucket, tiny_checkpoint, corpus_dir):
    import fsspec

    fs = fsspec.filesystem("s3")
    for name in ("00000.tar", "00001.tar"):
        fs.put(str(Path(corpus_dir, name)), f"{s3_bucket}/work/corpus/{name}")
    cfg = make_config(f"{s3_bucket}/work", model={"pretrained": tiny_checkpoint})
    manifest = embed(cfg)
    assert manifest.total_rows == 80
    assert fs.exists(f"{s3_bucket}/work/memory/_manifest.json")
    assert not fs.exists(f"{s3_bucket}/work/memory/_staging")
    table = pa.concat_tables(pq.read_table(u, filesystem=fs) for u in
                             [u.removeprefix("s3://") for u in manifest.shard_urls(f"{s3_bucket}/work/memory")])
    assert table.column("id").to_pylist() == list(range(80))
    assert MemoryManifest.read(f"{s3_bucket}/work/memory").total_rows == 80
