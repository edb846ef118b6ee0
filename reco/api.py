"""`reco.load(workdir)`: RECO-refined embeddings and zero-shot classification for applications.

The returned `Reco` holds the frozen CLIP, the trained fusion modules of
`<workdir>/train/model/` and the searchable memory (`MemoryIndex`: opened in this process,
or a memory service's client passed as `load(..., memory=)`), and computes what
`reco evaluate` computes for the same inputs: images decoded and preprocessed as the
embed stage does, texts through the same text tower, the same k neighbours per query
(uni-modal search, cross-modal gather, the query image's near-duplicates dropped above
the saved `neighbors.dedup_threshold`), refined by the same `reco.fusion.refine`; class
embeddings are evaluate's template means (`evaluation.metrics.class_embeddings`).

One difference is an option: evaluate also leaves every memory pair that near-duplicates
any image of the test set out of all its retrievals. `classify(...,
exclude_near_duplicates=True)` does that for the images given, and `encode_image` /
`encode_text` take the ids to leave out (`exclude_ids`, e.g. from `near_duplicate_ids`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Sequence, Union

import fsspec
import numpy as np
import torch
from PIL import Image

from evaluation.datasets import DEFAULT_TEMPLATE_SET, bundled_templates
from evaluation.metrics import class_embeddings
from reco import storage
from reco.config import ConfigError, ModelConfig, NeighborsConfig, RecoConfig
from reco.contracts import (FUSION_META, MEMORY_DIR, MODALITIES, IndexManifest, MemoryManifest, Modality,
                            fusion_model_dir, index_folder)
from reco.errors import RecoError
from reco.fusion import RecoFusion, load_fusion, refine
from reco.models import Clip, embed_dim, encode_text, load_clip
from reco.search import MemoryIndex, near_duplicate_ids, neighbour_embeddings

ImageInput = Union[Image.Image, bytes, str, os.PathLike]
"""A PIL image, an encoded image file's bytes, or a local path / fsspec URL of one."""

BATCH_SIZE = 256
"""Images or texts per forward pass of the frozen CLIP (evaluate's default batch)."""


class InputError(RecoError, ValueError):
    """An input the API cannot encode (an empty list, a non-image, a wrong type); the message
    names the item."""


@dataclass
class Classification:
    """Zero-shot predictions: the best class name per image and every class's cosine score."""
    labels: list[str]
    scores: np.ndarray
    """(n_images, n_classes) float32 cosine similarities, columns in `classnames` order."""


def _saved_config(workdir: str, meta: dict) -> tuple[ModelConfig, int, NeighborsConfig]:
    """The frozen CLIP, seed and neighbour settings the fusion model was trained with: the
    whole config saved beside it by `reco train`, else the memory manifest's model."""
    memory = MemoryManifest.read(storage.join(workdir, MEMORY_DIR))
    if memory is None:
        raise ConfigError(f"workdir: no finished memory at {storage.join(workdir, MEMORY_DIR)}; "
                          "run `reco embed` first")
    if "config" not in meta:
        model = ModelConfig(name=memory.model, pretrained=memory.pretrained, config=memory.model_config_file)
        return model, 0, NeighborsConfig()
    cfg = RecoConfig.model_validate(meta["config"])
    if (memory.model, memory.pretrained) != (cfg.model.name, cfg.model.pretrained):
        raise ConfigError(f"workdir: the memory was embedded with {memory.model}/{memory.pretrained}, the "
                          f"fusion model trained with {cfg.model.name}/{cfg.model.pretrained}: retrain it")
    return cfg.model, cfg.seed, cfg.neighbors


def check_workdir(workdir: str) -> None:
    """What `load` needs, checked before anything is loaded: a trained fusion model and the index."""
    model_dir = fusion_model_dir(workdir)
    if not storage.exists(storage.join(model_dir, FUSION_META)):
        raise ConfigError(f"workdir: no trained fusion model at {model_dir} ({FUSION_META} missing); "
                          "run `reco train` first")
    for modality in MODALITIES:
        if IndexManifest.read(index_folder(workdir, modality)) is None:
            raise ConfigError(f"workdir: no finished index at {index_folder(workdir, modality)}; "
                              "run `reco index` first")


def load(workdir: str, *, k: int | None = None, use_gpu: bool = False, batch_size: int = BATCH_SIZE,
         memory: MemoryIndex | None = None) -> "Reco":
    """The RECO model of a workdir after `reco train`: frozen CLIP, fusion modules, memory.

    `k` overrides the neighbours per query (default: the k the fusion model was trained
    with, as evaluate uses); `use_gpu` puts CLIP on a GPU and the memory's search on faiss-gpu.
    `memory`: the workdir's memory already opened, e.g. the client of a memory service
    (`reco.search.memory_service`) that several processes share, searched instead of
    opening the memory in this process; its opener keeps it (`Reco.close` leaves it open).
    """
    check_workdir(workdir)
    model_dir = fusion_model_dir(workdir)
    fusion, meta = load_fusion(model_dir)
    model_cfg, seed, neighbors = _saved_config(workdir, meta)
    if meta["d"] != embed_dim(model_cfg):
        raise ConfigError(f"workdir: the fusion model at {model_dir} has width {meta['d']}, "
                          f"its CLIP {model_cfg.name} embeds in {embed_dim(model_cfg)}")
    k = k or meta.get("k") or neighbors.k
    owned = memory is None
    if owned:
        memory = MemoryIndex.open(workdir, use_gpu=use_gpu)
    if memory.d != meta["d"]:
        raise ConfigError(f"workdir: the memory has width {memory.d}, the fusion model {meta['d']}")
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    clip = load_clip(model_cfg, seed=seed, device=device)
    return Reco(clip, fusion, memory, k=k, dedup_threshold=neighbors.dedup_threshold,
                batch_size=batch_size, device=device, owns_memory=owned)


def _non_empty(items, name: str) -> list:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InputError(f"{name}: expected a list, got {type(items).__name__}")
    if not items:
        raise InputError(f"{name}: the list is empty; give at least one")
    return list(items)


def _pixels(item: ImageInput, i: int, preprocess) -> torch.Tensor:
    """The preprocessed image: decoded as the embed stage decodes (PIL, RGB), then CLIP's transform."""
    if isinstance(item, Image.Image):
        return preprocess(item.convert("RGB"))
    if isinstance(item, (str, os.PathLike)):
        try:
            with fsspec.open(os.fspath(item), "rb") as f:
                item = f.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            raise InputError(f"images[{i}]: cannot read {os.fspath(item)!r} ({type(err).__name__})") from None
    if not isinstance(item, (bytes, bytearray)):
        raise InputError(f"images[{i}]: expected a PIL image, bytes or a path, got {type(item).__name__}")
    try:
        with Image.open(io.BytesIO(item)) as img:
            return preprocess(img.convert("RGB"))
    except Exception as err:  # PIL raises many types for bad bytes; all mean "not an image"
        raise InputError(f"images[{i}]: not an image ({type(err).__name__}: {err})") from None


def _check_texts(texts: list, name: str) -> list[str]:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"{name}[{i}]: expected a string, got {type(t).__name__}")
    return texts


def _templates(templates: Sequence[str] | str | None) -> list[str]:
    """evaluate's choice: a list, a clip_benchmark template set by name, default imagenet1k's."""
    if templates is None:
        return bundled_templates()[DEFAULT_TEMPLATE_SET]
    if isinstance(templates, str):
        if templates not in bundled_templates():
            raise InputError(f"templates: {templates!r} is not a clip_benchmark template set; use one of "
                             f"{sorted(bundled_templates())} or a list of templates")
        return bundled_templates()[templates]
    templates = _check_texts(_non_empty(templates, "templates"), "templates")
    if any("{c}" not in t for t in templates):
        raise InputError("templates: every template needs {c} for the class name, e.g. 'a photo of a {c}.'")
    return templates


class Reco:
    """A loaded RECO model; see `load`. The fusion modules run on CPU, as in evaluate."""

    def __init__(self, clip: Clip, fusion: RecoFusion, memory: MemoryIndex, *, k: int,
                 dedup_threshold: float, batch_size: int = BATCH_SIZE, device: str = "cpu",
                 owns_memory: bool = True):
        self.clip = clip
        self.fusion = fusion
        self.memory = memory
        self.owns_memory = owns_memory
        """False for a memory given to `load`: `close` leaves it to its opener."""
        self.k = k
        """Neighbours retrieved per query."""
        self.dedup_threshold = dedup_threshold
        """Memory pairs whose image has a cosine above this with a query image are not retrieved."""
        self.batch_size = batch_size
        self.device = device

    @property
    def d(self) -> int:
        return self.clip.embed_dim

    # -- the frozen CLIP -------------------------------------------------------------------

    @torch.inference_mode()
    def _frozen_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        images = _non_empty(images, "images")
        pixels = [_pixels(item, i, self.clip.preprocess) for i, item in enumerate(images)]
        parts = []
        for i in range(0, len(pixels), self.batch_size):
            batch = torch.stack(pixels[i:i + self.batch_size]).to(self.device)
            # The embed stage's precision: fp16 autocast on a GPU, fp32 on CPU.
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.device == "cuda"):
                parts.append(self.clip.model.encode_image(batch, normalize=True).float().cpu().numpy())
        return np.concatenate(parts)

    @torch.inference_mode()
    def _frozen_texts(self, texts: Sequence[str], name: str = "texts") -> np.ndarray:
        texts = _check_texts(_non_empty(texts, name), name)
        parts = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.clip.tokenizer(texts[i:i + self.batch_size]).to(self.device)
            parts.append(encode_text(self.clip.model, tokens).float().cpu().numpy())
        return np.concatenate(parts)

    # -- refinement ------------------------------------------------------------------------

    def _refine(self, queries: np.ndarray, modality: Modality, exclude_ids: np.ndarray | None) -> np.ndarray:
        """RECO: the queries fused with their k neighbours, retrieved as the model was trained."""
        exclude = np.zeros(0, np.int64) if exclude_ids is None else np.asarray(exclude_ids, np.int64)
        ids, retrieved = neighbour_embeddings(self.memory, queries, modality, self.k, exclude,
                                              self.dedup_threshold, self.fusion.search, self.fusion.fuse)
        module = self.fusion.image if modality == "image" else self.fusion.text
        return refine(module, queries, retrieved, ids)

    def encode_image(self, images: Sequence[ImageInput], refine: bool = True,
                     exclude_ids: np.ndarray | None = None) -> np.ndarray:
        """(n, d) float32 unit embeddings: RECO-refined, or the frozen CLIP's (`refine=False`).
        `exclude_ids`: memory ids left out of the retrieval."""
        frozen = self._frozen_images(images)
        return self._refine(frozen, "image", exclude_ids) if refine else frozen

    def encode_text(self, texts: Sequence[str], refine: bool = True,
                    exclude_ids: np.ndarray | None = None) -> np.ndarray:
        """(n, d) float32 unit embeddings: RECO-refined, or the frozen CLIP's (`refine=False`)."""
        frozen = self._frozen_texts(texts)
        return self._refine(frozen, "text", exclude_ids) if refine else frozen

    def near_duplicate_ids(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Memory ids whose image is a near-duplicate (cosine > dedup_threshold) of any of these."""
        return near_duplicate_ids(self.memory, self._frozen_images(images), self.dedup_threshold)

    def classify(self, images: Sequence[ImageInput], classnames: Sequence[str],
                 templates: Sequence[str] | str | None = None, refine: bool = True,
                 exclude_near_duplicates: bool = False) -> Classification:
        """Zero-shot classification as evaluate does it: each class embedded as the mean of its
        prompts (`templates` with `{c}`; a clip_benchmark set name; default imagenet1k's),
        images and classes RECO-refined unless `refine=False`. `exclude_near_duplicates`
        leaves the memory pairs that near-duplicate any of these images out of every
        retrieval, as evaluate does for its test set."""
        classnames = _check_texts(_non_empty(classnames, "classnames"), "classnames")
        templates = _templates(templates)
        image_emb = self._frozen_images(images)
        prompts = [t.format(c=c) for c in classnames for t in templates]
        class_emb = class_embeddings(self._frozen_texts(prompts, "classnames"), len(classnames))
        if refine:
            exclude = (near_duplicate_ids(self.memory, image_emb, self.dedup_threshold)
                       if exclude_near_duplicates else None)
            image_emb = self._refine(image_emb, "image", exclude)
            class_emb = self._refine(class_emb, "text", exclude)
        scores = image_emb @ class_emb.T
        return Classification([classnames[j] for j in scores.argmax(axis=1)], scores.astype(np.float32))

    def close(self) -> None:
        """Release the memory this model opened (its memory maps, or its shard actors); a memory
        given to `load` stays open for its opener to close."""
        if self.owns_memory:
            self.memory.close()
