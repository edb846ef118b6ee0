"""Decoding for the embed stage: the split preprocess equals open_clip's, worker processes
write what in-line decoding writes, and a dead worker fails its shard with a clear error."""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import open_clip
import psutil
import pytest
import torch
from PIL import Image
from torchvision import transforms

from pipeline.embed import embed
from pydantic import BaseModel

from reco.cli import main
from reco.decode import DecodeError, Preprocess, SampleDecoder, decode_samples
from reco.errors import ConfigError, RecoError
from reco.demo import synthetic
from reco.shard_jobs import ActorResources, ShardActor, run_shard_jobs
from reco.tars import TarSample
from tests.conftest import make_config
from tests.test_embed import _bad_shard, read_memory


def _images() -> list[bytes]:
    """JPEGs of the corpus, and the other modes web images come in: grey, palette, RGBA PNG."""
    jpegs = [s.jpeg for s in synthetic.make_samples(3, seed=7, image_size=96)]
    base = Image.open(io.BytesIO(jpegs[0]))
    others = []
    for mode, fmt in (("L", "JPEG"), ("P", "PNG"), ("RGBA", "PNG")):
        buf = io.BytesIO()
        base.resize((120, 80)).convert(mode).save(buf, fmt)
        others.append(buf.getvalue())
    return jpegs + others


@pytest.mark.parametrize("size", [32, 224])
def test_split_preprocess_equals_open_clip(size):
    preprocess = open_clip.image_transform(size, is_train=False)
    split = Preprocess.split(preprocess)
    assert split.normalize is not None
    images = _images()
    ours = split.batch([torch.from_numpy(np.stack([split.image(b) for b in images]))], "cpu")
    theirs = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    assert torch.equal(ours, theirs)


def test_a_preprocess_without_a_float_tail_runs_whole():
    preprocess = transforms.Compose([transforms.Resize(24), transforms.CenterCrop(24), transforms.ToTensor()])
    split = Preprocess.split(preprocess)
    assert split.normalize is None
    images = _images()
    ours = split.batch([torch.from_numpy(np.stack([split.image(b) for b in images]))], "cpu")
    theirs = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    assert torch.equal(ours, theirs)


def test_decoding_processes_write_what_in_line_decoding_writes(tmp_path, tiny_checkpoint, ray_local):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # 40 good samples, the 5 bad ones at 30-34: on both sides of a run boundary (runs of 32)
    _bad_shard(corpus / "00000.tar", good=40, bad_at=30)
    manifests, tables = {}, {}
    for processes in (0, 2):
        cfg = make_config(tmp_path / f"work-{processes}", model={"pretrained": tiny_checkpoint},
                          embed={"input": str(corpus), "batch_size": 64, "dtype": "float32",
                                 "decode_processes": processes})
        manifests[processes] = embed(cfg)
        tables[processes] = read_memory(cfg.workdir)
    inline, workers = manifests[0].inputs[0], manifests[2].inputs[0]
    assert (inline.samples, inline.written) == (45, 40)
    assert tables[2].equals(tables[0])  # keys, captions and embeddings, to the bit
    assert workers.skipped == inline.skipped and inline.skipped.total == 5
    assert inline.seconds["decoder_start"] == 0 and workers.seconds["decoder_start"] > 0


def test_a_dead_decoding_process_fails_its_shard_and_the_next_decodes():
    samples = [TarSample(key=s.key, files={"jpg": s.jpeg, "txt": s.caption.encode()})
               for s in synthetic.make_samples(4, seed=2)]
    decoder = SampleDecoder(open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32"),
                            processes=1)
    try:
        assert decoder.wait_started() > 0
        os.kill(decoder.pool.submit(os.getpid).result(), signal.SIGKILL)
        with pytest.raises(DecodeError, match="shard-7.tar: a decoding process died.*a re-run embeds it again"):
            for future in decoder.submit(samples, "shard-7.tar"):
                decoder.result(future, "shard-7.tar")
        decoder.wait_started()
        runs = [decoder.result(f, "shard-8.tar") for f in decoder.submit(samples, "shard-8.tar")]
        expected = decode_samples(samples, decoder.preprocess, decoder.tokenizer)
        assert [r.kept for r in runs] == [[0, 1, 2, 3]]
        assert torch.equal(runs[0].pixels, expected.pixels) and torch.equal(runs[0].tokens, expected.tokens)
    finally:
        decoder.close()


def _kill_first_decoding_process(stop: threading.Event) -> None:
    """SIGKILL the first spawned pool worker among this test's descendants (the embed
    replica's decoding process, as the kernel's OOM killer would), once."""
    while not stop.is_set():
        for proc in psutil.Process().children(recursive=True):
            try:
                if "spawn_main" in " ".join(proc.cmdline()):
                    proc.kill()
                    return
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)


def test_a_shard_whose_decoding_process_dies_fails_alone_with_a_clear_error(tmp_path, tiny_checkpoint, ray_local,
                                                                           capsys, caplog):
    corpus = tmp_path / "corpus"
    synthetic.write_webdataset(synthetic.make_samples(80, seed=12), str(corpus), samples_per_shard=40)
    config = tmp_path / "embed.yaml"
    config.write_text(f"workdir: {tmp_path / 'work'}\nmodel: {{pretrained: {tiny_checkpoint}}}\n"
                      f"embed: {{input: {corpus}, batch_size: 16, num_actors: 1, decode_processes: 1}}\n")
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_decoding_process, args=(stop,))
    killer.start()
    try:
        code = main(["embed", str(config)])
    finally:
        stop.set()
        killer.join()
    err = capsys.readouterr().err
    assert code == 2
    assert "reco: error: embed: 1 of 2 shards failed (1 done); re-run the same command" in err
    assert "a decoding process died" in err and "Traceback" not in err
    staging = tmp_path / "work" / "memory" / "_staging"
    finished = list(staging.glob("*.parquet"))
    assert len(finished) == 1 and not (tmp_path / "work" / "memory" / "_manifest.json").exists()

    with caplog.at_level(logging.INFO, logger="reco.encode"):
        assert main(["embed", str(config)]) == 0
    assert "2 input shards: 0 in memory, 1 staged, 1 to embed" in caplog.text  # only the failed one again
    whole = make_config(tmp_path / "whole", model={"pretrained": tiny_checkpoint},
                        embed={"input": str(corpus), "batch_size": 16})
    embed(whole)
    assert read_memory(str(tmp_path / "work")).equals(read_memory(whole.workdir))


class Done(BaseModel):
    name: str


class MarksItsClose(ShardActor):
    """Writes a file when closed: a replica's decoding processes must exit while it lives
    (killed with it, each printed a resource-tracker traceback on the console)."""

    def start(self, folder: str):
        self.folder = folder

    def process(self, name: str) -> Done:
        return Done(name=name)

    def close(self) -> None:
        Path(self.folder, f"closed-{os.getpid()}").touch()


def test_shard_actors_are_closed_before_they_are_killed(tmp_path, ray_local):
    jobs = [{"name": str(i)} for i in range(4)]
    records = run_shard_jobs(jobs, MarksItsClose, {"folder": str(tmp_path)}, ActorResources(2, 0.5, 0), Done,
                             desc="test")
    assert sorted(r.name for r in records) == ["0", "1", "2", "3"]
    assert len(list(tmp_path.glob("closed-*"))) == 2


class CannotStart(MarksItsClose):
    def start(self, folder: str):
        self.folder = folder
        raise ConfigError("model.pretrained: weights not on this node")

    def process(self, name: str) -> Done:
        Path(self.folder, f"processed-{name}").touch()
        return Done(name=name)


def test_actors_that_cannot_start_end_the_run_with_their_error_before_any_job(tmp_path, ray_local):
    jobs = [{"name": str(i)} for i in range(4)]
    with pytest.raises(RecoError) as raised:
        list(run_shard_jobs(jobs, CannotStart, {"folder": str(tmp_path)}, ActorResources(2, 0.5, 0), Done,
                            desc="test"))
    assert str(raised.value) == "test: 2 of 2 actors could not start: model.pretrained: weights not on this node"
    assert not list(tmp_path.glob("processed-*"))
    assert len(list(tmp_path.glob("closed-*"))) == 2
