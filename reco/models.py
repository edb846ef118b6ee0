"""The frozen CLIP: any open_clip architecture, plus `reco-tiny` for tests and smoke runs.

`model.pretrained` is an open_clip tag (downloaded by open_clip from its hub), a local
checkpoint file, or an fsspec URL of one (copied to a local cache first); a file is
loaded with `torch.load(weights_only=True)` on the driver before any work, so nothing
pickled in it runs. `model.config` registers a custom architecture's open_clip JSON
under `model.name` before creation.

Checking a config and reading its embedding width need no open_clip: a stage's driver
reads the architecture's JSON (open_clip's registry is its package's model_configs/*.json)
and never imports open_clip, which costs 4-6 s of a whole `reco embed` on 2 cores
(torchvision, timm, transformers) and only the replicas need (docs/performance.md).
open_clip is imported where a model is built or a pretrained tag is looked up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import fsspec
import torch

from reco.config import ConfigError, ModelConfig
from reco.errors import RecoError

if TYPE_CHECKING:
    from types import ModuleType

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CACHE_DIR = Path(os.environ.get("RECO_CACHE", Path.home() / ".cache" / "reco"))
PICKLE_PROTO = b"\x80"
"""The first byte of a pickle (protocol 2+): torch.save's legacy, non-zip format."""
ARCHITECTURE_KEYS = {"embed_dim", "vision_cfg", "text_cfg"}
"""What open_clip requires of an architecture config (it skips files without them)."""


class ModelLoadError(RecoError, RuntimeError):
    """The model or its weights could not be loaded; the message says how to provide them."""


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    embed_dim: int


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Unit text embeddings, as `model.encode_text(tokens, normalize=True)` gives them, but
    without the padding after the batch's longest caption where the text tower is CLIP's.

    The tokenizer pads every caption to the context length (77); captions are mostly far
    shorter, so most of the text tower's work is on padding. In CLIP's tower attention is
    causal and the end token's features are pooled: no position after a caption's end
    token reaches its embedding, so cutting those positions leaves every embedding as it
    was, to float rounding (tests/test_models_cli.py checks that against open_clip's).
    """
    if not (_pools_causal_end_token(model) and len(tokens)):
        return model.encode_text(tokens, normalize=True)
    end = tokens.argmax(dim=-1)  # each caption's end token: the vocabulary's highest id
    n = int(end.max()) + 1
    # open_clip's CLIP.encode_text, its positional embedding and causal mask cut to n.
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :n]).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(len(x), device=x.device), end]
    projection = model.text_projection
    x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return torch.nn.functional.normalize(x, dim=-1)


def _pools_causal_end_token(model: torch.nn.Module) -> bool:
    """Whether `model`'s text tower is CLIP's: causal attention, the end token's features pooled.
    Others (SigLIP's last-token pooling, CoCa's appended class token, Hugging Face text towers)
    see the padding, so their text is encoded at full length."""
    import open_clip

    return (type(model) is open_clip.CLIP and model.attn_mask is not None
            and model.text_pool_type == "argmax")


def _open_clip_config_dir() -> Path:
    """open_clip's own architectures, found without importing the package."""
    return Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "model_configs"


def _read_config_file(url: str) -> dict:
    """`model.config`'s architecture JSON, checked."""
    try:
        with fsspec.open(url, "r") as f:
            arch = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"model.config: {url} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.config: {url} is not valid JSON ({err})") from None
    if not isinstance(arch, dict) or not ARCHITECTURE_KEYS <= arch.keys():
        raise ConfigError(f"model.config: {url} lacks embed_dim/vision_cfg/text_cfg, "
                          "see open_clip's model_configs/*.json")
    return arch


def architecture(cfg: ModelConfig) -> dict:
    """The open_clip architecture config of `cfg.name`, as open_clip resolves it once
    `register_model_configs(cfg)` ran: `cfg.config`, else reco's own, else open_clip's."""
    if cfg.config is not None:
        return _read_config_file(cfg.config)
    for folder in (MODEL_CONFIG_DIR, _open_clip_config_dir()):
        # Listed, not joined: a name is an existing file's stem, never a path of its own.
        path = {p.stem: p for p in folder.glob("*.json")}.get(cfg.name)
        if path is not None:
            return json.loads(path.read_text())
    raise ConfigError(f"model.name: unknown architecture {cfg.name!r}; pick one of "
                      "open_clip.list_models() (e.g. ViT-B-32), or give model.config")


def register_model_configs(cfg: ModelConfig | None = None) -> ModuleType:
    """open_clip, with reco's own architectures registered, and `cfg.config` under `cfg.name` if given."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    if cfg is not None and cfg.config is not None:
        with tempfile.TemporaryDirectory(prefix="reco-model-config-") as folder:
            # open_clip names a registered config after its file's stem, and reads the file
            # as it registers it: the file can go at once (its later rescans skip it).
            path = Path(folder) / f"{cfg.name}.json"
            path.write_text(json.dumps(_read_config_file(cfg.config)))
            open_clip.add_model_config(path)
    return open_clip


def pretrained_tags(cfg: ModelConfig) -> list[str]:
    """open_clip's pretrained tags of `cfg.name`."""
    return register_model_configs(cfg).list_pretrained_tags_by_model(cfg.name)


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def validate_model_config(cfg: ModelConfig) -> None:
    """Check the architecture and the weights' source before any work starts."""
    architecture(cfg)
    src = cfg.pretrained
    if src is None:
        return
    # A checkpoint file is checked without open_clip; anything else must be a tag of open_clip's.
    if _is_remote(src):
        fs, path = fsspec.core.url_to_fs(src)
        if not fs.exists(path):
            raise ConfigError(f"model.pretrained: checkpoint {src} does not exist")
    elif not Path(src.removeprefix("file://")).is_file():
        tags = pretrained_tags(cfg)
        if src in tags:
            return
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
    return architecture(cfg)["embed_dim"]


def _local_checkpoint(src: str) -> str:
    """A local path for a checkpoint URL: fsspec's whole-file cache copies it once."""
    if not _is_remote(src):
        return src.removeprefix("file://")
    return fsspec.open_local(f"filecache::{src}", filecache={"cache_storage": str(CACHE_DIR / "checkpoints")})


def load_clip(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> Clip:
    """The frozen model in eval mode, its image transform and its tokenizer."""
    validate_model_config(cfg)
    open_clip = register_model_configs(cfg)
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
