"""The demo's small world: a fine-grained zero-shot task that only a memory can solve.

72 synthetic classes (reco/demo/synthetic.py), each with an invented name. Four disjoint
splits, each drawn with its own seed:

- pre-training (coarse captions, all classes): `pretrain_frozen_clip` trains reco-tiny
  briefly on "a photo of a triangle"-style captions and saves a checkpoint. THIS IS THE
  DEMO'S STAND-IN FOR DOWNLOADING PRETRAINED CLIP WEIGHTS (no downloads here): like
  CLIP on Stanford Cars, the frozen model knows the concept but not the fine class.
- memory (fine captions, all 72 classes): the only place the invented names occur;
- fusion training pairs (fine captions, 54 classes): phi_image/phi_text learn to *use*
  retrieved pairs, never seeing the 18 held-out classes;
- evaluation (an ImageFolder of the 18 held-out classes): zero-shot on classes whose
  names exist only in the memory's captions. The frozen CLIP is near chance (1/18).
"""

from __future__ import annotations

import io
import logging
import random
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from reco import storage
from reco.demo import synthetic
from reco.models import register_model_configs

log = logging.getLogger(__name__)

N_CLASSES = 72
N_HELD_OUT = 18
SPLIT_SEEDS = {"pretrain": 101, "memory": 202, "fusion": 303, "eval": 404, "held_out": 505}
EVAL_TEMPLATES = ["a photo of a {c}.", "a {c}.", "a picture of a {c}.", "an image of a {c}.", "my {c}."]
"""The fine caption templates that name only the class (synthetic.FINE_TEMPLATES in
clip_benchmark's `{c}` form, without the one that also names the shape)."""


DEDUP_THRESHOLD = 0.999
"""The demo's `neighbors.dedup_threshold`. The briefly pre-trained reco-tiny maps distinct
images of one class within cosine 0.99 of each other (median best match 0.997), so the
0.95 calibrated for real CLIP would count the whole memory as copies of the test images
(measured: all 7,200 pairs excluded); at 0.999 only 13 are."""


def held_out_classes(seed: int = SPLIT_SEEDS["held_out"]) -> list[int]:
    """The 18 class ids never seen in fusion training (a seeded draw, sorted)."""
    return sorted(random.Random(seed).sample(range(N_CLASSES), N_HELD_OUT))


def fusion_classes() -> list[int]:
    held = set(held_out_classes())
    return [i for i in range(N_CLASSES) if i not in held]


# -- the frozen CLIP ------------------------------------------------------------------------

def _pixels(samples: list[synthetic.Sample]) -> torch.Tensor:
    """(n, 3, H, W) uint8: decoded once, normalised per batch (a quarter of float32's memory)."""
    arrays = [np.asarray(Image.open(io.BytesIO(s.jpeg)).convert("RGB")) for s in samples]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def pretrain_frozen_clip(out_path: str, *, n_images: int = 8000, steps: int = 200,
                         batch_size: int = 128, lr: float = 5e-4, seed: int = 0,
                         model_name: str = "reco-tiny") -> dict:
    """Pre-train `model_name` contrastively on coarse captions, save its state dict.

    The demo's stand-in for downloading pretrained weights. open_clip's own model and
    ClipLoss, AdamW with warmup and cosine decay (one-cycle), gradients clipped; the
    images are the model's input size, so normalising is the whole preprocessing.
    Returns {"steps", "seconds", "final_loss"}.
    """
    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]

    t0 = time.perf_counter()
    samples = list(synthetic.make_samples(n_images, seed=SPLIT_SEEDS["pretrain"] + seed,
                                          granularity="coarse", image_size=size, key_prefix="pre"))
    pixels = _pixels(samples)
    tokens = tokenizer([s.caption for s in samples])
    log.info("pre-training data: %d images in %.1fs", n_images, time.perf_counter() - t0)

    loss_fn = open_clip.ClipLoss()
    # As open_clip's training: no weight decay on gains, biases and the temperature.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(0, n_images, (batch_size,), generator=gen)
        images = (pixels[idx].float() / 255.0 - mean) / std
        # Coarse captions repeat within a batch: encode each distinct one once (~40% faster).
        unique, inverse = torch.unique(tokens[idx], dim=0, return_inverse=True)
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(unique, normalize=True)[inverse]
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pre-training diverged at step {step} (loss {loss.item()})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            log.info("pre-train step %d/%d loss %.3f (%.1fs)", step, steps, loss.item(),
                     time.perf_counter() - t0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes_atomic(out_path, buf.getvalue())
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(np.mean(losses[-20:])), 4)}


# -- the data -------------------------------------------------------------------------------

def write_memory_corpus(out_dir: str, n: int = 7200, shard_size: int = 1000) -> list[str]:
    """The memory's corpus: all 72 classes, fine captions (the names live only here)."""
    return synthetic.write_webdataset(
        synthetic.make_samples(n, seed=SPLIT_SEEDS["memory"], granularity="fine", key_prefix="mem"),
        out_dir, shard_size)


def write_fusion_pairs(out_dir: str, n: int = 5400, shard_size: int = 1000) -> list[str]:
    """Fusion-training pairs: the 54 classes not held out, fine captions."""
    return synthetic.write_webdataset(
        synthetic.make_samples(n, seed=SPLIT_SEEDS["fusion"], class_ids=fusion_classes(),
                               granularity="fine", key_prefix="fus"),
        out_dir, shard_size)


def write_eval_imagefolder(out_dir: str, per_class: int = 50) -> str:
    """An ImageFolder of the 18 held-out classes, one folder per invented name."""
    classes = synthetic.classes()
    held = held_out_classes()
    root = Path(out_dir)
    for s in synthetic.make_samples(per_class * len(held), seed=SPLIT_SEEDS["eval"], class_ids=held,
                                    granularity="fine", key_prefix="ev"):
        folder = root / classes[s.label].name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{s.key}.jpg").write_bytes(s.jpeg)
    return str(root)


def eval_dataset(path: str) -> dict:
    """The `evaluate.datasets` entry for the held-out ImageFolder."""
    return {"name": "held-out-fine", "kind": "imagefolder", "path": path,
            "task": "classification", "templates": EVAL_TEMPLATES}


def config_sections(workdir: str, checkpoint: str) -> dict:
    """The demo world's config: the pre-trained checkpoint as the frozen CLIP, neighbours
    of the fusion pairs (`<workdir>/fusion-pairs`, embedded apart from the memory), and
    the held-out ImageFolder (`<workdir>/eval-images`) as the evaluation set."""
    return {"model": {"name": "reco-tiny", "pretrained": checkpoint},
            "index": {"key": "Flat"},
            "neighbors": {"k": 10, "dedup_threshold": DEDUP_THRESHOLD, "input": f"{workdir}/fusion-pairs"},
            "train": {"batch_size": 256, "epochs": 20, "warmup_steps": 20},
            "evaluate": {"datasets": [eval_dataset(f"{workdir}/eval-images")]}}
