"""Zero-shot classification and image<->text retrieval metrics on L2-normalised embeddings.

The class embedding is CLIP's: the mean over prompt templates of the normalised text
embeddings, renormalised (clip_benchmark's `zero_shot_classifier`). The metrics are
clip_benchmark's own functions, so the baseline equals its numbers, ties included.
"""

from __future__ import annotations

import numpy as np
import torch
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

RECALL_BATCH = 64
"""Queries per step of clip_benchmark's recall: it builds a (batch, k, candidates) one-hot."""


def class_embeddings(prompt_embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes * n_templates, d), class-major -> (n_classes, d) unit vectors."""
    per_class = prompt_embeddings.reshape(n_classes, -1, prompt_embeddings.shape[-1])
    per_class = per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)
    mean = per_class.mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def topk_predictions(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of the k keys of highest cosine per query, best first."""
    return _scores(queries, keys).topk(min(k, keys.shape[0]), dim=1).indices.numpy()


def _scores(queries: np.ndarray, keys: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(queries, np.float32)) @ torch.from_numpy(
        np.ascontiguousarray(keys, np.float32)).T


def topk_accuracy(images: np.ndarray, classes: np.ndarray, labels: np.ndarray,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %}: how often the true class is among the k best (k <= classes),
    by clip_benchmark's own `accuracy`."""
    ks = tuple(k for k in ks if k <= classes.shape[0])
    acc = zeroshot_classification.accuracy(_scores(images, classes), torch.from_numpy(np.asarray(labels)), ks)
    return {f"top{k}": 100.0 * a for k, a in zip(ks, acc)}


def retrieval_recall(images: np.ndarray, texts: np.ndarray, text_image: np.ndarray,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recall in %, both directions, by clip_benchmark's own `recall_at_k`.

    `text_image[j]` is the image that caption j describes (an image may have several).
    image->text R@K: an image counts if any of its captions is among its K best texts;
    text->image R@K: a caption counts if its image is among its K best images.
    """
    scores = _scores(texts, images)  # (texts, images), as clip_benchmark lays them out
    positive = torch.from_numpy(np.asarray(text_image)[:, None] == np.arange(len(images))[None, :])
    out: dict[str, float] = {}
    for name, (s, p) in {"image_to_text": (scores.T, positive.T), "text_to_image": (scores, positive)}.items():
        for k in ks:
            hits = zeroshot_retrieval.batchify(zeroshot_retrieval.recall_at_k, s, p, RECALL_BATCH, "cpu",
                                               k=min(k, s.shape[1])) > 0
            out[f"{name}_R@{k}"] = 100.0 * hits.float().mean().item()
    return out
