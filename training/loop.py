"""What each Ray Train worker runs: read its part of each global batch of the neighbour
shards (from the whole split in its memory, or streamed by Ray Data), train the fusion
modules with the RECO loss, report checkpoints to Ray Train, and (rank 0) write the final
model.

A worker (re)starts from `ray.train.get_checkpoint()`, the latest checkpoint this run
reported (after a lost worker, or a re-run of the same command), else afresh. In Ray
Train's local mode (`train.num_workers: 0`: the loop runs in the driver, and Ray Train
keeps nothing) the loop writes its checkpoints to the same folder itself and resumes from
the newest complete one the driver found there. The data
position of a step is a pure function of the step: every epoch has exactly
`steps_per_epoch` batches in an order fixed by the seed and the epoch (each epoch is its
own seeded permutation of the whole split), so a resumed run skips the batches of the
checkpoint's epoch that were already trained on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import tempfile
import warnings
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
import ray.train
import ray.train.torch
import torch
from pydantic import BaseModel

from reco import storage
from reco.config import ConfigError, Fuse, RecoConfig
from reco.contracts import embeddings_to_numpy, nested_to_numpy, token_columns
from reco.errors import RecoError
from reco.fusion import RecoFusion, save_fusion
from reco.malloc import keep_freed_memory
from training.loss import RecoLoss

log = logging.getLogger(__name__)


class NonFiniteLossError(RecoError):
    """The loss became NaN or infinite; the message names the step and the batch."""


class Plan(BaseModel):
    """What the driver worked out before starting the workers."""
    d: int
    k: int
    """0 for the no-retrieval control: the fusion modules see only the query."""
    rows: int
    steps_per_epoch: int
    total_steps: int
    checkpoints: str
    """URL of the folder where Ray Train keeps this run's checkpoints."""
    resume_from: str | None = None
    """Local mode: the newest complete checkpoint folder in `checkpoints` when the run started."""
    model_dir: str
    logdir: str
    urls: list[str]
    """The split's Parquet shards, in the manifest's order."""
    columns: list[str]
    """The columns trained on (no neighbour tokens for the control)."""
    in_memory: bool
    """Every worker reads the whole split once (`SplitInMemory`); else Ray Data streams it."""
    fingerprint: dict
    """The settings a checkpoint must share to be resumed from."""
    neighbors: dict
    """The neighbour manifest's identity (split, model, k, ...), saved with the model."""


def make_scheduler(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over `warmup` steps (from 1/warmup of the peak to the peak), then
    cosine decay to 0 at step `total`; stepped once per training step."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=0.0)
    if warmup == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0,
                                               total_iters=max(1, warmup - 1))
    return torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warmup])


def make_optimizer(model: RecoFusion, cfg: RecoConfig) -> torch.optim.AdamW:
    """AdamW; as in CLIP, no weight decay on gains, biases and the temperature."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.train.lr)


def batch_tensors(batch: pa.Table, k: int, fuse: Fuse, device: torch.device) -> dict[str, torch.Tensor]:
    """Arrow batch -> float32 tensors v, t (n, d); the tokens each is fused with, v_tokens and
    t_tokens (n, k, d), chosen by `fuse`; v_missing, t_missing (n, k) True where a slot holds
    no neighbour (id -1)."""
    out = {"v": embeddings_to_numpy(batch["image_embedding"]),
           "t": embeddings_to_numpy(batch["text_embedding"])}
    n, d = out["v"].shape
    image_tokens, image_ids, text_tokens, text_ids = token_columns(fuse)
    for query, tokens, ids in (("v", image_tokens, image_ids), ("t", text_tokens, text_ids)):
        out[f"{query}_tokens"] = nested_to_numpy(batch[tokens]) if k else np.zeros((n, 0, d), np.float32)
        out[f"{query}_missing"] = (batch[ids].combine_chunks().flatten().to_numpy().reshape(n, k) < 0 if k
                                   else np.zeros((n, 0), bool))
    with warnings.catch_warnings():
        # float32 columns come zero-copy from Arrow, read-only; nothing writes to these tensors
        # (batches are gathered copies), so torch's warning about that would only be noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(x).to(device, non_blocking=True) for name, x in out.items()}


class SplitInMemory:
    """The whole split as tensors in one worker, read once, for splits that fit
    (`train.in_memory_gb`): an epoch is then a permutation of row indices, not a pass of
    the shards through Ray Data."""

    def __init__(self, urls: list[str], columns: list[str], k: int, fuse: Fuse,
                 device: torch.device = torch.device("cpu")):
        table = pa.concat_tables(storage.read_parquet(url, columns) for url in urls)
        self.tensors = batch_tensors(table, k, fuse, torch.device("cpu"))
        self.ids = table["id"].to_numpy()
        self.device = torch.device("cpu")
        if device.type == "cuda" and self.nbytes() <= torch.cuda.mem_get_info(device)[0] / 2:
            # In the GPU's memory where it takes at most half of what is free: a step then
            # gathers its batch there, where copying it from the host would cost more than the step.
            self.tensors = {name: t.to(device) for name, t in self.tensors.items()}
            self.device = device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def gather(self, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors of `rows`, gathered where the split lives, on `device`."""
        rows = rows.to(self.device)
        return {name: t[rows].to(device, non_blocking=True) for name, t in self.tensors.items()}

    def order(self, epoch: int, seed: int, shuffle: bool) -> torch.Tensor:
        """The epoch's row order: the same on every worker (each takes its slice of every
        global batch), a pure function of the seed and the epoch, so a resumed run, with any
        number of workers, sees the order of the run it continues."""
        rows = len(self.ids)
        if not shuffle:
            return torch.arange(rows)
        return torch.randperm(rows, generator=torch.Generator().manual_seed(seed + epoch))

    @staticmethod
    def worker_rows(order: torch.Tensor, index: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
        """Worker `rank`'s slice of global batch `index` of an epoch in `order`."""
        per_worker = batch_size // world
        start = index * batch_size + rank * per_worker
        return order[start:start + per_worker]


def in_batch_accuracy(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Share of images whose most similar text in the batch is their own."""
    hits = (images @ texts.T).argmax(dim=1) == torch.arange(len(images), device=images.device)
    return hits.float().mean().item()


def dataset_name(epoch: int, shuffled: bool) -> str:
    """The Ray Train dataset a worker reads in `epoch`: with the shuffle, each epoch's own
    whole-split permutation (`training.train.epoch_datasets`); without, the one file-order
    dataset."""
    return f"train-epoch-{epoch}" if shuffled else "train"


CHECKPOINT_STATE = "state.pt"
"""In a checkpoint folder: the tensors (weights, optimiser, scheduler, scaler states),
loaded with `torch.load(weights_only=True)`: a checkpoint never runs a pickle."""
CHECKPOINT_META = "meta.json"
"""In a checkpoint folder: the step, the settings fingerprint and the last metrics; written
last, so a folder without it is incomplete."""
KEEP_CHECKPOINTS = 2
"""Checkpoints kept per run; Ray Train deletes older ones once a newer one is registered,
local mode once a newer one is written."""


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def write_checkpoint(folder: str, step: int, model: RecoFusion, opt, sched, scaler, meta: dict) -> None:
    """The training state at `step` into a local folder (which Ray Train then persists)."""
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict()}, os.path.join(folder, CHECKPOINT_STATE))
    with open(os.path.join(folder, CHECKPOINT_META), "w") as f:
        json.dump({"step": step, **meta}, f)


def checkpoint_folders(url: str) -> list[str]:
    """URLs of the `checkpoint-<step>` folders in a run's storage folder, newest first."""
    fs, path = storage.filesystem(url)
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        return []
    folders = (p.rstrip("/") for p in fs.ls(path, detail=False))
    return [storage.full_url(fs, p) for p in sorted(folders, reverse=True)
            if p.rsplit("/", 1)[-1].startswith("checkpoint-")]


def persist_checkpoint(local_folder: str, run: str, step: int) -> None:
    """A local checkpoint folder copied into the run's folder `run` as step's, meta.json
    last, then all but the newest `KEEP_CHECKPOINTS` removed: local mode's counterpart of
    Ray Train's persisting a reported checkpoint."""
    url = storage.join(run, checkpoint_dir_name(step))
    for name in (CHECKPOINT_STATE, CHECKPOINT_META):
        with open(os.path.join(local_folder, name), "rb") as f:
            storage.write_bytes_atomic(storage.join(url, name), f.read())
    for old in checkpoint_folders(run)[KEEP_CHECKPOINTS:]:
        storage.remove(old, recursive=True)


def check_fingerprint(meta: dict, fingerprint: dict, where: str) -> None:
    """A checkpoint made with other settings is an error: resuming it would silently mix
    two runs."""
    if meta["fingerprint"] == fingerprint:
        return
    theirs = meta["fingerprint"]
    diff = sorted(k for k in fingerprint.keys() | theirs.keys() if fingerprint.get(k) != theirs.get(k))
    raise ConfigError(
        f"train: checkpoint {where} was made with other settings ({', '.join(diff)} differ: "
        + ", ".join(f"{k}={theirs.get(k)!r} there, {fingerprint.get(k)!r} now" for k in diff)
        + "); restore those settings to resume it, or delete it to start afresh")


def load_checkpoint(folder: str, fingerprint: dict, where: str) -> dict:
    """A checkpoint folder's meta.json merged with its tensors, after the fingerprint check;
    `folder` is local, or any fsspec URL."""
    meta = storage.read_json(storage.join(folder, CHECKPOINT_META))
    check_fingerprint(meta, fingerprint, where)
    fs, path = storage.filesystem(storage.join(folder, CHECKPOINT_STATE))
    try:
        with fs.open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ConfigError(f"train: checkpoint {where}: torch.load(weights_only=True) refused or could not read "
                          f"its {CHECKPOINT_STATE} and ran none of it ({str(err).splitlines()[0]}); delete that "
                          "folder to resume from the one before, or the run's folder to start afresh") from None
    return {**meta, **state}


class Trainer:
    """One worker's training state; rank 0 also checkpoints and logs."""

    def __init__(self, cfg: RecoConfig, plan: Plan):
        ctx = ray.train.get_context()
        self.cfg, self.plan = cfg, plan
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # Ray Train assigns a worker its GPU; local mode's process has none assigned.
        local_gpu = cfg.train.local_mode and cfg.train.use_gpu
        self.device = torch.device("cuda") if local_gpu else ray.train.torch.get_device()
        torch.manual_seed(cfg.seed)
        self.model = RecoFusion(plan.d, cfg.train.heads, cfg.train.mlp_ratio, cfg.train.fuse).to(self.device)
        self.opt = make_optimizer(self.model, cfg)
        self.sched = make_scheduler(self.opt, cfg.train.warmup_steps, plan.total_steps)
        self.loss_fn = RecoLoss()
        cuda = self.device.type == "cuda"
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        self.autocast = torch.autocast("cuda", dtype=amp_dtype) if cuda and amp_dtype else nullcontext()
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.train.precision == "fp16")
        self.metrics: dict = {}
        self.resumed_from: list[int] = []
        self.step = self._resume()
        self.ddp = ray.train.torch.prepare_model(self.model, move_to_device=False)
        self.writer = self._writer() if self.rank == 0 else None

    def _resume(self) -> int:
        """Resume order: the latest checkpoint this run reported to Ray Train (kept across
        lost workers and re-runs of the same command), or in local mode the newest the driver
        found in storage, else a fresh start."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            where = checkpoint.path
            with checkpoint.as_directory() as folder:
                state = load_checkpoint(folder, self.plan.fingerprint, where)
        elif self.cfg.train.local_mode and self.plan.resume_from:
            where = self.plan.resume_from
            state = load_checkpoint(where, self.plan.fingerprint, where)
        else:
            return 0
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.metrics = state["metrics"]
        self.resumed_from = [*state["resumed_from"], state["step"]]
        if self.rank == 0:
            log.info("resuming from %s at step %d", where, state["step"])
        return state["step"]

    def _writer(self):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after its last checkpoint.
        return SummaryWriter(self.plan.logdir, purge_step=self.step or None)

    def run(self) -> dict:
        """Train to the last step; returns the last step's metrics, or {"error": message}
        for a non-finite loss, which every worker meets at the same step (the loss is the
        global batch's): the run stops there instead of being retried into the same NaN."""
        split = (SplitInMemory(self.plan.urls, self.plan.columns, self.plan.k, self.cfg.train.fuse, self.device)
                 if self.plan.in_memory else None)
        while self.step < self.plan.total_steps:
            epoch, skip = divmod(self.step, self.plan.steps_per_epoch)
            batches = self._from_memory(split, epoch, skip) if split else self._streamed(epoch, skip)
            for index, (x, ids) in enumerate(batches, start=skip):
                try:
                    self.metrics = self.train_step(x, ids, epoch, index)
                except NonFiniteLossError as err:
                    if self.rank == 0:
                        self.writer.close()
                    return {"error": str(err)}
        if self.rank == 0:
            self.finish(self.metrics)
        return self.metrics

    def _from_memory(self, split: SplitInMemory, epoch: int, skip: int):
        """(tensors, ids) of this worker's slice of each global batch of the epoch after `skip`."""
        order = split.order(epoch, self.cfg.seed, self.cfg.train.shuffle)
        for index in range(skip, self.plan.steps_per_epoch):
            rows = split.worker_rows(order, index, self.cfg.train.batch_size, self.rank, self.world)
            yield split.gather(rows, self.device), split.ids[rows.numpy()]

    def _streamed(self, epoch: int, skip: int):
        """(tensors, ids) of the batches after `skip` of this worker's Ray Data split."""
        shard = ray.train.get_dataset_shard(dataset_name(epoch, self.cfg.train.shuffle))
        batches = shard.iter_batches(batch_size=self.cfg.train.batch_size // self.world,
                                     batch_format="pyarrow", drop_last=True)
        seen = 0
        for seen, batch in enumerate(batches, start=1):
            if skip < seen <= self.plan.steps_per_epoch:
                yield batch_tensors(batch, self.plan.k, self.cfg.train.fuse, self.device), batch["id"].to_numpy()
        if seen != self.plan.steps_per_epoch:
            raise RuntimeError(f"worker {self.rank} got {seen} batches in epoch {epoch}, expected "
                               f"{self.plan.steps_per_epoch}: the neighbour shards changed during training")

    def train_step(self, x: dict[str, torch.Tensor], ids: np.ndarray, epoch: int, index: int) -> dict:
        with self.autocast:
            v_ref, t_ref = self.ddp(x["v"], x["v_tokens"], x["t"], x["t_tokens"], x["v_missing"], x["t_missing"])
            loss = self.loss_fn(x["v"], x["t"], v_ref.float(), t_ref.float(), self.model.logit_scale)
        if not torch.isfinite(loss):
            ids = ids.tolist()
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step + 1} (epoch {epoch}, batch {index}, query ids "
                f"{ids[:5]}{'...' if len(ids) > 5 else ''}); the last good checkpoint in "
                f"{self.plan.checkpoints} is kept. Lower train.lr or check the neighbour shards.")
        self.opt.zero_grad(set_to_none=True)
        # The loss's gradient reaches only this worker's rows and DDP averages over workers:
        # scaling by the world size makes the update that of the whole global batch.
        self.scaler.scale(loss * self.world).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the logit scale
        self.step += 1
        metrics = {"loss": loss.item(), "temperature": math.exp(-self.model.logit_scale.item()),
                   "lr": self.sched.get_last_lr()[0],
                   "accuracy/frozen": in_batch_accuracy(x["v"], x["t"]),
                   "accuracy/refined": in_batch_accuracy(v_ref.detach().float(), t_ref.detach().float())}
        if self.rank == 0:
            self.log(metrics)
        if self.step % self.cfg.train.checkpoint_every == 0 or self.step == self.plan.total_steps:
            self.checkpoint(metrics)
        return metrics

    def checkpoint(self, metrics: dict) -> None:
        """Every worker reports (Ray Train's report is a barrier); rank 0 with the checkpoint."""
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            write_checkpoint(folder, self.step, self.model, self.opt, self.sched, self.scaler,
                             {"fingerprint": self.plan.fingerprint, "metrics": metrics,
                              "resumed_from": self.resumed_from})
            if self.cfg.train.local_mode:  # Ray Train's local mode keeps a reported checkpoint in memory only
                persist_checkpoint(folder, self.plan.checkpoints, self.step)
                ray.train.report(metrics)
                return
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=checkpoint_dir_name(self.step))

    def log(self, metrics: dict) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"train/{name}", value, self.step)
        if self.step % self.cfg.train.log_every == 0 or self.step == self.plan.total_steps:
            log.info("step %d/%d %s", self.step, self.plan.total_steps,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def finish(self, metrics: dict) -> None:
        self.writer.close()
        save_fusion(self.model, fusion_meta(self.cfg, self.plan, self.step, metrics, self.resumed_from),
                    self.plan.model_dir)


def fusion_meta(cfg: RecoConfig, plan: Plan, steps: int, metrics: dict, resumed_from: list[int]) -> dict:
    """What is saved beside the final weights (`reco.fusion.load_fusion` reads it back)."""
    t = cfg.train
    return {"d": plan.d, "heads": t.heads, "mlp_ratio": t.mlp_ratio, "k": plan.k, "retrieval": t.retrieval,
            "fuse": t.fuse, "steps": steps, "final_metrics": metrics, "resumed_from": resumed_from,
            "fingerprint": plan.fingerprint, "neighbors": plan.neighbors, "config": cfg.model_dump(mode="json")}


def train_loop_per_worker(config: dict) -> dict:
    """The Ray Train entry point (runs on every worker); rank 0's return value reaches the
    driver as `Result.return_value`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    return Trainer(RecoConfig.model_validate_json(config["cfg"]), Plan.model_validate(config["plan"])).run()
