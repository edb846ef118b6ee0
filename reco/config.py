"""The one typed configuration of a reco run, loaded from YAML with dotted overrides.

Every stage takes a `RecoConfig`. Unknown keys and wrong types are errors that name the
key (and, for a typo, the key that was probably meant) before any work starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the key and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = "reco-tiny"
    """An open_clip architecture (`open_clip.list_models()`), or `reco-tiny`."""
    pretrained: str | None = None
    """An open_clip pretrained tag (e.g. `openai`), or a checkpoint file path / fsspec URL.
    None means random initialisation (seeded by `seed`): only for tests and smoke runs."""
    config: str | None = None
    """Optional open_clip model-config JSON (path or fsspec URL) registered as `name`."""


class DownloadConfig(Section):
    url_list: str | None = None
    """Parquet, CSV or TSV file(s) with url and caption columns (any fsspec URL)."""
    input_format: Literal["parquet", "csv", "tsv", "txt", "json"] = "parquet"
    url_col: str = "url"
    caption_col: str = "caption"
    output: str | None = None
    """Default `<workdir>/corpus`."""
    image_size: int = Field(256, gt=0)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    processes_count: int = Field(1, gt=0)
    thread_count: int = Field(16, gt=0)
    number_sample_per_shard: int = Field(10000, gt=0)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0)
    user_agent_token: str | None = None
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    """Opt-out X-Robots-Tag directives honoured; an empty list ignores them."""
    min_image_size: int = Field(0, ge=0)
    max_shard_retry: int = Field(2, ge=0)


class EmbedConfig(Section):
    input: str | None = None
    """Webdataset shards: a folder, a glob or brace pattern (any fsspec URL). Default
    `<workdir>/corpus`."""
    batch_size: int = Field(256, gt=0)
    dtype: Literal["float16", "float32"] = "float16"
    num_actors: int | None = Field(None, gt=0)
    """Model replicas; default one per GPU, or one on a CPU-only cluster."""
    cpus_per_actor: float | None = Field(None, gt=0)
    """CPUs each replica reserves (decoding and, on CPU, the forward pass). Default: all
    of the cluster's CPUs divided among the replicas, at most 8."""
    gpus_per_actor: float | None = Field(None, ge=0)
    """Default 1 on a cluster with GPUs, else 0."""
    decode_threads: int | None = Field(None, gt=0)
    """Threads decoding and preprocessing images ahead of the forward pass. Default: the
    replica's CPUs with a GPU, 1 without (the forward pass uses the CPUs then)."""


class IndexConfig(Section):
    shards: int = Field(1, gt=0)
    key: str | None = None
    """An explicit faiss index factory key; default: autofaiss chooses for max_memory."""
    max_memory: str = "4GB"
    """Memory budget per modality for autofaiss's index selection."""
    use_gpu: bool = False
    retrain: bool = False
    metric: Literal["ip"] = "ip"


class NeighborsConfig(Section):
    k: int = Field(10, gt=0)
    dedup_threshold: float = Field(0.95, gt=0, le=1.0)
    split: str = "train"
    input: str | None = None
    """Memory-format Parquet of the query pairs; default: the memory itself."""


class TrainConfig(Section):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False


class EvaluateConfig(Section):
    datasets: list[Any] = []


class RecoConfig(Section):
    workdir: str
    """Root of every stage's output (any fsspec URL)."""
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    neighbors: NeighborsConfig = Field(default_factory=NeighborsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    def path(self, *parts: str) -> str:
        """`<workdir>/<parts...>` as a URL or path string."""
        return "/".join([self.workdir.rstrip("/"), *parts])


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so `k=10` is an int)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. neighbors.k=20")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[:i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The valid field names of the section that holds the key at `loc`."""
    model: type[BaseModel] = RecoConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _fields_at(e["loc"]), n=1)
            hint = f"; did you mean {'.'.join([*map(str, e['loc'][:-1]), close[0]])}?" if close else ""
            lines.append(f"  {key}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required, e.g. {key}=/path/to/dir")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return ConfigError("\n".join(lines))


def config_from_dict(data: dict[str, Any], overrides: list[str] = (), source: str = "config") -> RecoConfig:
    data = dict(data)
    for item in overrides:
        _apply_override(data, *parse_override(item))
    try:
        return RecoConfig.model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RecoConfig:
    """Read a YAML config file and apply `dotted.key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, overrides, source=str(path))


def dump_config(cfg: RecoConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
