"""The frozen CLIP: any open_clip architecture, plus `reco-tiny` for tests and smoke runs.

`model.pretrained` is an open_clip tag (downloaded by open_clip from its hub), a local
checkpoint file, or an fsspec URL of one (copied to a local cache first); a file is
loaded with `torch.load(weights_only=True)` on the driver before any work, so nothing
pickled in it runs. `model.config` registers a custom architecture's open_clip JSON
under `model.name` before creation.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fsspec
import open_clip
import torch

from reco.config import ConfigError, ModelConfig
from reco.errors import RecoError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CACHE_DIR = Path(os.environ.get("RECO_CACHE", Path.home() / ".cache" / "reco"))
PICKLE_PROTO = b"\x80"
"""The first byte of a pickle (protocol 2+): torch.save's legacy, non-zip format."""


class ModelLoadError(RecoError, RuntimeError):
    """The model or its weights could not be loaded; the message says how to provide them."""


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    embed_dim: int


def register_model_configs(cfg: ModelConfig | None = None) -> None:
    """Register reco's own architectures, and `cfg.config` under `cfg.name` if given."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    if cfg is None or cfg.config is None:
        return
    try:
        with fsspec.open(cfg.config, "r") as f:
            arch = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"model.config: {cfg.config} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.config: {cfg.config} is not valid JSON ({err})") from None
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= arch.keys():
        raise ConfigError(f"model.config: {cfg.config} lacks embed_dim/vision_cfg/text_cfg, "
                          "see open_clip's model_configs/*.json")
    # open_clip names a registered config after its file's stem.
    folder = Path(tempfile.mkdtemp(prefix="reco-model-config-"))
    (folder / f"{cfg.name}.json").write_text(json.dumps(arch))
    open_clip.add_model_config(folder)


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def validate_model_config(cfg: ModelConfig) -> None:
    """Check the architecture and the weights' source before any work starts."""
    register_model_configs(cfg)
    if cfg.name not in open_clip.list_models():
        raise ConfigError(f"model.name: unknown architecture {cfg.name!r}; pick one of "
                          "open_clip.list_models() (e.g. ViT-B-32), or give model.config")
    src = cfg.pretrained
    if src is None or src in open_clip.list_pretrained_tags_by_model(cfg.name):
        return
    if _is_remote(src):
        fs, path = fsspec.core.url_to_fs(src)
        if not fs.exists(path):
            raise ConfigError(f"model.pretrained: checkpoint {src} does not exist")
    elif not Path(src.removeprefix("file://")).is_file():
        tags = open_clip.list_pretrained_tags_by_model(cfg.name)
        raise ConfigError(f"model.pretrained: {src!r} is neither a checkpoint file nor a tag of "
                          f"{cfg.name} (tags: {', '.join(tags) or 'none'})")
    check_checkpoint(src)


def check_checkpoint(src: str) -> None:
    """Load the checkpoint as open_clip will (tensors only, `weights_only=True`) but here, on
    the driver: a file that is not a checkpoint, or that carries pickled code (refused, never
    run), is an error naming it before any Ray work, instead of a traceback from every replica."""
    path = _local_checkpoint(src)
    if path.endswith(".safetensors"):
        return  # safetensors holds tensors only; open_clip reads it with safetensors' own loader
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        is_pickle = f.read(1) == PICKLE_PROTO
    if not (is_zip or is_pickle):
        raise ConfigError(f"model.pretrained: {src} is not a PyTorch checkpoint, or is truncated (neither "
                          "torch.save's zip nor its legacy format); give a file saved with torch.save(state_dict)")
    try:
        # mmap (zip format only): tensors are mapped, not read, so a large checkpoint costs little.
        torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines()]
        detail = next((line for line in lines if line.startswith(("Trying", "Unsupported"))), lines[0])
        raise ConfigError(
            f"model.pretrained: checkpoint {src} holds more than tensors; torch.load(weights_only=True) "
            f"refused it and ran none of it ({detail}). Save only the weights: "
            "torch.save(model.state_dict(), path), from code you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConfigError(f"model.pretrained: {src} is not a readable PyTorch checkpoint "
                          f"({str(err).splitlines()[0]}); give a file saved with torch.save(state_dict)") from None


def embed_dim(cfg: ModelConfig) -> int:
    """The width d of the model's embeddings, read from its architecture config."""
    register_model_configs(cfg)
    return open_clip.get_model_config(cfg.name)["embed_dim"]


def _local_checkpoint(src: str) -> str:
    """A local path for a checkpoint URL: fsspec's whole-file cache copies it once."""
    if not _is_remote(src):
        return src.removeprefix("file://")
    return fsspec.open_local(f"filecache::{src}", filecache={"cache_storage": str(CACHE_DIR / "checkpoints")})


def load_clip(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> Clip:
    """The frozen model in eval mode, its image transform and its tokenizer."""
    validate_model_config(cfg)
    pretrained = cfg.pretrained
    if pretrained is not None and pretrained not in open_clip.list_pretrained_tags_by_model(cfg.name):
        pretrained = _local_checkpoint(pretrained)
    torch.manual_seed(seed)  # a random init (no weights) must be the same in every replica
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.name, pretrained=pretrained, device=device)
    except RuntimeError as err:
        if "download" in str(err).lower():
            raise ModelLoadError(
                f"could not download the {cfg.pretrained!r} weights of {cfg.name} ({err}). "
                "Offline, give a checkpoint instead: model.pretrained=/path/or/s3://url/of/"
                "checkpoint.pt, or fill the Hugging Face cache (HF_HOME) on a machine with "
                "internet first.") from None
        raise
    model.eval().requires_grad_(False)
    return Clip(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(cfg.name),
                embed_dim=embed_dim(cfg))
