"""Synthetic neighbour splits for tests and benchmarks, written as `reco neighbors` writes them.

Built so that retrieval carries signal: a pair's image and caption share a hidden
concept z only weakly (each is z plus strong noise), while its retrieved items are
further noisy views of z; fusing them recovers what the frozen embeddings lack.
"""

from __future__ import annotations

import numpy as np

from reco import storage
from reco.contracts import NEIGHBORS_DIR, NeighborsManifest, NeighborsShard, neighbors_table


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_split(rows: int, d: int, k: int, seed: int = 0, noise: float = 1.5) -> dict[str, np.ndarray]:
    """Arrays ids, image, text (rows, d), nn_text, nn_image (rows, k, d), nn_*_ids (rows, k)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, d)).astype(np.float32)

    def views(*shape: int) -> np.ndarray:
        centre = z.reshape(rows, *[1] * (len(shape) - 1), d)
        return _unit(centre + noise * rng.standard_normal((rows, *shape), dtype=np.float32))

    return {"ids": np.arange(rows), "image": views(d), "text": views(d), "nn_text": views(k, d),
            "nn_image": views(k, d), "nn_text_ids": rng.integers(0, rows, (rows, k)),
            "nn_image_ids": rng.integers(0, rows, (rows, k))}


def write_split(workdir: str, data: dict[str, np.ndarray], shards: int = 2, split: str = "train") -> None:
    """The arrays as neighbour shards plus manifest under `<workdir>/neighbors/<split>/`."""
    folder = storage.join(workdir, NEIGHBORS_DIR, split)
    rows, d = data["image"].shape
    records = []
    for i, part in enumerate(np.array_split(np.arange(rows), shards)):
        name = f"part-{i:05d}.parquet"
        table = neighbors_table(data["ids"][part], [f"key{j}" for j in part], data["image"][part],
                                data["text"][part], data["nn_text_ids"][part], data["nn_text"][part],
                                data["nn_image_ids"][part], data["nn_image"][part])
        storage.write_parquet_atomic(storage.join(folder, name), table)
        records.append(NeighborsShard(path=name, rows=len(part), source=f"memory/{name}"))
    NeighborsManifest(split=split, input="memory", model="synthetic", pretrained=None, d=d,
                      k=data["nn_text"].shape[1], dtype="float16", dedup_threshold=0.95, shards=records,
                      total_rows=rows).write(folder)
