"""The RECO loss: symmetric InfoNCE on (v', t') + (v', t) + (v, t') (DESIGN.md section 1).

Refined embeddings are aligned with both the refined and the frozen embeddings of the
other modality, at one learnable temperature. Under data parallelism every worker
gathers the whole global batch, so the negatives are the same as on one worker.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE between row-aligned unit vectors a (n, d) and b (n, d)."""
    logits = logit_scale.exp() * a @ b.T
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def gather(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """All workers' rows of a and b, concatenated in rank order; only our own rows carry
    gradient (open_clip's gather, as its ClipLoss without gather_with_grad)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return a, b
    # Imported here: open_clip's package import takes seconds, which every one-worker
    # training process would pay at start-up for nothing.
    from open_clip.loss import gather_features

    return gather_features(a.contiguous(), b.contiguous(), local_loss=False, gather_with_grad=False,
                           rank=dist.get_rank(), world_size=dist.get_world_size())


class RecoLoss(nn.Module):
    """loss = NCE(v', t') + NCE(v', t) + NCE(v, t'), each NCE symmetric.

    With W workers the value is the global batch's loss on every worker, but the gradient
    a worker gets flows only through its own rows: DDP's gradient average then yields 1/W
    of the global gradient, so the trainer scales its backward by W.
    """

    def forward(self, v: Tensor, t: Tensor, v_ref: Tensor, t_ref: Tensor, logit_scale: Tensor) -> Tensor:
        v, t = gather(v, t)
        v_ref, t_ref = gather(v_ref, t_ref)
        return (info_nce(v_ref, t_ref, logit_scale) + info_nce(v_ref, t, logit_scale)
                + info_nce(v, t_ref, logit_scale))
