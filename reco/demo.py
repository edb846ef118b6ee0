"""`reco demo`: the pipeline, offline, on the synthetic corpus (the smoke config of reco).

It writes its config to `<workdir>/demo.yaml`, so every stage can be re-run by hand
with `reco <stage> <workdir>/demo.yaml`.
"""

from __future__ import annotations

import os
from pathlib import Path

from reco import storage, synthetic
from reco.config import RecoConfig, config_from_dict, dump_config

DEMO_SAMPLES = 4000
DEMO_SHARD_SIZE = 500


def demo_config(workdir: str) -> RecoConfig:
    return config_from_dict({
        "workdir": workdir,
        "seed": 0,
        "model": {"name": "reco-tiny"},
        "embed": {"batch_size": 128},
    })


def run_demo(workdir: str) -> RecoConfig:
    from pipeline.embed import embed

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = str(Path(workdir).resolve())
    cfg = demo_config(workdir)
    storage.write_bytes_atomic(storage.join(workdir, "demo.yaml"), dump_config(cfg).encode())
    corpus = cfg.path("corpus")
    if not storage.list_files(corpus, ".tar"):
        print(f"writing {DEMO_SAMPLES} synthetic image-text pairs to {corpus}")
        synthetic.write_webdataset(synthetic.make_samples(DEMO_SAMPLES, seed=cfg.seed), corpus,
                                   DEMO_SHARD_SIZE)
    manifest = embed(cfg)
    print(f"\nmemory: {cfg.path('memory')}")
    print(f"  {manifest.total_rows} pairs in {len(manifest.shards)} shards, d={manifest.d} "
          f"{manifest.dtype}, {manifest.skipped.total} skipped")
    for shard in manifest.shards:
        print(f"  {shard.path}: ids {shard.id_start}..{shard.id_end - 1} ({shard.rows} rows)")
    print(f"\nre-run any stage with: reco <stage> {workdir}/demo.yaml")
    return cfg
