"""The work directory's contracts (DESIGN.md section 3): every stage folder's name, schema and manifest.

Each stage imports the contract of its input and of its output from here, and nothing
of another stage's code. A stage's `_manifest.json` is written last: its presence
means "done". In the memory, one row per image-text pair; `id` is the row's global
position (dense 0..N-1), so an index id maps back to its pair without a join.
"""

from __future__ import annotations

from typing import Any, Literal

from typing_extensions import Self

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field

from reco import storage

MANIFEST = "_manifest.json"
CORPUS_DIR = "corpus"
MEMORY_DIR = "memory"
INDEX_DIR = "index"
INDEX_EMBEDDINGS_DIR = "embeddings"
"""`<workdir>/index/<modality>/embeddings/`: a memory-mappable copy of each memory shard's
embeddings of that modality (row = id - id_start)."""
NEIGHBORS_DIR = "neighbors"
TRAIN_DIR = "train"
FUSION_WEIGHTS = "fusion.pt"
FUSION_META = "config.json"
"""Written after the weights: its presence means a fusion model folder is complete."""
EVAL_DIR = "eval"
EVAL_EMBEDDINGS_DIR = "_embeddings"
"""`<workdir>/eval/_embeddings/`: every evaluation set's images, memory-format."""
Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, Modality] = ("image", "text")
OTHER: dict[str, Modality] = {"image": "text", "text": "image"}
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

    depends: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """What the output was made from: {"config": the stage's config values, "inputs": its
    inputs' generation} (reco/depends.py); `reco run` skips the stage while both match."""

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


# ---------------------------------------------------------------- corpus/ (reco download)

class CorpusManifest(Manifest):
    """`<corpus>/_manifest.json`: what became of every row of the URL list."""
    url_list: str
    input_files: list[str]
    shards: int
    input_rows: int
    successes: int
    failed_to_download: int
    failed_to_resize: int
    failures: dict[str, int]
    """Failed rows by reason (img2dataset's error messages); sums to the failed rows."""

    @property
    def failed(self) -> int:
        return self.input_rows - self.successes


# ---------------------------------------------------------------- index/ (reco index)

class CoveredShard(BaseModel):
    """A memory shard whose vectors an index shard holds, and its embedding copy."""
    path: str
    """Memory shard file name under `<workdir>/memory/`."""
    rows: int
    id_start: int
    id_end: int
    embeddings: str
    """The `.npy` copy of its embeddings, relative to the modality folder."""


class IndexShard(BaseModel):
    path: str
    """Index file name, relative to the modality folder."""
    ntotal: int
    bytes: int
    """File size: a shorter file on disk is a truncated copy."""
    memory_shards: list[CoveredShard]


class IndexManifest(Manifest):
    """`<workdir>/index/<modality>/_manifest.json`: what the index holds; written last."""
    modality: Modality
    key: str
    """The faiss index factory key (chosen by autofaiss unless `index.key` names one)."""
    index_param: str
    """Search hyperparameters (nprobe, efSearch...) set on every shard at load time."""
    metric: str
    d: int
    generation: int
    """Bumped by every build that changes the index; both modalities carry the same one."""
    train_id: str
    trained_on_rows: int
    """Memory rows when the index was trained; the sample was drawn from these."""
    train_sample: int
    memory_model: str
    memory_pretrained: str | None
    shards: list[IndexShard]
    total_rows: int
    """Memory rows covered (ids 0..total_rows-1); skipped rows are in no shard."""
    ntotal: int
    skipped: SkipStats = Field(default_factory=SkipStats)
    recall_at_10: float | None
    """Mean recall@10 of the sharded search against exact search, on held-out queries."""
    recall_queries: int
    exact: str
    """The exact top-10 of the recall queries over the covered memory (`.npz`)."""
    seconds: dict[str, float] = Field(default_factory=dict)


def index_folder(workdir: str, modality: str) -> str:
    return storage.join(workdir, INDEX_DIR, modality)


# ---------------------------------------------------------------- neighbors/<split>/ (reco neighbors)

def neighbors_schema(d: int, k: int, dtype: Literal["float16", "float32"] = "float16",
                     uni: bool = False) -> pa.Schema:
    """One row per query pair; nn_text[j] is the text of pair nn_text_ids[j] (found by the
    image's search), nn_image[j] the image of pair nn_image_ids[j] (found by the text's).
    With `uni` (written for `train.fuse=uni`) also the same-modality embeddings of those
    pairs: nn_image_uni[j] the image of pair nn_text_ids[j], nn_text_uni[j] the text of
    pair nn_image_ids[j]."""
    vec = pa.list_(pa.float16() if dtype == "float16" else pa.float32(), d)
    fields = [
        ("id", pa.int64()), ("key", pa.string()),
        ("image_embedding", vec), ("text_embedding", vec),
        ("nn_text", pa.list_(vec, k)), ("nn_image", pa.list_(vec, k)),
        ("nn_image_ids", pa.list_(pa.int64(), k)), ("nn_text_ids", pa.list_(pa.int64(), k)),
    ]
    if uni:
        fields += [("nn_image_uni", pa.list_(vec, k)), ("nn_text_uni", pa.list_(vec, k))]
    return pa.schema(fields)


def token_columns(fuse: str) -> tuple[str, str, str, str]:
    """Neighbour-shard columns (image tokens, image neighbour ids, text tokens, text neighbour
    ids): what image queries and text queries are fused with under `train.fuse`."""
    if fuse == "uni":
        return "nn_image_uni", "nn_text_ids", "nn_text_uni", "nn_image_ids"
    return "nn_text", "nn_text_ids", "nn_image", "nn_image_ids"


def nested_array(x: np.ndarray, dtype: Literal["float16", "float32"] = "float16") -> pa.FixedSizeListArray:
    """(n, k, d) array -> fixed_size_list<fixed_size_list<dtype>[d]>[k] column."""
    n, k, d = x.shape
    return pa.FixedSizeListArray.from_arrays(embedding_array(x.reshape(n * k, d), dtype), k)


def nested_to_numpy(column: pa.ChunkedArray | pa.FixedSizeListArray, dtype=np.float32) -> np.ndarray:
    """fixed_size_list<fixed_size_list<float>[d]>[k] column -> (n, k, d) array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    k = column.type.list_size
    return embeddings_to_numpy(column.flatten(), dtype).reshape(len(column), k, -1)


def neighbors_table(ids: np.ndarray, keys: list[str], image: np.ndarray, text: np.ndarray,
                    nn_text_ids: np.ndarray, nn_text: np.ndarray, nn_image_ids: np.ndarray,
                    nn_image: np.ndarray, dtype: Literal["float16", "float32"] = "float16",
                    uni: tuple[np.ndarray, np.ndarray] | None = None) -> pa.Table:
    """`uni`: (nn_image_uni, nn_text_uni) for `train.fuse=uni`, see `neighbors_schema`."""
    k = nn_text_ids.shape[1]
    ids_col = lambda x: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1).astype(np.int64)), k)  # noqa: E731
    return pa.Table.from_arrays([
        pa.array(ids, pa.int64()), pa.array(keys, pa.string()),
        embedding_array(image, dtype), embedding_array(text, dtype),
        nested_array(nn_text, dtype), nested_array(nn_image, dtype),
        ids_col(nn_image_ids), ids_col(nn_text_ids),
        *(nested_array(x, dtype) for x in uni or ()),
    ], schema=neighbors_schema(image.shape[1], k, dtype, uni is not None))


class NeighborsShard(BaseModel):
    path: str
    """File name relative to `<workdir>/neighbors/<split>/`."""
    rows: int
    source: str
    """The input (memory-format) shard its queries come from."""
    short: int = 0
    """Queries with fewer than k admissible neighbours in a modality (padded: id -1, zeros)."""
    seconds: float = 0.0


class NeighborsManifest(Manifest):
    split: str
    input: str
    model: str
    pretrained: str | None
    d: int
    k: int
    dtype: Literal["float16", "float32"]
    dedup_threshold: float
    search: Literal["uni", "cross"] = "uni"
    """`neighbors.search`: which memory index each query searched."""
    uni: bool = False
    """The shards also hold nn_image_uni and nn_text_uni (`RecoConfig.writes_uni`)."""
    shards: list[NeighborsShard] = Field(default_factory=list)
    total_rows: int = 0
    short: int = 0


def neighbors_folder(workdir: str, split: str, search: str = "uni") -> str:
    """`neighbors/<split>/`; a cross-modal search (an ablation) writes `neighbors/<split>-searchcross/`
    beside it, so both can be trained on."""
    return storage.join(workdir, NEIGHBORS_DIR, split if search == "uni" else f"{split}-search{search}")


# ---------------------------------------------------------------- train/ (reco train)

def fusion_model_name(variant: str = "reco") -> str:
    """The folder under `<workdir>/train/` of a fusion model: `model` for RECO, `model-<variant>`
    for an ablation (`RecoConfig.variant`), e.g. `model-noretrieval` for the control."""
    return "model" if variant == "reco" else "model-" + variant.replace("_", "")


def fusion_model_dir(workdir: str, variant: str = "reco") -> str:
    """Holds `fusion.pt` and, written after it, `config.json` (d, heads, k, steps, config)."""
    return storage.join(workdir, TRAIN_DIR, fusion_model_name(variant))
