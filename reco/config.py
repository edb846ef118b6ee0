"""The one typed configuration of a reco run, loaded from YAML with dotted overrides.

Every stage takes a `RecoConfig`. Unknown keys and wrong types are errors that name the
key (and, for a typo, the key that was probably meant) before any work starts.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from reco.errors import ConfigError

__all__ = ["ConfigError", "RecoConfig", "config_from_dict", "load_config", "dump_config"]


Search = Literal["uni", "cross"]
"""What a query searches: memory items of its own modality (uni) or of the other (cross)."""
Fuse = Literal["cross", "uni", "mean"]
"""What a query is fused with: its neighbours' other-modality embeddings (cross), their
same-modality embeddings (uni), or no module at all: the mean of the cross tokens (mean)."""

class Section(BaseModel):
    # Attribute docstrings become field descriptions: docs/config.md is generated from them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


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
    """A Parquet, CSV or TSV file, or a folder of them, with url and caption columns (any
    fsspec URL)."""
    input_format: Literal["parquet", "csv", "tsv"] = "parquet"
    """The url list's format; a folder's files are those ending in `.<input_format>`."""
    url_col: str = "url"
    """The URL list's column holding image URLs."""
    caption_col: str = "caption"
    """The URL list's column holding captions (stored as each sample's .txt)."""
    save_additional_columns: list[str] = []
    """Further url-list columns copied into each sample's .json (e.g. a label)."""
    output: str | None = None
    """Default `<workdir>/corpus` (where `reco embed` reads by default)."""
    incremental_mode: Literal["incremental", "overwrite"] = "incremental"
    """`incremental` keeps the finished shards and downloads the rest; `overwrite` deletes
    the output folder first."""
    image_size: int = Field(256, gt=0)
    """Side img2dataset resizes the stored images to: the shorter one for `keep_ratio` and
    `center_crop`, the longer one for `border` and `keep_ratio_largest`."""
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    """img2dataset's resize mode. `keep_ratio` (shorter side to `image_size`, nothing cut or
    padded) lets the model's preprocess frame a memory image as it frames the same image at
    evaluation; `border` adds white bars that evaluation images lack (docs/download.md)."""
    processes_count: int | None = Field(None, gt=0)
    """Shards downloaded at once, each a Ray task of one CPU; default: the cluster's CPUs."""
    thread_count: int = Field(64, gt=0)
    """Concurrent HTTP requests per shard (downloads wait on the network, not the CPU)."""
    number_sample_per_shard: int = Field(10000, gt=0)
    """URL-list rows per corpus shard (one tar each)."""
    timeout: float = Field(10.0, gt=0)
    """Seconds before a request is abandoned (counted as a failure)."""
    retries: int = Field(0, ge=0)
    """Further attempts at a URL that failed to download."""
    user_agent_token: str | None = None
    """Added to the User-Agent; X-Robots-Tag directives aimed at this token are honoured."""
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    """Opt-out X-Robots-Tag directives honoured; an empty list ignores them."""
    min_image_size: int = Field(0, ge=0)
    """Images whose shorter side is below this are counted as failures ("image too small")."""
    max_shard_retry: int = Field(2, ge=0)
    """Further attempts at a shard whose task failed (a crashed worker, a write error)."""


class EmbedConfig(Section):
    input: str | None = None
    """Webdataset shards: a folder, a glob or brace pattern (any fsspec URL). Default
    `<workdir>/corpus`."""
    batch_size: int = Field(256, gt=0)
    """Pairs per forward pass."""
    dtype: Literal["float16", "float32"] = "float16"
    """Stored embedding dtype; float16 halves the memory's size."""
    num_actors: int | None = Field(None, gt=0)
    """Model replicas; default one per GPU, or one per CPU on a CPU-only cluster (never more
    than input shards). Each holds its own copy of the model."""
    cpus_per_actor: float | None = Field(None, gt=0)
    """CPUs each replica reserves (its decoding processes beside a GPU; on CPU, the forward
    pass's threads). Default: the cluster's CPUs divided among the replicas, at most 8 and
    at most one node's."""
    gpus_per_actor: float | None = Field(None, ge=0)
    """Default 1 on a cluster with GPUs, else 0."""
    decode_processes: int | None = Field(None, ge=0)
    """Worker processes decoding images and tokenizing captions two batches ahead of the
    forward pass. Default: one per CPU of the replica with a GPU; 0 (decode in line)
    without, where the forward pass uses every CPU and a process beside it would stall it."""


class IndexConfig(Section):
    shards: int = Field(1, gt=0)
    """Index files per modality, each holding the vectors of a contiguous run of memory shards;
    a search asks every index shard and merges their answers by score."""
    key: str | None = None
    """An explicit faiss index factory key (an IVF key, or `Flat`); default: autofaiss
    chooses a memory-mappable key for max_memory and the memory's size."""
    max_memory: str = "4GB"
    """Memory budget per modality for autofaiss's index selection."""
    index_param: str | None = None
    """Search hyperparameters, e.g. `nprobe=64`; default: autofaiss tunes them for
    max_query_time_ms on the built index."""
    max_query_time_ms: float = Field(10.0, gt=0)
    """Per-query time bound autofaiss's tuning aims for (it keeps >= 99% of 20 neighbours)."""
    train_size: int | None = Field(None, gt=0)
    """Rows sampled at random to train the index; default autofaiss's size for the key."""
    recall_queries: int = Field(1000, gt=0)
    """Held-out memory rows whose recall@10 against exact search the manifest reports."""
    growth_warning: float = Field(4.0, gt=1)
    """Warn when the memory has grown past this multiple of the rows the index was trained on."""
    use_gpu: bool = False
    """Train and search on GPUs where faiss-gpu sees them (one GPU per shard actor)."""
    service: Literal["auto", "always", "never"] = "auto"
    """How `reco neighbors`, `reco evaluate` and `reco serve` hold the memory: `auto` starts
    the memory service (one Ray actor per index shard, spread over the nodes) when the index
    has several shards or the Ray cluster several nodes, or `reco serve` several replicas,
    else searches it in-process; `always` and `never` force one way (`never`: each Serve
    replica opens its own)."""
    local_dir: str | None = None
    """Folder on each node's local disk (NVMe) where shard actors copy their index and
    embedding files to memory-map them; default: Ray's temp folder (`/tmp/ray`)."""
    retrain: bool = False
    """When the memory has new shards: retrain on a fresh sample and rebuild every shard,
    instead of adding the new shards to the trained index."""
    metric: Literal["ip"] = "ip"
    """Inner product: the embeddings are L2-normalised, so it is cosine similarity."""


class NeighborsConfig(Section):
    k: int = Field(10, gt=0)
    """Neighbours kept per query and modality."""
    dedup_threshold: float = Field(0.95, gt=0, le=1.0)
    """Memory pairs whose image has a cosine above this with the query's image are dropped."""
    split: str = "train"
    """The output folder `<workdir>/neighbors/<split>/` (training reads `train.split`)."""
    input: str | None = None
    """Memory-format folder (Parquet parts + _manifest.json) of the query pairs; default: the
    memory itself, whose pairs then also drop themselves from their neighbours by id."""
    margin: int = Field(10, ge=0)
    """Extra neighbours searched for so that k remain after dropping duplicates; widened
    (doubled) for the queries that still lack k."""
    batch_size: int = Field(4096, gt=0)
    """Queries per search call."""
    num_actors: int | None = Field(None, gt=0)
    """Searchers (each holds the index); default one per GPU, else one per 4 CPUs."""
    search: Search = "uni"
    """The paper's ablation: `uni` (RECO) searches image queries against the memory's images
    and text queries against its texts; `cross` searches image queries against the memory's
    texts and text queries against its images. What is fused is `train.fuse`'s choice."""


class TrainConfig(Section):
    num_workers: int = Field(1, ge=0)
    """Ray Train workers (data-parallel replicas; gradients all-reduced). 0: Ray Train's
    local mode, the training in the `reco train` process itself on `cpus_per_worker` threads,
    without Ray Train's controller and worker processes (about 10 s to start), for a split
    small enough that their start outweighs the training; checkpoints and resumption by a
    re-run are the same, a failure is not retried (`max_failures` does not apply)."""
    use_gpu: bool = False
    """Train on GPUs (one per worker), with autocast in `precision`."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs each worker reserves (0.5 lets two workers share one core in tests); torch's
    threads in local mode (`num_workers: 0`)."""
    retrieval: bool = True
    """False trains the same modules with k=0 (no memory): the control, written to
    `train/model-noretrieval/`."""
    split: str = "train"
    """The neighbour split trained on: `<workdir>/neighbors/<split>/`."""
    batch_size: int = Field(1024, gt=0)
    """Global batch (split evenly over the workers; the loss sees all of it)."""
    epochs: int = Field(10, gt=0)
    """Passes over the neighbour shards."""
    lr: float = Field(1e-3, gt=0)
    """AdamW's peak learning rate."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warmup, then cosine decay to 0 at the last step."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay (not applied to gains, biases and the temperature)."""
    heads: int = Field(8, gt=0)
    """Attention heads of each fusion layer (the paper: 8)."""
    mlp_ratio: float = Field(4.0, gt=0)
    """MLP width of each fusion layer as a multiple of d (the paper: 4)."""
    checkpoint_every: int = Field(200, gt=0)
    """Steps between checkpoints, reported to Ray Train and kept in `<workdir>/train/ray/<run>/`
    (the last step always writes one)."""
    max_failures: int = Field(3, ge=0)
    """Lost or failed workers Ray Train replaces, resuming from the latest checkpoint, before
    the run fails (0: the first failure ends it; a re-run of `reco train` resumes anyway)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Autocast dtype on GPU; CPU always runs fp32."""
    shuffle: bool = True
    """Every epoch a new random permutation of the whole split, seeded with `seed + epoch`
    so a resumed run sees the same order (see `in_memory_gb`); false: every epoch in file
    order."""
    in_memory_gb: float = Field(2.0, ge=0)
    """A split whose tensors (float32) fit in this many GB is read whole by every worker once
    and shuffled there, each epoch a permutation seeded with `seed + epoch`, every worker
    taking its slice of each global batch; a larger one streams through Ray Data, shuffled
    with its distributed `random_shuffle`. 0: always stream."""
    log_every: int = Field(1, gt=0)
    """Steps between logged metrics (TensorBoard under `<workdir>/train/logs/`)."""
    fuse: Fuse = "cross"
    """The paper's ablation: `cross` (RECO) fuses image queries with the texts of their
    neighbour pairs and text queries with their images; `uni` with the queries' own modality
    (needs neighbour shards written with this setting: `reco neighbors` adds the columns);
    `mean`: nothing is trained, the refined embedding is the L2-normalised mean of the
    cross tokens."""

    @property
    def local_mode(self) -> bool:
        """`num_workers: 0`: Ray Train's local mode, the training in this process."""
        return self.num_workers == 0

    @property
    def world_size(self) -> int:
        """The processes training: the workers, or the one local-mode process."""
        return self.num_workers or 1


class EvalDataset(Section):
    """One evaluation set: where its images come from, and what is measured on it."""
    name: str
    """The report's name for it; for kind `clip_benchmark`, clip_benchmark's dataset name
    (e.g. `cars`, `flowers`, `imagenet1k`, `vtab/cub`, `mscoco_captions`)."""
    kind: Literal["imagefolder", "webdataset", "clip_benchmark"]
    """`imagefolder`: a folder with one sub-folder of images per class (torchvision layout);
    `webdataset`: shards with an image, a caption (.txt) and for classification a `label`
    in the .json; `clip_benchmark`: built (and downloaded) by clip_benchmark."""
    path: str | None = None
    """The ImageFolder root, the shards (folder, glob or brace pattern), or clip_benchmark's
    download root (default `<workdir>/eval/_downloads`)."""
    task: Literal["classification", "retrieval"] = "classification"
    """Zero-shot classification (top-1/top-5) or image<->text retrieval (recall@1/5/10)."""
    split: str = "test"
    """The split clip_benchmark builds."""
    classnames: list[str] | dict[str, str] | str | None = None
    """Class names: a list in label order (for an ImageFolder: sorted folder order), a
    mapping folder -> name (ImageFolder), or a .txt (one per line) / .json file. Default:
    the folder names (ImageFolder), clip_benchmark's own (clip_benchmark)."""
    templates: list[str] | str | None = None
    """Prompt templates with `{c}` for the class name, or a clip_benchmark dataset name whose
    bundled templates to use. Default: clip_benchmark's templates for `name` if bundled,
    else imagenet1k's."""


class EvaluateConfig(Section):
    datasets: list[EvalDataset] = []
    """The evaluation sets, each evaluated with the frozen CLIP and with RECO."""
    k: int | None = Field(None, gt=0)
    """Neighbours retrieved per query; default: the k the fusion model was trained with."""
    batch_size: int = Field(256, gt=0)
    """Texts (class prompts, captions) encoded per forward pass."""
    ablations: bool = False
    """The paper's ablations as columns beside `reco`: `reco run` also trains the fusion
    model of each variant of `ABLATIONS` (cross-modal search, uni-modal fusion, no
    retrieval), and the report adds `memory_fraction`'s memory-size ablation."""
    memory_fraction: float = Field(0.1, gt=0, lt=1)
    """With `ablations`: RECO retrieving from only this share of the memory (a seeded random
    subset of its pairs), the report's `memory_<fraction>` column."""


class ServeConfig(Section):
    host: str = "127.0.0.1"
    """Address `reco serve` listens on; 0.0.0.0 listens on every interface."""
    port: int = Field(8000, gt=0, le=65535)
    """HTTP port of `reco serve`."""
    replicas: int = Field(1, gt=0)
    """Replicas of the model (each holds a frozen CLIP and the fusion modules; several
    replicas search one shared memory service); with `max_replicas`, the fewest Serve's
    autoscaling keeps."""
    max_replicas: int | None = Field(None, gt=0)
    """Set: Serve autoscales between `replicas` and this many on requests in flight."""
    cpus_per_replica: float = Field(1.0, gt=0)
    """CPUs each replica reserves (the frozen CLIP's forward pass, the fusion modules, and the
    memory search where the replica holds the memory itself)."""
    gpus_per_replica: float = Field(0.0, ge=0)
    """GPUs each replica reserves; above 0 the replica's CLIP runs on it, and its faiss search
    where the replica holds the memory itself (the shared service's: `index.use_gpu`)."""
    max_items: int = Field(64, gt=0)
    """Most images, texts or class names in one request; more is a 400."""
    max_request_bytes: int = Field(16 * 2**20, gt=0)
    """Largest request body, and largest image fetched from a URL; more is a 413 (a 400 for a URL)."""
    url_timeout: float = Field(10.0, gt=0)
    """Seconds to fetch one image URL before the request fails with a 400."""


class RecoConfig(Section):
    workdir: str
    """Root of every stage's output (any fsspec URL)."""
    seed: int = 0
    """Seeds every random choice: model init without weights, samples, shuffles, splits."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    neighbors: NeighborsConfig = Field(default_factory=NeighborsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @field_validator("workdir")
    @classmethod
    def _workdir_is_a_folder(cls, workdir: str) -> str:
        """A local workdir (or a folder above it) that is a file would fail at the first
        write, inside a Ray task; say so now. Object stores have no files-versus-folders."""
        if "://" in workdir and not workdir.startswith("file://"):
            return workdir
        path = Path(workdir.removeprefix("file://"))
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ValueError(f"{existing} is a file, not a folder; set workdir to a folder "
                             "(it is created if missing)")
        return workdir

    def path(self, *parts: str) -> str:
        """`<workdir>/<parts...>` as a URL or path string."""
        return "/".join([self.workdir.rstrip("/"), *parts])

    @property
    def variant(self) -> str:
        """The fusion model these settings train, as the report names it: `reco` (uni-modal
        search, cross-modal fusion, the paper's method) or the ablation they make."""
        if not self.train.retrieval:
            return "no_retrieval"
        parts = [name for name, on in (("search_cross", self.neighbors.search == "cross"),
                                       ("fuse_uni", self.train.fuse == "uni"),
                                       ("mean", self.train.fuse == "mean")) if on]
        return "+".join(parts) or "reco"

    @property
    def writes_uni(self) -> bool:
        """Whether `reco neighbors` stores the neighbours' same-modality embeddings too:
        `train.fuse=uni` fuses them, and the ablations train that variant on the same split."""
        return self.train.fuse == "uni" or self.evaluate.ablations


def _parse_yaml(text: str, source: str) -> Any:
    """Plain YAML only: the safe loader refuses Python tags (`!!python/...`), so a config can
    never run code; any YAML error becomes a ConfigError naming the source and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}{where}: not valid config YAML ({problem}); a reco config holds only "
                          "mappings, lists, strings and numbers (no Python tags)") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so `k=10` is an int)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. neighbors.k=20")
    value = _parse_yaml(raw, f"override {item!r}") if raw.strip() else ""
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


ABLATIONS: dict[str, list[str]] = {
    "search_cross": ["neighbors.search=cross"],
    "fuse_uni": ["train.fuse=uni"],
    "no_retrieval": ["train.retrieval=false"],
}
"""The paper's ablations (Table 5, Figure 3) as overrides of RECO's config: each trains its own
fusion model (`<workdir>/train/model-<variant>/`) on the same pairs with the same settings."""


def ablation_config(cfg: RecoConfig, variant: str) -> RecoConfig:
    """`cfg` with the overrides of one of `ABLATIONS`."""
    return config_from_dict(cfg.model_dump(mode="json"), ABLATIONS[variant], source=f"ablation {variant}")


def load_config(path: str | Path, overrides: list[str] = ()) -> RecoConfig:
    """Read a YAML config file and apply `dotted.key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          "save it as UTF-8") from None
    data = _parse_yaml(text, f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, overrides, source=str(path))


def dump_config(cfg: RecoConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = re.sub(r"\b[\w.]+\.(\w+)", r"\1", text).replace("NoneType", "None")
    return text.replace("|", "\\|")  # inside a Markdown table


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """X for list[X] where X is a config model (e.g. evaluate.datasets)."""
    args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is list and args and isinstance(args[0], type) \
            and issubclass(args[0], BaseModel):
        return args[0]
    return None


def config_reference() -> str:
    """docs/config.md: every key with its type, default and description, from the schema."""
    lines = ["# Configuration reference", "",
             "Generated from `reco/config.py` (`python -m reco.config > docs/config.md`); a test",
             "keeps it in step. Set keys in the YAML file or as `dotted.key=value` overrides.", ""]

    def section(model: type[BaseModel], prefix: str) -> None:
        nested = []
        lines.extend(["| key | type | default | meaning |", "|---|---|---|---|"])
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                nested.append((name, field.annotation))
                continue
            if (item := _item_model(field.annotation)) is not None:
                nested.append((f"{name}[]", item))
            default = "required" if field.is_required() else (
                f"`{field.default!r}`" if field.default_factory is None else f"`{field.default_factory()!r}`")
            meaning = " ".join((field.description or "").split())
            lines.append(f"| `{prefix}{name}` | `{_type_name(field.annotation)}` | {default} | {meaning} |")
        lines.append("")
        for name, sub in nested:
            lines.extend([f"## `{prefix}{name}`", ""])
            section(sub, f"{prefix}{name}.")

    section(RecoConfig, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference())
