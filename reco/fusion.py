"""The fusion modules phi_image and phi_text (DESIGN.md section 1): trained by `reco train`, applied
by `refine` in `reco evaluate` and the Python API (reco/api.py).

Each is one pre-norm transformer encoder layer (width d, 8 heads, MLP 4d) over the
tokens [query, r_1..r_k]; the output at the query's position, L2-normalised, is the
refined embedding. CLIP itself stays frozen: these and the temperature are all that
is trained (about 3.2M parameters per module at d=512).
"""

from __future__ import annotations

import io
import math
import pickle

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reco import storage
from reco.config import Fuse, Search
from reco.contracts import FUSION_META, FUSION_WEIGHTS
from reco.errors import ConfigError

INIT_TEMPERATURE = 0.07
"""CLIP's initial temperature; the logit scale is learnt from log(1/0.07)."""
REFINE_BATCH = 4096
"""Queries refined at once: bounds the (batch, k, d) float32 neighbour block."""


class FusionModule(nn.Module):
    """Refines a query embedding with k retrieved embeddings of the other modality."""

    def __init__(self, d: int, heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if d % heads:
            raise ValueError(f"fusion width d={d} is not divisible by heads={heads}")
        self.layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=int(d * mlp_ratio), dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True)

    def forward(self, query: Tensor, retrieved: Tensor, missing: Tensor | None = None) -> Tensor:
        """query (n, d), retrieved (n, k, d) with k >= 0 -> refined (n, d), unit norm.

        `missing` (n, k) bool marks retrieved slots that hold no neighbour (id -1, zeros):
        they are masked out of attention, so a query with k' < k neighbours is refined
        exactly as if only those k' had been given. The query token is never masked."""
        tokens = torch.cat([query.unsqueeze(1), retrieved.to(query.dtype)], dim=1)
        # No mask when no slot is missing (the usual batch): same result, but the masked
        # attention path costs ~10-15% of a training step.
        mask = None if missing is None or not missing.any() else F.pad(missing.to(torch.bool), (1, 0), value=False)
        # The layer's output at the query token only: it attends to every token, but the
        # other tokens' outputs are never used, so their attention rows and MLP are skipped
        # (the same function as `self.layer(tokens)[:, 0]`; a d=64, k=10 training step took
        # 26 ms instead of 51). The layer is pre-norm with no dropout: x + attn(norm1(x)),
        # then + mlp(norm2(.)).
        layer = self.layer
        normed = layer.norm1(tokens)
        x = tokens[:, :1] + layer.self_attn(normed[:, :1], normed, normed, key_padding_mask=mask,
                                            need_weights=False)[0]
        x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        return F.normalize(x[:, 0], dim=-1)


class MeanFusion(nn.Module):
    """The parameter-free reference (`train.fuse=mean`): the L2-normalised mean of the
    retrieved embeddings present; a query with none keeps its own embedding."""

    def forward(self, query: Tensor, retrieved: Tensor, missing: Tensor | None = None) -> Tensor:
        present = torch.ones(retrieved.shape[:2], dtype=torch.bool, device=query.device) if missing is None \
            else ~missing.to(torch.bool)
        total = (retrieved.to(query.dtype) * present.unsqueeze(-1)).sum(dim=1)
        return F.normalize(torch.where(present.any(dim=1, keepdim=True), total, query), dim=-1)


class RecoFusion(nn.Module):
    """phi_image and phi_text with the learnable temperature of the RECO loss."""

    def __init__(self, d: int, heads: int = 8, mlp_ratio: float = 4.0, fuse: Fuse = "cross",
                 search: Search = "uni"):
        super().__init__()
        # How its neighbours were found and which of their embeddings it fuses: inference
        # must retrieve exactly as training did.
        self.fuse, self.search = fuse, search
        make = MeanFusion if fuse == "mean" else lambda: FusionModule(d, heads, mlp_ratio)
        self.image, self.text = make(), make()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))

    def forward(self, image: Tensor, image_tokens: Tensor, text: Tensor, text_tokens: Tensor,
                image_missing: Tensor | None = None, text_missing: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(v', t'): images and texts each fused with the tokens of their neighbours (which
        modality: `reco.search.fused_modality`); `*_missing` (n, k) marks padded slots."""
        return self.image(image, image_tokens, image_missing), self.text(text, text_tokens, text_missing)


def save_fusion(model: RecoFusion, meta: dict, model_dir: str) -> None:
    """Weights first, then the metadata (its presence means the folder is complete)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes_atomic(storage.join(model_dir, FUSION_WEIGHTS), buf.getvalue())
    storage.write_json_atomic(storage.join(model_dir, FUSION_META), meta)


def load_fusion(model_dir: str) -> tuple[RecoFusion, dict]:
    """The trained fusion modules in `model_dir` (CPU, eval mode) and the metadata saved with
    them: d, heads, mlp_ratio, k, retrieval, fuse, steps, the neighbours' identity (with their
    search) and the full config that trained them."""
    meta_url = storage.join(model_dir, FUSION_META)
    if not storage.exists(meta_url):
        raise ConfigError(f"{model_dir} holds no finished fusion model ({FUSION_META} missing); "
                          "run `reco train` first")
    meta = storage.read_json(meta_url)
    model = RecoFusion(meta["d"], meta["heads"], meta["mlp_ratio"], meta.get("fuse", "cross"),
                       meta.get("neighbors", {}).get("search", "uni"))
    weights = storage.join(model_dir, FUSION_WEIGHTS)
    if problem := _load_weights(model, weights, meta["d"]):
        raise ConfigError(f"{weights}: the fusion weights {problem}; remove {model_dir} and re-run "
                          "`reco train` to write them again")
    return model.eval(), meta


def _load_weights(model: RecoFusion, url: str, d: int) -> str | None:
    """Load `url` into `model`; what is wrong with the file where it cannot be (torch's own
    message for a bad file suggests `weights_only=False`, which would run its code)."""
    try:
        with fsspec.open(url, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return "are missing"
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError):
        return "are not a readable PyTorch checkpoint (cut short, or another file)"
    try:
        model.load_state_dict(state)
    except (RuntimeError, AttributeError, TypeError):
        return f"are not a d={d} fusion model's tensors"
    return None


def refine(module: torch.nn.Module, queries: np.ndarray, retrieved: np.ndarray | None,
           ids: np.ndarray | None = None) -> np.ndarray:
    """module(query, neighbours) in batches; `retrieved` None feeds no neighbours (k=0).
    `ids` (n, k), as `retrieve` returns them: slots with id -1 are masked out."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(queries), REFINE_BATCH):
            q = torch.from_numpy(np.ascontiguousarray(queries[i:i + REFINE_BATCH], np.float32))
            r = (torch.zeros(len(q), 0, q.shape[1]) if retrieved is None
                 else torch.from_numpy(np.ascontiguousarray(retrieved[i:i + REFINE_BATCH], np.float32)))
            missing = None if ids is None or retrieved is None else torch.from_numpy(ids[i:i + REFINE_BATCH] < 0)
            out.append(module(q, r, missing).numpy())
    return np.concatenate(out) if out else queries.copy()
