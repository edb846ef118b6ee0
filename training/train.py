"""`reco train`: the fusion modules trained with the RECO loss, as a Ray Train job.

Workers (`train.num_workers`, `train.use_gpu`) read the neighbour shards every epoch in
a new random order over the whole split (seeded by `seed + epoch`): a split that fits
(`train.in_memory_gb`) is read once into each worker's memory, a larger one streams
through Ray Data; gradients are all-reduced by DDP. Every
`train.checkpoint_every` steps the workers report a checkpoint to Ray Train, kept in
`<workdir>/train/ray/<run>/`: a lost worker is replaced and the run goes on from there
(up to `train.max_failures` times), and a re-run of a killed driver resumes there too,
at the same step, optimizer state and data position. `train.num_workers: 0` runs the
same loop in this process (Ray Train's local mode), which then writes the checkpoints to
the same folder itself. The final weights and the config
that made them go to `<workdir>/train/model/`, or for an ablation's settings to
`model-<variant>/` (`RecoConfig.variant`: `model-noretrieval/` for the control trained
with `train.retrieval=false`); TensorBoard logs to `train/logs/`. The parameter-free
`train.fuse=mean` has nothing to train: its model is written at once.
"""

from __future__ import annotations

import json
import logging
import os

import pyarrow.fs
import ray
import ray.train
import torch
from fsspec.implementations.local import LocalFileSystem
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from reco import storage
from reco.cluster import init_ray, ray_train_log_level
from reco.config import ConfigError, RecoConfig
from reco.contracts import (FUSION_META, TRAIN_DIR, NeighborsManifest, fusion_model_dir, fusion_model_name,
                            neighbors_folder, token_columns)
from reco.depends import TRAIN_RUNTIME, neighbors_generation, stage_depends
from reco.fusion import RecoFusion, save_fusion
from training.loop import (CHECKPOINT_META, KEEP_CHECKPOINTS, NonFiniteLossError, Plan, check_fingerprint,
                           checkpoint_folders, dataset_name, fusion_meta, train_loop_per_worker)

log = logging.getLogger(__name__)

RAY_DIR = "ray"
"""Under `<workdir>/train/`: Ray Train's storage, one folder per run (its checkpoints)."""
POLL_INTERVAL_S = "0.5"
"""How often Ray Train's controller polls its workers (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`,
Ray's default 2 s). Every checkpoint report and the run's end wait for a poll: with the
default a 32-step run with 4 checkpoints took 22 s instead of 14-16 s. A value the user
sets wins."""


def _check_shards(manifest: NeighborsManifest, folder: str, k: int) -> list[str]:
    """The shard URLs, after checking each file's embedding width and k against the manifest."""
    urls = [storage.join(folder, s.path) for s in manifest.shards if s.rows]
    for url in urls:
        if not storage.exists(url):
            raise ConfigError(f"train.split: shard {url} listed in the manifest is missing; "
                              "re-run `reco neighbors`")
        schema = storage.parquet_schema(url)
        width = schema.field("image_embedding").type.list_size
        nn = schema.field("nn_text").type
        if width != manifest.d or nn.list_size != manifest.k or nn.value_type.list_size != manifest.d:
            raise ConfigError(
                f"train.split: {url} holds embeddings of width {width} with {nn.list_size} neighbours "
                f"of width {nn.value_type.list_size}, but the split's manifest says d={manifest.d}, "
                f"k={manifest.k}; re-run `reco neighbors` into a clean `neighbors/{manifest.split}`")
    return urls


def _validate(cfg: RecoConfig) -> tuple[NeighborsManifest, list[str]]:
    t = cfg.train
    folder = neighbors_folder(cfg.workdir, t.split, cfg.neighbors.search)
    manifest = NeighborsManifest.read(folder)
    if manifest is None:
        raise ConfigError(f"train.split: no finished neighbour split in {folder}; run `reco neighbors` "
                          f"with neighbors.split={t.split} first")
    if manifest.total_rows == 0:
        raise ConfigError(f"train.split: the split {t.split} in {folder} is empty (0 pairs)")
    if t.retrieval and manifest.k != cfg.neighbors.k:
        raise ConfigError(f"neighbors.k: the split {t.split} was built with k={manifest.k}, the config "
                          f"says {cfg.neighbors.k}; set neighbors.k={manifest.k} or re-run `reco neighbors`")
    if t.fuse == "uni" and t.retrieval and not manifest.uni:
        raise ConfigError(f"train.fuse: uni fuses the neighbours' same-modality embeddings, which the split "
                          f"{t.split} lacks; re-run `reco neighbors` with train.fuse=uni")
    if t.fuse == "mean" and not t.retrieval:
        raise ConfigError("train.fuse: mean averages the retrieved embeddings; with train.retrieval=false "
                          "there are none (use train.fuse=cross for the no-retrieval control)")
    if manifest.d % t.heads:
        raise ConfigError(f"train.heads: the embedding width {manifest.d} is not divisible by {t.heads}")
    world = t.world_size
    if t.local_mode and t.use_gpu and not torch.cuda.is_available():
        raise ConfigError("train.use_gpu: no CUDA device in this process, where local mode "
                          "(train.num_workers=0) trains; use workers on a GPU node, or use_gpu=false")
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size: {t.batch_size} does not split evenly over "
                          f"train.num_workers={t.num_workers}")
    if manifest.total_rows // world < t.batch_size // world:
        raise ConfigError(f"train.batch_size: {t.batch_size} is larger than the split's "
                          f"{manifest.total_rows} pairs; lower it")
    return manifest, _check_shards(manifest, folder, manifest.k)


def split_gb(rows: int, d: int, k: int) -> float:
    """The split's tensors in a worker's memory: float32 query embeddings and neighbour
    tokens, int64 neighbour ids."""
    return rows * ((2 + 2 * k) * d * 4 + (1 + 2 * k) * 8) / 1e9


def make_plan(cfg: RecoConfig, manifest: NeighborsManifest, urls: list[str]) -> Plan:
    t = cfg.train
    k = manifest.k if t.retrieval else 0
    name = fusion_model_name(cfg.variant)
    # Equal splits: every worker gets rows // W pairs and drops its last partial batch.
    world = t.world_size
    steps_per_epoch = (manifest.total_rows // world) // (t.batch_size // world)
    identity = {"split": t.split, "model": manifest.model, "pretrained": manifest.pretrained,
                "d": manifest.d, "k": k, "rows": manifest.total_rows,
                "dedup_threshold": manifest.dedup_threshold, "search": manifest.search,
                # re-made neighbours (e.g. over a grown memory) make the model and checkpoints stale
                "generation": neighbors_generation(manifest)}
    fingerprint = {**identity, "seed": cfg.seed,
                   **{key: v for key, v in t.model_dump(mode="json").items() if key not in TRAIN_RUNTIME}}
    columns = ["id", "image_embedding", "text_embedding"] + (list(token_columns(t.fuse)) if k else [])
    return Plan(d=manifest.d, k=k, rows=manifest.total_rows, steps_per_epoch=steps_per_epoch,
                urls=urls, columns=columns, in_memory=split_gb(manifest.total_rows, manifest.d, k) <= t.in_memory_gb,
                total_steps=steps_per_epoch * t.epochs,
                checkpoints=cfg.path(TRAIN_DIR, RAY_DIR, name),
                model_dir=fusion_model_dir(cfg.workdir, cfg.variant), logdir=cfg.path(TRAIN_DIR, "logs", name),
                fingerprint=fingerprint, neighbors=identity)


def _finished(plan: Plan, replace: bool) -> dict | None:
    """The saved metadata when this exact run already finished. A model trained with other
    settings or inputs is an error, or with `replace` it is made incomplete (its metadata
    removed) for this run to replace."""
    url = storage.join(plan.model_dir, FUSION_META)
    meta = storage.read_json(url) if storage.exists(url) else None
    if meta is None or meta.get("fingerprint") == plan.fingerprint:
        return meta
    if not replace:
        raise ConfigError(f"train: {plan.model_dir} holds a model trained with other settings; delete "
                          f"it (and {plan.checkpoints}) to retrain, run `reco run` (which replaces it), "
                          "or use another workdir")
    log.info("train: %s was trained with other settings or inputs; replacing it", plan.model_dir)
    storage.remove(url)
    return None


def _check_checkpoints(plan: Plan, replace: bool) -> tuple[str, dict] | None:
    """The newest checkpoint in storage, if made with these settings. One of other settings
    fails here, before any worker starts; with `replace` the run's checkpoints are removed."""
    latest = latest_checkpoint(plan)
    if latest is None:
        return None
    try:
        check_fingerprint(latest[1], plan.fingerprint, latest[0])
        return latest
    except ConfigError:
        if not replace:
            raise
    log.warning("train: removing %s, checkpoints of other settings", plan.checkpoints)
    storage.remove(plan.checkpoints, recursive=True)
    return None


def _record(model_dir: str, meta: dict, depends: dict) -> dict:
    """`depends` (reco/depends.py) in the model's metadata, so `reco run` can skip training."""
    if meta.get("depends") != depends:
        meta = {**meta, "depends": depends}
        storage.write_json_atomic(storage.join(model_dir, FUSION_META), meta)
    return meta


def latest_checkpoint(plan: Plan) -> tuple[str, dict] | None:
    """(URL, meta.json) of the run's newest complete checkpoint folder in storage, if any.

    Ray Train itself resumes from the latest checkpoint it registered; this look is the
    driver's, to refuse one made with other settings before any worker starts (and in local
    mode, the one to resume from)."""
    for url in checkpoint_folders(plan.checkpoints):
        try:
            return url, storage.read_json(storage.join(url, CHECKPOINT_META))
        except (FileNotFoundError, json.JSONDecodeError):
            continue  # a folder a killed run was still copying: never registered, never resumed
    return None


def run_config(cfg: RecoConfig) -> RunConfig:
    """Ray Train's storage under `<workdir>/train/ray/`, one run per model name, so that a
    re-run of the same command finds the run's checkpoints; any fsspec URL works."""
    fs, path = storage.filesystem(cfg.path(TRAIN_DIR, RAY_DIR))
    if isinstance(fs, LocalFileSystem):
        where = {"storage_path": os.path.abspath(path)}
    else:
        where = {"storage_path": path,
                 "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}
    return RunConfig(name=fusion_model_name(cfg.variant), **where,
                     checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                     failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                     logging_config=LoggingConfig(log_level=ray_train_log_level()))


def epoch_datasets(cfg: RecoConfig, urls: list[str], columns: list[str]) -> dict[str, ray.data.Dataset]:
    """The Ray Data datasets the workers read, by name (`training.loop.dataset_name`).

    With `train.shuffle`, one per epoch: the whole split in a random order,
    Ray Data's distributed `random_shuffle` seeded with `seed + epoch`. An integer seed
    gives the same permutation every time a dataset executes, so each epoch has its own
    dataset: epochs differ, and a resumed run (a replaced worker group, a re-run command)
    sees the same order as the run it continues. The shuffle goes through the object
    store (spilled to disk), not a worker's memory. Without, one dataset in file order."""
    base = ray.data.read_parquet(urls).select_columns(columns)
    if not cfg.train.shuffle:
        named = {dataset_name(0, False): base}
    else:
        named = {dataset_name(epoch, True): base.random_shuffle(seed=cfg.seed + epoch)
                 for epoch in range(cfg.train.epochs)}
    for dataset in named.values():
        # The workers log their steps; Ray Data's bars, redrawn every epoch by the split
        # coordinator, would bury them.
        dataset.context.enable_progress_bars = False
        # The same order every time, as exact resumption needs: Ray Train workers get this
        # from the trainer's DataConfig, local mode reads the datasets as they are.
        dataset.context.execution_options.preserve_order = True
    return named


def _trainer(cfg: RecoConfig, plan: Plan) -> TorchTrainer:
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    # preserve_order: the same seed gives the same batches on every worker, which exact
    # resumption needs.
    streamed = {} if plan.in_memory else {
        "datasets": epoch_datasets(cfg, plan.urls, plan.columns),
        "dataset_config": DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True))}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config={"cfg": cfg.model_dump_json(), "plan": plan.model_dump()},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=resources),
        run_config=run_config(cfg), **streamed)


def train(cfg: RecoConfig, replace: bool = False) -> dict:
    """`reco train`: train (or resume, or skip if finished) the fusion modules; returns the
    metadata saved with the final model (including its last step's metrics). A model or
    checkpoint of other settings is an error, or with `replace` (`reco run`) replaced."""
    manifest, urls = _validate(cfg)
    plan = make_plan(cfg, manifest, urls)
    depends = stage_depends(cfg, "train")
    done = _finished(plan, replace)
    if done is not None:
        log.info("%s is already trained (%d steps)", plan.model_dir, done["steps"])
        return _record(plan.model_dir, done, depends)
    if cfg.train.fuse == "mean":  # the parameter-free reference: nothing to train
        save_fusion(RecoFusion(plan.d, cfg.train.heads, cfg.train.mlp_ratio, "mean"),
                    fusion_meta(cfg, plan, 0, {}, []), plan.model_dir)
        return _record(plan.model_dir, storage.read_json(storage.join(plan.model_dir, FUSION_META)), depends)
    latest = _check_checkpoints(plan, replace)
    local = cfg.train.local_mode
    split = ("in memory" if local else "in each worker's memory") if plan.in_memory else "streamed by Ray Data"
    log.info("training %s: %d pairs (%s), %d steps (%d per epoch), global batch %d %s%s",
             plan.model_dir, plan.rows, split, plan.total_steps, plan.steps_per_epoch, cfg.train.batch_size,
             "in this process (Ray Train's local mode)" if local else f"on {cfg.train.num_workers} worker(s)",
             f"; checkpoints up to step {latest[1]['step']} in storage" if latest else "")
    if local:
        plan = plan.model_copy(update={"resume_from": latest[0] if latest else None})
        result = _fit_locally(cfg, plan)
    else:
        init_ray()
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", POLL_INTERVAL_S)  # read by the controller
        result = _fit(cfg, plan)
    if isinstance(result.return_value, dict) and "error" in result.return_value:
        raise NonFiniteLossError(result.return_value["error"])
    return _record(plan.model_dir, storage.read_json(storage.join(plan.model_dir, FUSION_META)), depends)


def _fit(cfg: RecoConfig, plan: Plan) -> ray.train.Result:
    try:
        return _trainer(cfg, plan).fit()
    except ray.train.WorkerGroupError as err:
        for failure in err.worker_failures.values():
            if isinstance(failure, (NonFiniteLossError, ConfigError)):
                raise failure from None
        raise


def _fit_locally(cfg: RecoConfig, plan: Plan) -> ray.train.Result:
    """Ray Train's local mode: the loop in this process, on `cpus_per_worker` threads as a
    worker would have; Ray is started only for Ray Data to stream a split too large for
    memory."""
    if not plan.in_memory:
        init_ray()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    try:
        return _trainer(cfg, plan).fit()
    finally:
        torch.set_num_threads(threads)
