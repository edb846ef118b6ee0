"""`reco demo`: the whole pipeline, offline, in a small world where a memory matters.

72 synthetic classes, each named by an invented word (reco/demo/world.py). A tiny
CLIP pre-trained on coarse captions ("a photo of a triangle") knows the shapes but not
the names; the memory's captions name them; the fusion modules are trained on 54
classes and evaluated zero-shot on the 18 others, baseline against RECO and against the
paper's ablations (cross-modal search, uni-modal fusion, no retrieval, the parameter-free
mean, a tenth of the memory). The memory corpus is served over HTTP on 127.0.0.1, so
download runs img2dataset's real path.

The demo writes its config to `<workdir>/demo.yaml`, so each stage can be re-run by
hand with `reco <stage> <workdir>/demo.yaml`. Re-running the demo skips finished work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from reco import storage
from reco.cluster import init_ray
from reco.config import ABLATIONS, RecoConfig, ablation_config, config_from_dict, dump_config


class DemoScale:
    """Sizes of the demo world; `quick` shrinks it to a smoke run (tests)."""

    def __init__(self, quick: bool = False):
        self.memory_pairs = 1440 if quick else 7200
        self.fusion_pairs = 1080 if quick else 5400
        self.eval_per_class = 10 if quick else 50
        self.pretrain_steps = 40 if quick else 200
        self.pretrain_images = 2000 if quick else 8000
        self.epochs = 2 if quick else 20
        self.shard_size = 360 if quick else 1000


def demo_config(workdir: str, scale: DemoScale, train_cpus: float = 1.0) -> RecoConfig:
    from reco.demo import world

    sections = world.config_sections(workdir, f"{workdir}/frozen-clip.pt")
    # num_workers 0: Ray Train's local mode. Each training of the demo's 30 MB split takes
    # seconds; Ray Train's controller and worker would take longer to start than that.
    sections["train"] = {**sections["train"], "epochs": scale.epochs, "checkpoint_every": 50, "log_every": 42,
                         "num_workers": 0, "cpus_per_worker": train_cpus}
    data = {
        "workdir": workdir,
        "seed": 0,
        "download": {"url_list": f"{workdir}/urls.parquet", "number_sample_per_shard": scale.shard_size,
                     "image_size": 64, "thread_count": 16, "timeout": 2},
        "embed": {"batch_size": 256},
        **sections,
    }
    data["evaluate"] = {**data["evaluate"], "ablations": True}
    return config_from_dict(data)


def _train_cpus() -> float:
    """The demo trains one model at a time with nothing else running, so its training may
    take the free cores (torch's threads follow `cpus_per_worker`), up to 4."""
    import ray

    return float(min(4, max(1, int(ray.available_resources().get("CPU", 1)))))


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _frozen_clip(cfg: RecoConfig, scale: DemoScale) -> None:
    from reco.demo.pretrain import pretrain_frozen_clip

    start = _step("frozen CLIP: pre-training reco-tiny on coarse captions "
                  "(the demo's stand-in for downloading pretrained weights)")
    if storage.exists(cfg.model.pretrained):
        print(f"  {cfg.model.pretrained} exists")
        return
    stats = pretrain_frozen_clip(cfg.model.pretrained, n_images=scale.pretrain_images,
                                 steps=scale.pretrain_steps, seed=cfg.seed)
    print(f"  {stats['steps']} steps, final loss {stats['final_loss']}, {time.perf_counter() - start:.0f}s")


def _corpus(cfg: RecoConfig, scale: DemoScale) -> None:
    from pipeline.download import download
    from reco.demo import world
    from reco.demo.corpus_server import CorpusServer, write_url_list

    start = _step("download: the memory corpus (fine captions, all 72 classes), served on 127.0.0.1")
    with CorpusServer(scale.memory_pairs, seed=world.SPLIT_SEEDS["memory"]) as server:
        urls = write_url_list(cfg.download.url_list, server, broken_share=0.02, empty_rows=3, seed=cfg.seed)
        print(f"  serving {scale.memory_pairs} pairs at {server.url} "
              f"({urls.rows - urls.downloadable} URLs broken on purpose)")
        corpus = download(cfg)
    print(f"  {corpus.successes} of {corpus.input_rows} downloaded; failures: {corpus.failures} "
          f"({time.perf_counter() - start:.0f}s)")


def _memory_and_index(cfg: RecoConfig) -> None:
    from indexing.build import build_index
    from pipeline.embed import embed

    start = _step("embed: the frozen CLIP encodes the corpus into the memory")
    manifest = embed(cfg)
    print(f"  {cfg.path('memory')}: {manifest.total_rows} pairs in {len(manifest.shards)} shards, "
          f"d={manifest.d}, {manifest.skipped.total} skipped ({time.perf_counter() - start:.0f}s)")
    start = _step("index: faiss indices of the memory's images and texts")
    for modality, index in build_index(cfg).items():
        print(f"  index/{modality}: {index.key}, {index.ntotal} vectors, "
              f"recall@10 against exact search {index.recall_at_10:.3f}")
    print(f"  ({time.perf_counter() - start:.0f}s)")


def _fusion_training(cfg: RecoConfig, scale: DemoScale) -> None:
    from indexing.neighbors import neighbors
    from reco.demo import world
    from reco.encode import embed_shards
    from reco.contracts import neighbors_folder
    from reco.tars import list_shards
    from training.train import train

    start = _step("neighbors: the fusion-training pairs (54 classes) searched in the memory")
    pairs_corpus = cfg.path("fusion-corpus")
    if not storage.list_files(pairs_corpus, ".tar"):
        world.write_fusion_pairs(pairs_corpus, n=scale.fusion_pairs, shard_size=scale.shard_size)
    embed_shards(cfg, list_shards(pairs_corpus), cfg.neighbors.input)
    nb = neighbors(cfg)
    print(f"  {cfg.path('neighbors', nb.split)}: {nb.total_rows} queries, k={nb.k} "
          f"({time.perf_counter() - start:.0f}s)")
    runs = [("train: the fusion modules with retrieval (RECO)", cfg)] + [
        (f"train: the ablation {variant} ({' '.join(ABLATIONS[variant])})", ablation_config(cfg, variant))
        for variant in ABLATIONS]
    for title, run in runs:
        start = _step(title)
        if run.neighbors.search != cfg.neighbors.search:
            nb = neighbors(run)
            print(f"  its own neighbours: {neighbors_folder(cfg.workdir, nb.split, nb.search)}, "
                  f"{nb.total_rows} queries")
        meta = train(run)
        metrics = meta["final_metrics"]
        print(f"  {meta['steps']} steps, loss {metrics.get('loss', float('nan')):.3f}, in-batch image->text "
              f"accuracy frozen {metrics.get('accuracy/frozen', 0):.2f} -> refined "
              f"{metrics.get('accuracy/refined', 0):.2f} ({time.perf_counter() - start:.0f}s)")


def run_demo(workdir: str, quick: bool = False) -> RecoConfig:
    from evaluation.evaluate import evaluate
    from reco.demo import world

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scale = DemoScale(quick)
    workdir = str(Path(workdir).resolve())
    init_ray()
    cfg = demo_config(workdir, scale, train_cpus=_train_cpus())
    storage.write_bytes_atomic(storage.join(workdir, "demo.yaml"), dump_config(cfg).encode())
    begin = time.perf_counter()

    _frozen_clip(cfg, scale)
    _corpus(cfg, scale)
    _memory_and_index(cfg)
    _fusion_training(cfg, scale)

    start = _step("evaluate: zero-shot on the 18 held-out classes, whose names only the memory knows")
    eval_images = cfg.evaluate.datasets[0].path
    if not Path(eval_images).exists():
        world.write_eval_imagefolder(eval_images, per_class=scale.eval_per_class)
    evaluate(cfg)
    print(f"  ({time.perf_counter() - start:.0f}s)\n")
    print(Path(cfg.path("eval", "report.md")).read_text())
    print(f"report: {cfg.path('eval')}/report.{{json,md,png}}; "
          f"chance is {100 / world.N_HELD_OUT:.1f}% top-1. Whole demo: {time.perf_counter() - begin:.0f}s.")
    print(f"re-run any stage with: reco <stage> {workdir}/demo.yaml")
    return cfg
