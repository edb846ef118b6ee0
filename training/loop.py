"""What each Ray Train worker runs: stream its split of the neighbour shards, train the
fusion modules with the RECO loss, checkpoint, and (rank 0) write the final model.

The data position of a step is a pure function of the step: every epoch has exactly
`steps_per_epoch` batches in an order fixed by the seed, so a resumed run skips the
batches of the checkpoint's epoch that were already trained on.
"""

from __future__ import annotations

import io
import logging
import math
from contextlib import nullcontext

import fsspec
import numpy as np
import pyarrow as pa
import ray.train
import ray.train.torch
import torch
from pydantic import BaseModel

from indexing.neighbors import nested_to_numpy
from reco import storage
from reco.config import ConfigError, RecoConfig
from reco.errors import RecoError
from reco.schema import embeddings_to_numpy
from training.fusion import RecoFusion, save_fusion
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
    checkpoint: str
    """URL of the one checkpoint file, replaced atomically."""
    model_dir: str
    logdir: str
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


def batch_tensors(batch: pa.Table, k: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Arrow batch -> float32 tensors v, t (n, d) and nn_text, nn_image (n, k, d)."""
    out = {"v": embeddings_to_numpy(batch["image_embedding"]),
           "t": embeddings_to_numpy(batch["text_embedding"])}
    n, d = out["v"].shape
    for name in ("nn_text", "nn_image"):
        out[name] = nested_to_numpy(batch[name]) if k else np.zeros((n, 0, d), np.float32)
    return {name: torch.from_numpy(x).to(device, non_blocking=True) for name, x in out.items()}


def in_batch_accuracy(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Share of images whose most similar text in the batch is their own."""
    hits = (images @ texts.T).argmax(dim=1) == torch.arange(len(images), device=images.device)
    return hits.float().mean().item()


def save_checkpoint(url: str, step: int, model: RecoFusion, opt, sched, scaler, fingerprint: dict) -> None:
    buf = io.BytesIO()
    torch.save({"step": step, "fingerprint": fingerprint, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict()}, buf)
    storage.write_bytes_atomic(url, buf.getvalue())


def load_checkpoint(url: str, fingerprint: dict) -> dict | None:
    """The latest checkpoint of this run, or None to start fresh. One made with other
    settings is an error: resuming it would silently mix two runs."""
    if not storage.exists(url):
        return None
    with fsspec.open(url, "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        diff = sorted(k for k in fingerprint.keys() | state["fingerprint"].keys()
                      if fingerprint.get(k) != state["fingerprint"].get(k))
        raise ConfigError(
            f"train: checkpoint {url} was made with other settings ({', '.join(diff)} differ: "
            + ", ".join(f"{k}={state['fingerprint'].get(k)!r} there, {fingerprint.get(k)!r} now" for k in diff)
            + "); restore those settings to resume it, or delete it to start afresh")
    return state


class Trainer:
    """One worker's training state; rank 0 also checkpoints and logs."""

    def __init__(self, cfg: RecoConfig, plan: Plan):
        ctx = ray.train.get_context()
        self.cfg, self.plan = cfg, plan
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.seed)
        self.model = RecoFusion(plan.d, cfg.train.heads, cfg.train.mlp_ratio).to(self.device)
        self.opt = make_optimizer(self.model, cfg)
        self.sched = make_scheduler(self.opt, cfg.train.warmup_steps, plan.total_steps)
        self.loss_fn = RecoLoss()
        cuda = self.device.type == "cuda"
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        self.autocast = torch.autocast("cuda", dtype=amp_dtype) if cuda and amp_dtype else nullcontext()
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.train.precision == "fp16")
        self.step = self._resume()
        self.ddp = ray.train.torch.prepare_model(self.model, move_to_device=False)
        self.writer = self._writer() if self.rank == 0 else None

    def _resume(self) -> int:
        """Resume order: the latest checkpoint of this run, else a fresh start."""
        state = load_checkpoint(self.plan.checkpoint, self.plan.fingerprint)
        if state is None:
            return 0
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.rank == 0:
            log.info("resuming from %s at step %d", self.plan.checkpoint, state["step"])
        return state["step"]

    def _writer(self):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after its last checkpoint.
        return SummaryWriter(self.plan.logdir, purge_step=self.step or None)

    def run(self) -> dict:
        shard = ray.train.get_dataset_shard("train")
        per_worker = self.cfg.train.batch_size // self.world
        metrics: dict = {}
        while self.step < self.plan.total_steps:
            epoch, skip = divmod(self.step, self.plan.steps_per_epoch)
            batches = shard.iter_batches(
                batch_size=per_worker, batch_format="pyarrow", drop_last=True,
                local_shuffle_buffer_size=self.cfg.train.shuffle_buffer or None,
                local_shuffle_seed=self.cfg.seed + epoch if self.cfg.train.shuffle_buffer else None)
            seen = 0
            for seen, batch in enumerate(batches, start=1):
                if seen > skip and seen <= self.plan.steps_per_epoch:
                    metrics = self.train_step(batch, epoch, seen - 1)
            if seen != self.plan.steps_per_epoch:
                raise RuntimeError(f"worker {self.rank} got {seen} batches in epoch {epoch}, expected "
                                   f"{self.plan.steps_per_epoch}: the neighbour shards changed during training")
        if self.rank == 0:
            self.finish(metrics)
        return metrics

    def train_step(self, batch: pa.Table, epoch: int, index: int) -> dict:
        x = batch_tensors(batch, self.plan.k, self.device)
        with self.autocast:
            v_ref, t_ref = self.ddp(x["v"], x["nn_text"], x["t"], x["nn_image"])
            loss = self.loss_fn(x["v"], x["t"], v_ref.float(), t_ref.float(), self.model.logit_scale)
        if not torch.isfinite(loss):
            ids = batch["id"].to_pylist()
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step + 1} (epoch {epoch}, batch {index}, query ids "
                f"{ids[:5]}{'...' if len(ids) > 5 else ''}); the last good checkpoint "
                f"{self.plan.checkpoint} is kept. Lower train.lr or check the neighbour shards.")
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
                save_checkpoint(self.plan.checkpoint, self.step, self.model, self.opt, self.sched,
                                self.scaler, self.plan.fingerprint)
        return metrics

    def log(self, metrics: dict) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"train/{name}", value, self.step)
        if self.step % self.cfg.train.log_every == 0 or self.step == self.plan.total_steps:
            log.info("step %d/%d %s", self.step, self.plan.total_steps,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def finish(self, metrics: dict) -> None:
        self.writer.close()
        t = self.cfg.train
        meta = {"d": self.plan.d, "heads": t.heads, "mlp_ratio": t.mlp_ratio, "k": self.plan.k,
                "retrieval": t.retrieval, "steps": self.step, "final_metrics": metrics,
                "fingerprint": self.plan.fingerprint, "neighbors": self.plan.neighbors,
                "config": self.cfg.model_dump(mode="json")}
        save_fusion(self.model, meta, self.plan.model_dir)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train entry point (runs on every worker)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Trainer(RecoConfig.model_validate_json(config["cfg"]), Plan.model_validate(config["plan"])).run()
