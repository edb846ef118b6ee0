"""`reco train`: the fusion modules trained with the RECO loss, as a Ray Train job.

Workers (`train.num_workers`, `train.use_gpu`) each stream their own split of the
neighbour shards with Ray Data; gradients are all-reduced by DDP. A checkpoint in
`<workdir>/train/checkpoints/` every `train.checkpoint_every` steps lets a killed run
resume at the same step, optimizer state and data position. The final weights and the
config that made them go to `<workdir>/train/model/` (`model-noretrieval/` for the
control trained with `train.retrieval=false`); TensorBoard logs to `train/logs/`.
"""

from __future__ import annotations

import logging

import ray
import ray.train
from ray.train import DataConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from reco import storage
from reco.cluster import init_ray, ray_train_log_level
from reco.config import ConfigError, RecoConfig
from reco.contracts import (FUSION_META, TRAIN_DIR, NeighborsManifest, fusion_model_dir, fusion_model_name,
                            neighbors_folder)
from reco.depends import TRAIN_RUNTIME, neighbors_generation, stage_depends
from training.loop import NonFiniteLossError, Plan, load_checkpoint, train_loop_per_worker

log = logging.getLogger(__name__)


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
    folder = neighbors_folder(cfg.workdir, t.split)
    manifest = NeighborsManifest.read(folder)
    if manifest is None:
        raise ConfigError(f"train.split: no finished neighbour split in {folder}; run `reco neighbors` "
                          f"with neighbors.split={t.split} first")
    if manifest.total_rows == 0:
        raise ConfigError(f"train.split: the split {t.split} in {folder} is empty (0 pairs)")
    if t.retrieval and manifest.k != cfg.neighbors.k:
        raise ConfigError(f"neighbors.k: the split {t.split} was built with k={manifest.k}, the config "
                          f"says {cfg.neighbors.k}; set neighbors.k={manifest.k} or re-run `reco neighbors`")
    if manifest.d % t.heads:
        raise ConfigError(f"train.heads: the embedding width {manifest.d} is not divisible by {t.heads}")
    if t.batch_size % t.num_workers:
        raise ConfigError(f"train.batch_size: {t.batch_size} does not split evenly over "
                          f"train.num_workers={t.num_workers}")
    if manifest.total_rows // t.num_workers < t.batch_size // t.num_workers:
        raise ConfigError(f"train.batch_size: {t.batch_size} is larger than the split's "
                          f"{manifest.total_rows} pairs; lower it")
    return manifest, _check_shards(manifest, folder, manifest.k)


def make_plan(cfg: RecoConfig, manifest: NeighborsManifest) -> Plan:
    t = cfg.train
    k = manifest.k if t.retrieval else 0
    name = fusion_model_name(t.retrieval)
    # Equal splits: every worker gets rows // W pairs and drops its last partial batch.
    steps_per_epoch = (manifest.total_rows // t.num_workers) // (t.batch_size // t.num_workers)
    identity = {"split": t.split, "model": manifest.model, "pretrained": manifest.pretrained,
                "d": manifest.d, "k": k, "rows": manifest.total_rows,
                "dedup_threshold": manifest.dedup_threshold,
                # re-made neighbours (e.g. over a grown memory) make the model and checkpoints stale
                "generation": neighbors_generation(manifest)}
    fingerprint = {**identity, "seed": cfg.seed,
                   **{key: v for key, v in t.model_dump(mode="json").items() if key not in TRAIN_RUNTIME}}
    return Plan(d=manifest.d, k=k, rows=manifest.total_rows, steps_per_epoch=steps_per_epoch,
                total_steps=steps_per_epoch * t.epochs,
                checkpoint=cfg.path(TRAIN_DIR, "checkpoints", f"{name}.pt"),
                model_dir=fusion_model_dir(cfg.workdir, t.retrieval), logdir=cfg.path(TRAIN_DIR, "logs", name),
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
                          "it (and train/checkpoints/) to retrain, run `reco run` (which replaces it), "
                          "or use another workdir")
    log.info("train: %s was trained with other settings or inputs; replacing it", plan.model_dir)
    storage.remove(url)
    return None


def _check_checkpoint(plan: Plan, replace: bool) -> None:
    """A checkpoint of other settings fails here, early; with `replace` it is removed."""
    try:
        load_checkpoint(plan.checkpoint, plan.fingerprint)
    except ConfigError:
        if not replace:
            raise
        log.warning("train: removing %s, a checkpoint of other settings", plan.checkpoint)
        storage.remove(plan.checkpoint)


def _record(model_dir: str, meta: dict, depends: dict) -> dict:
    """`depends` (reco/depends.py) in the model's metadata, so `reco run` can skip training."""
    if meta.get("depends") != depends:
        meta = {**meta, "depends": depends}
        storage.write_json_atomic(storage.join(model_dir, FUSION_META), meta)
    return meta


def _trainer(cfg: RecoConfig, plan: Plan, urls: list[str]) -> TorchTrainer:
    t = cfg.train
    columns = ["id", "image_embedding", "text_embedding"] + (["nn_text", "nn_image"] if plan.k else [])
    dataset = ray.data.read_parquet(urls).select_columns(columns)
    # The workers log their steps; Ray Data's bars, redrawn every epoch by the split
    # coordinator, would bury them.
    dataset.context.enable_progress_bars = False
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    # preserve_order: the same seed gives the same batches, which exact resumption needs.
    options = ray.data.ExecutionOptions(preserve_order=True)
    return TorchTrainer(
        train_loop_per_worker, train_loop_config={"cfg": cfg.model_dump_json(), "plan": plan.model_dump()},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=resources),
        datasets={"train": dataset}, dataset_config=DataConfig(execution_options=options),
        run_config=RunConfig(logging_config=LoggingConfig(log_level=ray_train_log_level())))


def train(cfg: RecoConfig, replace: bool = False) -> dict:
    """`reco train`: train (or resume, or skip if finished) the fusion modules; returns the
    metadata saved with the final model (including its last step's metrics). A model or
    checkpoint of other settings is an error, or with `replace` (`reco run`) replaced."""
    manifest, urls = _validate(cfg)
    depends = stage_depends(cfg, "train")
    plan = make_plan(cfg, manifest)
    done = _finished(plan, replace)
    if done is not None:
        log.info("%s is already trained (%d steps)", plan.model_dir, done["steps"])
        return _record(plan.model_dir, done, depends)
    _check_checkpoint(plan, replace)
    log.info("training %s: %d pairs, %d steps (%d per epoch), global batch %d on %d worker(s)",
             plan.model_dir, plan.rows, plan.total_steps, plan.steps_per_epoch, cfg.train.batch_size,
             cfg.train.num_workers)
    init_ray()
    try:
        _trainer(cfg, plan, urls).fit()
    except ray.train.WorkerGroupError as err:
        for failure in err.worker_failures.values():
            if isinstance(failure, NonFiniteLossError):
                raise failure from None
        raise
    return _record(plan.model_dir, storage.read_json(storage.join(plan.model_dir, FUSION_META)), depends)
