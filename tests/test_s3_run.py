"""The whole pipeline on object storage: `workdir: s3://...` on the moto server at 127.0.0.1.

download (img2dataset against the corpus server on 127.0.0.1) -> embed -> index ->
neighbors -> train -> evaluate, each stage's function called in order, with the URL list,
the evaluation images and every output on S3. At the end the report is on S3, and every
object the run left there reads back whole: no partial or temporary object is visible.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import faiss
import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from evaluation.evaluate import evaluate
from indexing.build import build_index
from indexing.neighbors import neighbors
from pipeline.download import download
from pipeline.embed import embed
from reco.config import RecoConfig
from reco.demo import synthetic
from reco.demo.corpus_server import CorpusServer, write_url_list
from tests.conftest import make_config

PAIRS = 60
EVAL_CLASSES = 3


def _eval_imagefolder(fs, root: str) -> None:
    """<root>/<class name>/<key>.jpg on S3, two images per class."""
    names = synthetic.classes()
    for s in synthetic.make_samples(2 * EVAL_CLASSES, seed=8, class_ids=range(EVAL_CLASSES)):
        fs.pipe(f"{root}/{names[s.label].name}/{s.key}.jpg", s.jpeg)


def _config(bucket: str, checkpoint: str) -> RecoConfig:
    work = f"{bucket}/run"
    return make_config(
        work, model={"pretrained": checkpoint},
        download={"url_list": f"{work}/urls.parquet", "number_sample_per_shard": 20, "image_size": 64,
                  "timeout": 2, "thread_count": 8},
        index={"key": "Flat", "recall_queries": 20},
        neighbors={"k": 4},
        train={"batch_size": 16, "epochs": 1, "warmup_steps": 1, "checkpoint_every": 2},
        evaluate={"datasets": [{"name": "shapes", "kind": "imagefolder", "path": f"{bucket}/eval-images",
                                "templates": ["a photo of a {c}."]}]})


def _zip_is_whole(data: bytes) -> None:
    """torch.save's zip format (checkpoints, fusion weights): every member's CRC checks out."""
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None


def _tar_is_whole(data: bytes) -> None:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert all(len(tar.extractfile(m).read()) == m.size for m in tar if m.isfile())


PARSERS = {
    ".parquet": lambda data: pq.read_table(io.BytesIO(data)),
    ".json": json.loads,
    ".npy": lambda data: np.load(io.BytesIO(data)),
    ".npz": lambda data: [a for a in np.load(io.BytesIO(data)).values()],
    ".index": lambda data: faiss.deserialize_index(np.frombuffer(data, np.uint8)),
    ".pt": _zip_is_whole,
    ".tar": _tar_is_whole,
}
"""Each output kind parsed completely: a partial object fails to parse."""


def _parse_all(fs, root: str) -> list[str]:
    """Every object under `root` of an output kind, parsed; returns their paths. (TensorBoard's
    event files and folder markers are no stage's output.)"""
    checked = []
    for path in fs.find(root):
        parse = next((f for suffix, f in PARSERS.items() if path.endswith(suffix)), None)
        if parse is not None:
            parse(fs.cat(path))
            checked.append(path)
    return checked


@pytest.mark.slow
def test_whole_pipeline_on_s3(s3_bucket, tiny_checkpoint):
    from training.train import train  # Ray Train's import is slow: only when this test runs

    fs = fsspec.filesystem("s3")
    cfg = _config(s3_bucket, tiny_checkpoint)
    _eval_imagefolder(fs, f"{s3_bucket}/eval-images")
    with CorpusServer(PAIRS, seed=5) as server:
        urls = write_url_list(cfg.download.url_list, server, broken_share=0.1, seed=1)
        corpus = download(cfg)
    assert (corpus.input_rows, corpus.successes) == (PAIRS, urls.downloadable)
    memory = embed(cfg)
    assert memory.total_rows == urls.downloadable
    assert build_index(cfg)["image"].ntotal == memory.total_rows
    assert neighbors(cfg).total_rows == memory.total_rows
    assert train(cfg)["steps"] == memory.total_rows // 16
    evaluate(cfg)

    report = json.loads(fs.cat(f"{cfg.workdir}/eval/report.json"))
    assert [(r["dataset"], r["metric"]) for r in report["results"]][:1] == [("shapes", "top1")]
    objects = fs.find(cfg.workdir)
    assert not [p for p in objects if ".tmp-" in p or "/_staging/" in p or "/_tmp/" in p]
    checked = {p.removeprefix(cfg.workdir.removeprefix("s3://") + "/") for p in _parse_all(fs, cfg.workdir)}
    for stage_output in ("corpus/_manifest.json", "memory/_manifest.json", "index/image/_manifest.json",
                         "neighbors/train/_manifest.json", "train/model/fusion.pt", "train/model/config.json",
                         "eval/report.json"):
        assert stage_output in checked
