"""`reco embed`: the corpus's webdataset shards -> the Parquet memory (DESIGN.md section 3).

The frozen CLIP's replicas do the work (reco/encode.py); this stage names the input
(`embed.input`, default the corpus) and the output (`<workdir>/memory/`). Re-running it
skips the shards already in the memory and appends new ones with ids continuing.
"""

from __future__ import annotations

from reco.config import RecoConfig
from reco.contracts import CORPUS_DIR, MEMORY_DIR, MemoryManifest
from reco.encode import embed_shards
from reco.tars import list_shards


def embed(cfg: RecoConfig) -> MemoryManifest:
    """`reco embed`: embed every corpus shard not yet in `<workdir>/memory`."""
    sources = list_shards(cfg.embed.input or cfg.download.output or cfg.path(CORPUS_DIR))
    return embed_shards(cfg, sources, cfg.path(MEMORY_DIR))
