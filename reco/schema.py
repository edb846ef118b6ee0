"""The memory's on-disk contract (DESIGN.md section 3): Parquet schema, manifest, skip stats.

One row per image-text pair; `id` is the row's global position (dense 0..N-1), so an
index id maps back to its pair without a join.
"""

from __future__ import annotations

from typing import Literal

from typing_extensions import Self

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field

from reco import storage

MANIFEST = "_manifest.json"
MEMORY_DIR = "memory"
MAX_SKIP_EXAMPLES = 100
"""Skipped samples listed by key per input shard; beyond that they are only counted."""


def memory_schema(d: int, dtype: Literal["float16", "float32"] = "float16") -> pa.Schema:
    vec = pa.list_(pa.float16() if dtype == "float16" else pa.float32(), d)
    return pa.schema([
        ("id", pa.int64()),
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("image_embedding", vec),
        ("text_embedding", vec),
    ])


def embedding_array(vectors: np.ndarray, dtype: Literal["float16", "float32"] = "float16") -> pa.FixedSizeListArray:
    """(n, d) array -> fixed_size_list<dtype>[d] column."""
    n, d = vectors.shape
    flat = np.ascontiguousarray(vectors, dtype=np.dtype(dtype)).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), d)


def embeddings_to_numpy(column: pa.ChunkedArray | pa.FixedSizeListArray, dtype=np.float32) -> np.ndarray:
    """fixed_size_list<float>[d] column -> (n, d) array, without a Python-level loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    d = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, d).astype(dtype, copy=False)


class SkipStats(BaseModel):
    """Samples not written, counted by reason, with the first few named by key."""
    total: int = 0
    by_reason: dict[str, int] = Field(default_factory=dict)
    examples: list[dict[str, str]] = Field(default_factory=list)

    def add(self, key: str, reason: str, source: str = "") -> None:
        self.total += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append({"key": key, "source": source, "reason": reason})

    def merge(self, other: "SkipStats") -> None:
        self.total += other.total
        for reason, n in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n
        room = MAX_SKIP_EXAMPLES - len(self.examples)
        self.examples.extend(other.examples[:max(room, 0)])


class InputShardStats(BaseModel):
    """What became of one input (corpus) shard."""
    source: str
    samples: int
    written: int
    skipped: SkipStats = Field(default_factory=SkipStats)
    seconds: dict[str, float] = Field(default_factory=dict)
    """Time spent per phase (read+decode, forward, write) in the embedding replica."""


class MemoryShard(BaseModel):
    path: str
    """File name relative to `<workdir>/memory/`."""
    rows: int
    id_start: int
    id_end: int
    """Exclusive: the shard holds ids id_start..id_end-1."""
    source: str
    """The input shard it was embedded from."""


class Manifest(BaseModel):
    """A stage folder's `_manifest.json`: written last, so its presence means "done"."""

    @classmethod
    def read(cls, folder: str) -> "Self | None":
        """The manifest in `folder`, or None while the stage there is unfinished."""
        url = storage.join(folder, MANIFEST)
        if not storage.exists(url):
            return None
        return cls.model_validate(storage.read_json(url))

    def write(self, folder: str) -> None:
        storage.write_json_atomic(storage.join(folder, MANIFEST), self.model_dump(mode="json"))


class MemoryManifest(Manifest):
    model: str
    pretrained: str | None
    model_config_file: str | None = None
    d: int
    dtype: Literal["float16", "float32"]
    shards: list[MemoryShard] = Field(default_factory=list)
    total_rows: int = 0
    inputs: list[InputShardStats] = Field(default_factory=list)
    skipped: SkipStats = Field(default_factory=SkipStats)

    def shard_urls(self, folder: str) -> list[str]:
        return [storage.join(folder, s.path) for s in self.shards]


def write_memory(folder: str, image: np.ndarray, text: np.ndarray, *, shard_rows: int,
                 append: bool = False, model: str = "external", pretrained: str | None = None,
                 dtype: Literal["float16", "float32"] = "float16") -> MemoryManifest:
    """Write embeddings you already have as a memory-format folder (parts + manifest), as
    `reco embed` would; with `append`, ids continue after the folder's existing rows.
    Keys, captions and urls are the ids as strings."""
    manifest = MemoryManifest.read(folder) if append else None
    manifest = manifest or MemoryManifest(model=model, pretrained=pretrained, d=image.shape[1], dtype=dtype)
    schema = memory_schema(image.shape[1], dtype)
    start = manifest.total_rows
    for lo in range(0, len(image), shard_rows):
        hi = min(lo + shard_rows, len(image))
        ids = np.arange(start + lo, start + hi)
        names = ids.astype(str)
        name = f"part-{len(manifest.shards):05d}.parquet"
        table = pa.table({"id": pa.array(ids, pa.int64()), "key": names, "caption": names, "url": names,
                          "image_embedding": embedding_array(image[lo:hi], dtype),
                          "text_embedding": embedding_array(text[lo:hi], dtype)}, schema=schema)
        storage.write_parquet_atomic(storage.join(folder, name), table)
        manifest.shards.append(MemoryShard(path=name, rows=hi - lo, id_start=start + lo, id_end=start + hi,
                                           source=f"{folder}/{name}"))
    manifest.total_rows = start + len(image)
    manifest.write(folder)
    return manifest
