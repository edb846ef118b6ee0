"""`reco demo`: the pipeline, offline, on the synthetic corpus (the smoke config of reco).

The corpus is served over HTTP on 127.0.0.1, so download runs img2dataset's real path.
The demo writes its config to `<workdir>/demo.yaml`, so every stage can be re-run by
hand with `reco <stage> <workdir>/demo.yaml`.
"""

from __future__ import annotations

import os
from pathlib import Path

from reco import storage
from reco.config import RecoConfig, config_from_dict, dump_config

DEMO_SAMPLES = 4000
DEMO_SHARD_SIZE = 500


def demo_config(workdir: str) -> RecoConfig:
    return config_from_dict({
        "workdir": workdir,
        "seed": 0,
        "model": {"name": "reco-tiny"},
        "download": {"url_list": f"{workdir}/urls.parquet", "number_sample_per_shard": DEMO_SHARD_SIZE,
                     "image_size": 64, "thread_count": 16, "timeout": 2},
        "embed": {"batch_size": 128},
    })


def run_demo(workdir: str) -> RecoConfig:
    from pipeline.corpus_server import CorpusServer, write_url_list
    from pipeline.download import download
    from pipeline.embed import embed
    from indexing.build import build_index

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = str(Path(workdir).resolve())
    cfg = demo_config(workdir)
    storage.write_bytes_atomic(storage.join(workdir, "demo.yaml"), dump_config(cfg).encode())

    with CorpusServer(DEMO_SAMPLES, seed=cfg.seed) as server:
        urls = write_url_list(cfg.download.url_list, server, broken_share=0.02, empty_rows=3, seed=cfg.seed)
        print(f"serving {DEMO_SAMPLES} synthetic image-text pairs at {server.url} "
              f"({urls.rows - urls.downloadable} URLs broken on purpose)")
        corpus = download(cfg)
    print(f"corpus: {cfg.path('corpus')}: {corpus.successes} of {corpus.input_rows} downloaded; "
          f"failures: {corpus.failures}")

    manifest = embed(cfg)
    print(f"\nmemory: {cfg.path('memory')}")
    print(f"  {manifest.total_rows} pairs in {len(manifest.shards)} shards, d={manifest.d} "
          f"{manifest.dtype}, {manifest.skipped.total} skipped")
    indices = build_index(cfg)
    for modality, index in indices.items():
        print(f"index/{modality}: {index.key}, recall@10 against exact search {index.recall_at_10:.3f}")
    print(f"\nre-run any stage with: reco <stage> {workdir}/demo.yaml")
    return cfg
