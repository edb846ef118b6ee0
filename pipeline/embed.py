"""`reco embed`: the corpus's webdataset shards -> the Parquet memory (DESIGN.md section 3).

The frozen CLIP's replicas do the work (reco/encode.py); this stage names the input
(`embed.input`, default the corpus) and the output (`<workdir>/memory/`). Re-running it
skips the shards already in the memory and appends new ones with ids continuing.
"""

from __future__ import annotations

from reco.config import RecoConfig
from reco.contracts import MEMORY_DIR, MemoryManifest
from reco.depends import embed_input, stage_depends
from reco.encode import embed_shards
from reco.tars import list_shards


def embed(cfg: RecoConfig) -> MemoryManifest:
    """`reco embed`: embed every corpus shard not yet in `<workdir>/memory`."""
    sources = list_shards(embed_input(cfg))
    return embed_shards(cfg, sources, cfg.path(MEMORY_DIR), depends=stage_depends(cfg, "embed", sources))
