"""Shared fixtures: one local Ray per session, a seeded reco-tiny checkpoint, a synthetic corpus.

Everything runs offline on 127.0.0.1: no model hub, no internet.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="reco-tests-hf-")  # no weights cached: the same on every machine
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from reco.config import RecoConfig, config_from_dict  # noqa: E402
from reco.demo import synthetic  # noqa: E402
from reco.models import register_model_configs  # noqa: E402


def start_local_ray() -> None:
    """The one local Ray of the test session (tests that need another cluster restore it)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False


@contextlib.contextmanager
def local_cluster(head_cpus: int, workers: int, **cluster_args):
    """A `ray.cluster_utils.Cluster` on this machine, a head of `head_cpus` CPUs and `workers`
    nodes of 2, joined by this process; the session's local Ray comes back after."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False},
                    **cluster_args)
    for _ in range(workers):
        nodes.add_node(num_cpus=2)
    try:
        ray.init(address=nodes.address, log_to_driver=False)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        start_local_ray()


@pytest.fixture
def ray_local():
    start_local_ray()
    yield


def pytest_sessionfinish(session, exitstatus):
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A reco-tiny state dict saved as a checkpoint file (seeded, so the same every run)."""
    import open_clip

    register_model_configs()
    torch.manual_seed(1234)
    model = open_clip.create_model("reco-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "reco-tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
    """3 webdataset shards x 40 synthetic pairs (fine captions)."""
    out = tmp_path_factory.mktemp("corpus")
    synthetic.write_webdataset(synthetic.make_samples(120, seed=3), str(out), samples_per_shard=40)
    return str(out)


@pytest.fixture(scope="session")
def eval_imagefolder(tmp_path_factory) -> str:
    """A small classification set: <root>/<class name>/<key>.jpg, 4 classes x 3 images."""
    root = tmp_path_factory.mktemp("imagefolder")
    names = [c.name for c in synthetic.classes()]
    for s in synthetic.make_samples(12, seed=21, class_ids=range(4)):
        folder = root / names[s.label]
        folder.mkdir(exist_ok=True)
        (folder / f"{s.key}.jpg").write_bytes(s.jpeg)
    return str(root)


def make_config(workdir: str | Path, **sections: Any) -> RecoConfig:
    """A RecoConfig for tests: reco-tiny, small batches, plus the given sections."""
    data: dict[str, Any] = {"workdir": str(workdir), "embed": {"batch_size": 16}}
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return config_from_dict(data)


def write_memory(workdir: str | Path, image, text, shard_rows: int, append: bool = False):
    """Embeddings written as `<workdir>/memory`, as `reco embed` would (model reco-tiny)."""
    from reco.contracts import write_memory as write

    return write(str(Path(workdir) / "memory"), image, text, shard_rows=shard_rows, append=append,
                 model="reco-tiny")


@pytest.fixture
def tiny_config(tmp_path, tiny_checkpoint, corpus_dir) -> RecoConfig:
    """A workdir config: reco-tiny from the checkpoint file, embedding `corpus_dir`."""
    return make_config(tmp_path / "work", model={"name": "reco-tiny", "pretrained": tiny_checkpoint},
                       embed={"input": corpus_dir})


@pytest.fixture(scope="session")
def s3_bucket() -> str:
    """An S3 bucket on a moto server at 127.0.0.1, visible to Ray workers too.

    s3fs reads AWS_ENDPOINT_URL from the environment, which Ray workers inherit only from
    the process that starts Ray: so Ray is (re)started after the variables are set.
    """
    from moto.server import ThreadedMotoServer
    import fsspec

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    if ray.is_initialized():
        ray.shutdown()
    start_local_ray()
    fsspec.filesystem("s3").mkdir("reco-test")
    yield "s3://reco-test"
    server.stop()


API_TEMPLATES = ["a photo of a {c}.", "a {c}."]


def build_api_world(base: Path, checkpoint: str, n_classes: int = 4, per_class: int = 3) -> RecoConfig:
    """A workdir as `reco train` leaves it, built in seconds: a memory of 40 synthetic pairs plus
    copies of two eval images, a Flat index, and a seeded untrained fusion model saved with
    its config (k=4); beside it an ImageFolder set (`evaluate.datasets[0]`) of
    n_classes x per_class images, whose first two images are the copied ones."""
    from indexing.build import build_index
    from pipeline.embed import embed
    from reco.fusion import RecoFusion, save_fusion

    start_local_ray()
    names = synthetic.classes()
    images = list(synthetic.make_samples(n_classes * per_class, seed=5, class_ids=range(n_classes)))
    for s in images:
        folder = base / "images" / names[s.label].name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{s.key}.jpg").write_bytes(s.jpeg)
    copies = [synthetic.Sample(f"copy{i}", s.jpeg, f"a copy {i}", s.label) for i, s in enumerate(images[:2])]
    memory = list(synthetic.make_samples(40, seed=11, class_ids=range(n_classes))) + copies
    synthetic.write_webdataset(memory, str(base / "corpus"), samples_per_shard=64)
    cfg = make_config(
        base / "work", model={"name": "reco-tiny", "pretrained": checkpoint},
        embed={"input": str(base / "corpus")}, index={"key": "Flat"},
        # An untrained reco-tiny maps all these images close together: only copies pass 0.999.
        neighbors={"k": 4, "dedup_threshold": 0.999},
        evaluate={"datasets": [{"name": "shapes", "kind": "imagefolder", "path": str(base / "images"),
                                "templates": API_TEMPLATES}]})
    embed(cfg)
    build_index(cfg)
    torch.manual_seed(0)
    meta = {"d": 64, "heads": 8, "mlp_ratio": 4.0, "k": 4, "steps": 0, "config": cfg.model_dump(mode="json")}
    save_fusion(RecoFusion(64), meta, cfg.path("train", "model"))
    return cfg


@pytest.fixture(scope="session")
def api_world(tmp_path_factory, tiny_checkpoint) -> RecoConfig:
    """The workdir of `build_api_world`, shared by the API and Serve tests."""
    return build_api_world(tmp_path_factory.mktemp("api_world"), tiny_checkpoint)
