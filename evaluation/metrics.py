"""Zero-shot classification and image<->text retrieval metrics on L2-normalised embeddings.

The class embedding is CLIP's: the mean over prompt templates of the normalised text
embeddings, renormalised (clip_benchmark's `zero_shot_classifier`). Ranks use
`torch.topk`, as clip_benchmark does, so ties break the same way.
"""

from __future__ import annotations

import numpy as np
import torch


def class_embeddings(prompt_embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes * n_templates, d), class-major -> (n_classes, d) unit vectors."""
    per_class = prompt_embeddings.reshape(n_classes, -1, prompt_embeddings.shape[-1])
    per_class = per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)
    mean = per_class.mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def topk_predictions(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of the k keys of highest cosine per query, best first."""
    scores = torch.from_numpy(np.ascontiguousarray(queries, np.float32)) @ torch.from_numpy(
        np.ascontiguousarray(keys, np.float32)).T
    return scores.topk(min(k, keys.shape[0]), dim=1).indices.numpy()


def topk_accuracy(images: np.ndarray, classes: np.ndarray, labels: np.ndarray,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %}: how often the true class is among the k best (k <= classes)."""
    top = topk_predictions(images, classes, max(ks))
    hit = top == labels[:, None]
    return {f"top{k}": 100.0 * float(hit[:, :k].any(axis=1).mean())
            for k in ks if k <= classes.shape[0]}


def recall_at_k(images: np.ndarray, texts: np.ndarray, text_image: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recall in %, both directions.

    `text_image[j]` is the image that caption j describes (an image may have several).
    image->text R@K: an image counts if any of its captions is among its K best texts;
    text->image R@K: a caption counts if its image is among its K best images.
    """
    out: dict[str, float] = {}
    top_t = topk_predictions(images, texts, max(ks))
    top_i = topk_predictions(texts, images, max(ks))
    hit_t = text_image[top_t] == np.arange(len(images))[:, None]
    hit_i = top_i == text_image[:, None]
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100.0 * float(hit_t[:, :k].any(axis=1).mean())
    for k in ks:
        out[f"text_to_image_R@{k}"] = 100.0 * float(hit_i[:, :k].any(axis=1).mean())
    return out
