"""The demo's frozen CLIP: reco-tiny pre-trained on coarse captions (its stand-in for downloaded weights)."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import open_clip
import torch
from PIL import Image

from reco import storage
from reco.demo import synthetic
from reco.demo.world import SPLIT_SEEDS
from reco.models import register_model_configs

log = logging.getLogger(__name__)


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
    # fused: one kernel over all parameters; the 49,408-token embedding table made the
    # per-tensor update a third of a step (a step 200 -> 125 ms on 2 cores).
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True)
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
