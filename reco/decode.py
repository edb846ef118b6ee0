"""Samples to model inputs for the embed stage: images decoded and preprocessed, captions tokenized.

open_clip's image preprocess ends in `ToTensor` and `Normalize`. Decoding runs the
part before them (PIL: decode, resize, crop, RGB) per image and keeps uint8 pixels; the
float conversion and normalisation run once per batch on the replica's device, with
the same float32 operations (so the same values, to the bit), and uint8 is a quarter
of float32's bytes to move between processes and to the GPU.

Decoding runs in line (a CPU replica: its forward pass owns the core) or in worker
processes (beside a GPU), as torch's DataLoader workers do: threads would share the
replica's GIL with the forward pass's kernel launches, which ran 7-8x slower than the
bare forward on an H200 with 8 decoding threads beside it (docs/performance.md). A worker
tokenizes its samples' captions too: open_clip's tokenizer is Python, ~50 us a caption.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from reco.errors import RecoError
from reco.tars import TarSample


@dataclass
class Decoded:
    """A run of samples as model inputs: those kept, in order, and why each other one was skipped."""
    pixels: torch.Tensor | None
    """None if none is kept, else (kept, H, W, 3) uint8 before the preprocess's float tail,
    or (kept, C, H, W) float32 where the preprocess has no such tail. A tensor, not an
    array: torch passes tensors between processes in shared memory, numpy's are pickled
    through a pipe (on 2 cores the receiving process spent 160 us an image on those, 18-45
    on these)."""
    tokens: torch.Tensor | None
    """(kept, context) token ids; None if none is kept."""
    kept: list[int]
    """Positions of the kept samples in the run."""
    skipped: list[tuple[int, str]]
    """(position, reason) of the others."""


@dataclass
class Preprocess:
    """A model's preprocess split where its uint8 pixels end: `pil` per image, then
    `to_tensor` + `normalize` per batch (None where the preprocess is not split so)."""
    pil: Callable
    normalize: transforms.Normalize | None

    @classmethod
    def split(cls, preprocess: Callable) -> "Preprocess":
        steps = list(getattr(preprocess, "transforms", []))
        if (len(steps) >= 2 and isinstance(steps[-2], transforms.ToTensor)
                and isinstance(steps[-1], transforms.Normalize)):
            return cls(transforms.Compose(steps[:-2]), steps[-1])
        return cls(preprocess, None)

    def image(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            out = self.pil(img.convert("RGB"))
        if self.normalize is None:
            return out.numpy()
        # ToTensor's own conversion of an RGB image: an HWC uint8 array of its bytes
        return np.asarray(out if out.mode == "RGB" else out.convert("RGB"), np.uint8)

    def batch(self, runs: list[torch.Tensor], device: str) -> torch.Tensor:
        """Float, normalised (n, C, H, W) pixels on `device`: `Decoded.pixels` of runs, together."""
        x = torch.cat([run.to(device) for run in runs])
        if self.normalize is None:
            return x
        # as to_tensor: channels first, a float32 copy divided by 255; then Normalize per channel
        return self.normalize(x.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255))


def skip_reason(sample: TarSample) -> str | None:
    if sample.unsafe_path:
        return "unsafe member path"
    if sample.image is None:
        return "missing image"
    if sample.caption is None:
        return "missing caption"
    if not sample.caption:
        return "empty caption"
    return None


def decode_samples(samples: list[TarSample], preprocess: Preprocess, tokenizer: Callable) -> Decoded:
    """Each sample decoded, or the reason it is skipped."""
    pixels, kept, skipped = [], [], []
    for i, sample in enumerate(samples):
        reason = skip_reason(sample)
        if reason is None:
            try:
                pixels.append(preprocess.image(sample.image))
            except Exception as err:  # PIL raises many types for bad bytes; all mean "unreadable"
                reason = f"unreadable image ({type(err).__name__})"
        if reason is None:
            kept.append(i)
        else:
            skipped.append((i, reason))
    if not kept:
        return Decoded(None, None, kept, skipped)
    return Decoded(torch.from_numpy(np.stack(pixels)), tokenizer([samples[i].caption for i in kept]), kept, skipped)


RUN_MIN = 32

_worker: tuple[Preprocess, Callable] | None = None


def _init_worker(state_path: str) -> None:
    global _worker
    torch.set_num_threads(1)  # one process per core already
    with open(state_path, "rb") as f:
        _worker = pickle.load(f)


def _decode_in_worker(samples: list[TarSample]) -> Decoded:
    return decode_samples(samples, *_worker)


class DecodeError(RecoError, RuntimeError):
    """A decoding process died (killed for memory, or crashed in a native decoder)."""


class SampleDecoder:
    """Decodes runs of samples in line (`processes=0`) or in that many worker processes.

    Workers are spawned (not forked: the replica holds CUDA and Ray's threads) once, with
    the replica. Each reads the preprocess and tokenizer from a file: passed as arguments
    they would fill the pipe that starts it (the tokenizer pickles to 2 MB), and the
    workers would start one after another, each waiting for the last one's imports (over
    a minute for 8 on a GPU machine's sandbox).
    """

    def __init__(self, preprocess: Callable, tokenizer: Callable, processes: int):
        self.preprocess = Preprocess.split(preprocess)
        self.tokenizer = tokenizer
        self.processes = processes
        self.state: str | None = None
        self.starting: list[Future] = []
        self.pool = self._start() if processes > 0 else None

    def _start(self) -> ProcessPoolExecutor:
        with tempfile.NamedTemporaryFile("wb", prefix="reco-decode-", suffix=".pkl", delete=False) as f:
            pickle.dump((self.preprocess, self.tokenizer), f)
        self.state = f.name
        pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.state,))
        # All started now, beside the model's load; none is started later (they never exit).
        self.starting = [pool.submit(int) for _ in range(self.processes)]
        return pool

    def wait_started(self) -> float:
        """Seconds spent waiting for the workers' start (their imports), 0 once they run.
        Once every worker has read the state file, it goes."""
        if self.state is None:
            return 0.0
        start = time.perf_counter()
        wait(self.starting)
        os.remove(self.state)
        self.state = None
        return time.perf_counter() - start

    def batches_ahead(self, batch_size: int) -> int:
        """How many batches to submit ahead of the forward pass: enough runs for two per worker."""
        if self.pool is None:
            return 1
        runs = -(-batch_size // self._run_size(batch_size))
        return max(2, -(-2 * self.processes // runs))

    def _run_size(self, batch_size: int) -> int:
        # A batch spread over the workers, but runs of at least RUN_MIN: each run is one
        # shared-memory tensor with a fixed cost to pass (the receiver spent 45 us an image
        # in runs of 16, 18 in runs of 64, on a 2-core machine).
        return min(batch_size, max(RUN_MIN, -(-batch_size // self.processes)))

    def submit(self, samples: list[TarSample], source: str) -> list[Future]:
        """Futures of `Decoded` for consecutive runs of `samples` (of shard `source`), in order."""
        if self.pool is None:
            done: Future = Future()
            done.set_result(decode_samples(samples, self.preprocess, self.tokenizer))
            return [done]
        size = self._run_size(len(samples))
        try:
            return [self.pool.submit(_decode_in_worker, samples[i:i + size]) for i in range(0, len(samples), size)]
        except BrokenProcessPool as err:
            raise self._restart(err, source) from None

    def result(self, future: Future, source: str) -> Decoded:
        try:
            return future.result()
        except BrokenProcessPool as err:
            raise self._restart(err, source) from None

    def _restart(self, err: BrokenProcessPool, source: str) -> DecodeError:
        """A new pool for the next shard, and the error that fails this one."""
        self.close()
        self.pool = self._start()
        return DecodeError(f"{source}: a decoding process died ({err}); the shard is not staged, and a "
                           "re-run embeds it again")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            if self.state is not None:
                os.remove(self.state)
                self.state = None
