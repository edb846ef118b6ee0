"""`reco train`: learning, checkpoints and exact resumption, data parallelism, bad input.

The neighbour shards are synthetic (reco.demo.neighbour_splits), built so that retrieval
carries signal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml

from reco.config import ConfigError, RecoConfig
from reco.contracts import NeighborsManifest, neighbors_table
from reco.demo import neighbour_splits as synthetic
from reco.fusion import RecoFusion, load_fusion
from tests.conftest import make_config
from training.loop import NonFiniteLossError, SplitInMemory, dataset_name
from training.loss import RecoLoss
from training.train import epoch_datasets, train

pytestmark = pytest.mark.usefixtures("ray_local")

# Ray Train starts a preemption watcher actor per run: on 2 shared cores a test run waits
# less with one process fewer. Ray Train hands the variable from the driver to its
# controller (also the `reco train` subprocess's below).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

D, K, ROWS = 32, 4, 512
TRAIN = {"batch_size": 32, "epochs": 2, "lr": 3e-3, "warmup_steps": 4, "checkpoint_every": 8,
         "shuffle": True, "log_every": 8}


def synthetic_split(rows: int = ROWS, d: int = D, k: int = K) -> dict[str, np.ndarray]:
    return synthetic.synthetic_split(rows, d, k)


def write_split(workdir: Path, data: dict[str, np.ndarray], shards: int = 2) -> None:
    synthetic.write_split(str(workdir), data, shards)


def config(workdir: Path, **train_cfg) -> RecoConfig:
    return make_config(workdir, neighbors={"k": K}, train={**TRAIN, **train_cfg})


def full_batch_loss(model_dir: Path | None, data: dict[str, np.ndarray]) -> float:
    """The RECO loss of a trained model over the whole split as one batch; with no model
    folder, of the seeded untrained model training starts from."""
    if model_dir is None:
        torch.manual_seed(0)
        model, k = RecoFusion(D, 8, 4.0), K
    else:
        model, meta = load_fusion(str(model_dir))
        k = meta["k"]
    x = {name: torch.tensor(data[name], dtype=torch.float16).float()
         for name in ("image", "text", "nn_text", "nn_image")}
    with torch.no_grad():
        v_ref, t_ref = model(x["image"], x["nn_text"][:, :k], x["text"], x["nn_image"][:, :k])
        return RecoLoss()(x["image"], x["text"], v_ref, t_ref, model.logit_scale).item()


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return synthetic_split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> tuple[Path, dict]:
    """One uninterrupted single-worker run, shared by the tests below."""
    from tests.conftest import start_local_ray

    start_local_ray()
    workdir = tmp_path_factory.mktemp("trained")
    write_split(workdir, data)
    return workdir, train(config(workdir))


def test_training_lowers_the_loss_and_refined_beats_frozen(trained, data):
    workdir, meta = trained
    steps = (ROWS // TRAIN["batch_size"]) * TRAIN["epochs"]
    assert meta["steps"] == steps and meta["k"] == K and meta["retrieval"]
    logdir = workdir / "train" / "logs" / "model"
    loss = scalars(logdir, "train/loss")
    assert [s for s, _ in loss] == list(range(1, steps + 1))
    assert np.mean([v for _, v in loss[-4:]]) < 0.8 * np.mean([v for _, v in loss[:4]])
    frozen = np.mean([v for _, v in scalars(logdir, "train/accuracy/frozen")[-8:]])
    refined = np.mean([v for _, v in scalars(logdir, "train/accuracy/refined")[-8:]])
    assert refined > frozen + 0.1, (frozen, refined)
    assert len(scalars(logdir, "train/temperature")) == steps
    # The saved model is the trained one, with the config that made it.
    assert full_batch_loss(workdir / "train" / "model", data) < 0.8 * full_batch_loss(None, data)
    assert meta["config"]["train"]["lr"] == TRAIN["lr"]


def _epoch_orders(workdir: Path, seed: int, epochs: list[int]) -> list[np.ndarray]:
    """The ids of each epoch's dataset, in the order training reads them (preserve_order)."""
    cfg = make_config(workdir, seed=seed, neighbors={"k": K}, train=TRAIN)
    urls = sorted(str(p) for p in (workdir / "neighbors" / "train").glob("part-*.parquet"))
    datasets = epoch_datasets(cfg, urls, ["id"])
    orders = []
    for epoch in epochs:
        dataset = datasets[dataset_name(epoch, True)]
        dataset.context.execution_options.preserve_order = True
        orders.append(np.concatenate([b["id"] for b in dataset.iter_batches(batch_size=None,
                                                                             batch_format="numpy")]))
    return orders


def test_each_epoch_is_a_seeded_permutation_of_the_whole_split(tmp_path):
    write_split(tmp_path, synthetic_split(rows=256), shards=4)  # ids 64*i .. 64*i+63 in part i
    first, second = _epoch_orders(tmp_path, seed=0, epochs=[0, 1])
    for order in first, second:
        assert sorted(order.tolist()) == list(range(256))  # every row exactly once
    assert (first != second).mean() > 0.9  # each epoch its own order
    batch = first[:TRAIN["batch_size"]]
    assert len(set(batch // 64)) == 4, batch  # the first batch draws on every shard
    assert not (np.diff(first) == 1).all()
    # The same seed and epoch give the same order in another execution (a resumed run).
    again, = _epoch_orders(tmp_path, seed=0, epochs=[1])
    np.testing.assert_array_equal(again, second)


def test_in_memory_epochs_are_seeded_permutations_sliced_by_worker(tmp_path):
    write_split(tmp_path, synthetic_split(rows=256), shards=4)  # ids 64*i .. 64*i+63 in part i
    urls = sorted(str(p) for p in (tmp_path / "neighbors" / "train").glob("part-*.parquet"))
    split = SplitInMemory(urls, ["id", "image_embedding", "text_embedding"], 0, "cross")
    first, second = (split.ids[split.order(epoch, seed=0, shuffle=True).numpy()] for epoch in (0, 1))
    for order in first, second:
        assert sorted(order.tolist()) == list(range(256))  # every row exactly once
    assert (first != second).mean() > 0.9  # each epoch its own order
    assert len(set(first[:32] // 64)) == 4  # the first batch draws on every shard
    np.testing.assert_array_equal(split.ids[split.order(1, seed=0, shuffle=True).numpy()], second)
    assert split.order(0, seed=0, shuffle=False).tolist() == list(range(256))
    # Two workers' slices of a global batch are that batch, whatever the number of workers.
    order = split.order(0, seed=0, shuffle=True)
    halves = [split.worker_rows(order, 3, 32, rank, 2) for rank in (0, 1)]
    np.testing.assert_array_equal(torch.cat(halves), split.worker_rows(order, 3, 32, 0, 1))
    np.testing.assert_array_equal(split.tensors["v"][order[96]].numpy(), split.tensors["v"][halves[0][0]].numpy())


def test_rerun_skips_a_finished_run(trained):
    workdir, meta = trained
    weights = workdir / "train" / "model" / "fusion.pt"
    before = weights.stat().st_mtime_ns
    assert train(config(workdir)) == meta
    assert weights.stat().st_mtime_ns == before


def _checkpoint_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint in a run's Ray Train folder (0: none)."""
    steps = [0]
    for folder in run_dir.glob("checkpoint-*"):
        try:
            steps.append(json.loads((folder / "meta.json").read_text())["step"])
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    return max(steps)


def _train_workers() -> list[int]:
    """This session's Ray Train worker processes."""
    found = []
    for pid in _descendants(os.getpid()):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def _kill_after(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> int:
    """SIGKILL the `reco train` driver once its run has checkpointed `step`; Ray then ends
    the job's controller and workers. Returns the step of the checkpoint left behind, once
    no training worker is left to write another."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and _checkpoint_step(run_dir) < step:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while _train_workers() and time.time() < deadline:
        time.sleep(0.05)
    assert not _train_workers(), "the killed driver's training workers outlived it"
    return _checkpoint_step(run_dir)


def _same_weights(a_dir: Path, b_dir: Path) -> float:
    """The largest absolute difference between two saved models' weights."""
    a, _ = load_fusion(str(a_dir))
    b, _ = load_fusion(str(b_dir))
    assert a.state_dict().keys() == b.state_dict().keys()
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_killed_run_resumes_to_the_same_weights(trained, tmp_path):
    workdir, meta = trained
    write_split(tmp_path, synthetic_split())
    cfg = config(tmp_path, checkpoint_every=6)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # A driver joining this session's Ray (no second cluster to start), in its own process
    # group: killing it is the driver's death; Ray ends its job's actors.
    proc = subprocess.Popen([sys.executable, "-m", "reco.cli", "train", str(cfg_file)],
                            env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = _kill_after(proc, tmp_path / "train" / "ray" / "model", 18)
    # Killed in the second epoch (16 steps each), past its first batches.
    assert 18 <= killed_at < meta["steps"], killed_at
    assert not (tmp_path / "train" / "model").exists()

    resumed = train(cfg)
    assert resumed["steps"] == meta["steps"]
    assert resumed["resumed_from"] and resumed["resumed_from"][-1] <= killed_at, resumed["resumed_from"]
    a, _ = load_fusion(str(workdir / "train" / "model"))
    b, _ = load_fusion(str(tmp_path / "train" / "model"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)


def test_local_mode_trains_the_same_weights_in_this_process(trained, tmp_path):
    """`train.num_workers: 0`: the loop runs in this process (Ray Train's local mode), writes
    its own checkpoints where Ray Train would (the newest two), and ends with the weights of
    the one-worker Ray Train run."""
    workdir, meta = trained
    write_split(tmp_path, synthetic_split())
    local = train(config(tmp_path, num_workers=0))
    assert local["steps"] == meta["steps"] and local["resumed_from"] == []
    assert local["final_metrics"] == meta["final_metrics"]
    assert _same_weights(workdir / "train" / "model", tmp_path / "train" / "model") == 0.0
    run = tmp_path / "train" / "ray" / "model"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-00000024", "checkpoint-00000032"]
    assert all(sorted(p.name for p in folder.iterdir()) == ["meta.json", "state.pt"] for folder in run.iterdir())


def test_local_mode_streams_a_split_in_the_same_batches(tmp_path):
    """A split streamed by Ray Data in local mode (no DataConfig applies there) is read in the
    same batches as from memory: in file order, both end with the same weights."""
    models = {}
    for in_memory_gb in (2.0, 0.0):
        workdir = tmp_path / str(in_memory_gb)
        write_split(workdir, synthetic_split(rows=128))
        train(config(workdir, num_workers=0, shuffle=False, epochs=1, in_memory_gb=in_memory_gb))
        models[in_memory_gb] = workdir / "train" / "model"
    assert _same_weights(models[2.0], models[0.0]) == 0.0


def test_checkpoint_carrying_code_is_refused_and_never_run(tmp_path):
    """A checkpoint's state.pt replaced by a pickle that would run a command: the re-run
    names the checkpoint and stops, and the command never ran."""
    from tests.test_bad_input import _MarkerPayload

    write_split(tmp_path, synthetic_split(rows=64))
    cfg = config(tmp_path, num_workers=0, epochs=1, checkpoint_every=1)
    train(cfg)
    shutil.rmtree(tmp_path / "train" / "model")
    newest = tmp_path / "train" / "ray" / "model" / "checkpoint-00000002"
    marker = tmp_path / "marker"
    torch.save({"model": _MarkerPayload(marker)}, newest / "state.pt")
    with pytest.raises(ConfigError, match=r"checkpoint-00000002: torch.load\(weights_only=True\) refused"):
        train(cfg)
    assert not marker.exists()


def test_killed_local_mode_driver_resumes_to_the_same_weights(trained, tmp_path):
    """A `reco train` in local mode SIGKILLed mid-run leaves complete checkpoints behind; the
    re-run resumes from the newest and ends with the uninterrupted run's weights."""
    workdir, meta = trained
    write_split(tmp_path, synthetic_split())
    cfg = config(tmp_path, num_workers=0, checkpoint_every=6)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "reco.cli", "train", str(cfg_file)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = _kill_after(proc, tmp_path / "train" / "ray" / "model", 18)
    assert 18 <= killed_at < meta["steps"], killed_at
    assert not (tmp_path / "train" / "model").exists()

    resumed = train(cfg)
    assert resumed["steps"] == meta["steps"] and resumed["resumed_from"] == [killed_at]
    assert _same_weights(workdir / "train" / "model", tmp_path / "train" / "model") < 1e-6


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc): our own Ray's processes, not another session's."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_train_workers_after(run_dir: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL this session's Ray Train worker processes once Ray Train has registered a
    checkpoint of the run. (Its controller collects reports every couple of seconds, and
    writes this snapshot of the registered ones: a checkpoint uploaded but not yet
    collected when its worker dies is not resumed from.)"""
    while not stop.is_set() and not (run_dir / "checkpoint_manager_snapshot.json").exists():
        time.sleep(0.005)
    if stop.is_set():
        return
    for pid in _train_workers():
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_lost_worker_is_replaced_and_the_run_heals_to_the_same_weights(trained, tmp_path):
    """A training worker SIGKILLed mid-run: Ray Train starts a new one, which resumes from
    the latest checkpoint; nobody re-runs anything, and the weights are the uninterrupted run's."""
    workdir, meta = trained
    write_split(tmp_path, synthetic_split())
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_train_workers_after,
                              args=(tmp_path / "train" / "ray" / "model", killed, stop), daemon=True)
    killer.start()
    try:
        healed = train(config(tmp_path, max_failures=1))
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray Train worker was found to kill"
    assert healed["steps"] == meta["steps"]
    assert len(healed["resumed_from"]) == 1 and 4 <= healed["resumed_from"][0] < meta["steps"], healed
    diff = _same_weights(workdir / "train" / "model", tmp_path / "train" / "model")
    assert diff == 0.0, diff


@pytest.mark.slow
def test_s3_workdir_checkpoints_and_resumes_there(s3_bucket):
    """Ray Train's storage on S3 (through fsspec): checkpoints land in the bucket, and a
    re-run finds the run there and resumes from its last checkpoint."""
    import fsspec

    workdir = f"{s3_bucket}/train-resume"
    synthetic.write_split(workdir, synthetic_split(rows=128), 2)
    cfg = make_config(workdir, neighbors={"k": K}, train={**TRAIN, "epochs": 1, "checkpoint_every": 2})
    first = train(cfg)
    assert first["steps"] == 4 and first["resumed_from"] == []
    fs = fsspec.filesystem("s3")
    run = f"{workdir}/train/ray/model"
    fs.invalidate_cache()
    assert {p.rsplit("/", 1)[1] for p in fs.ls(run)} >= {"checkpoint-00000002", "checkpoint-00000004"}
    assert fs.exists(f"{run}/checkpoint-00000004/state.pt")
    fs.rm(f"{workdir}/train/model", recursive=True)
    again = train(cfg)  # the model is gone, the checkpoint of the last step is not
    assert again["steps"] == 4 and again["resumed_from"] == [4]
    assert again["final_metrics"] == first["final_metrics"]


def test_two_workers_match_one(trained, data, tmp_path):
    workdir, meta = trained
    write_split(tmp_path, data)
    two = train(config(tmp_path, num_workers=2, cpus_per_worker=0.5))
    assert two["steps"] == meta["steps"]
    one_loss = full_batch_loss(workdir / "train" / "model", data)
    two_loss = full_batch_loss(tmp_path / "train" / "model", data)
    assert abs(one_loss - two_loss) < 0.05 * one_loss, (one_loss, two_loss)


def test_no_retrieval_control(tmp_path, data):
    write_split(tmp_path, data)
    meta = train(config(tmp_path, retrieval=False, epochs=1))
    assert meta["k"] == 0 and not meta["retrieval"]
    assert (tmp_path / "train" / "model-noretrieval" / "fusion.pt").exists()
    assert not (tmp_path / "train" / "model").exists()


@pytest.mark.parametrize("in_memory_gb", [2.0, 0.0], ids=["in-memory", "streamed"])
def test_nan_loss_stops_with_step_and_batch_and_keeps_the_checkpoint(tmp_path, data, in_memory_gb):
    bad = {name: x.copy() for name, x in data.items()}
    bad["image"][150] = np.nan  # in the 5th batch of the first epoch (file order)
    write_split(tmp_path, bad)
    with pytest.raises(NonFiniteLossError, match=r"at step 5 \(epoch 0, batch 4, query ids \[128"):
        train(config(tmp_path, shuffle=False, checkpoint_every=1, epochs=1, in_memory_gb=in_memory_gb))
    assert _checkpoint_step(tmp_path / "train" / "ray" / "model") == 4
    assert not (tmp_path / "train" / "model").exists()


def test_checkpoint_from_other_settings_is_refused(trained, tmp_path):
    workdir, _ = trained
    shutil.copytree(workdir / "neighbors", tmp_path / "neighbors")
    shutil.copytree(workdir / "train" / "ray", tmp_path / "train" / "ray")
    with pytest.raises(ConfigError, match=r"lr differ: lr=0.003 there, 0.01 now"):
        train(config(tmp_path, lr=0.01))
    with pytest.raises(ConfigError, match="trained with other settings"):
        train(config(workdir, lr=0.01))


@pytest.mark.parametrize("case, message", [
    ("missing", "no finished neighbour split"),
    ("empty", "is empty"),
    ("width", "width 16"),
    ("k", "built with k=4, the config says 10"),
    ("batch", "larger than the split"),
    ("local-gpu", "no CUDA device in this process"),
])
def test_bad_input_is_a_clear_error(tmp_path, case, message):
    cfg = config(tmp_path)
    if case == "empty":
        NeighborsManifest(split="train", input="memory", model="m", pretrained=None, d=D, k=K,
                          dtype="float16", dedup_threshold=0.95).write(str(tmp_path / "neighbors" / "train"))
    elif case == "width":
        write_split(tmp_path, synthetic_split(rows=64))
        small = synthetic_split(rows=32, d=16)
        table = neighbors_table(small["ids"], ["x"] * 32, small["image"], small["text"], small["nn_text_ids"],
                                small["nn_text"], small["nn_image_ids"], small["nn_image"])
        pq.write_table(table, tmp_path / "neighbors" / "train" / "part-00001.parquet")
    elif case == "k":
        write_split(tmp_path, synthetic_split(rows=64))
        cfg = make_config(tmp_path, train=TRAIN)
    elif case == "batch":
        write_split(tmp_path, synthetic_split(rows=16))
    elif case == "local-gpu":
        if torch.cuda.is_available():
            pytest.skip("the error is for a machine without a GPU")
        write_split(tmp_path, synthetic_split(rows=64))
        cfg = config(tmp_path, num_workers=0, use_gpu=True)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
