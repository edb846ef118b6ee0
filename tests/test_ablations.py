"""The paper's ablations as config, on the training side: what each `train.fuse` feeds the
fusion modules, the parameter-free mean, and the keys' place in the fingerprints. (The
search side, `neighbors.search` and the shards' extra columns, is in test_neighbors.py.)
And evaluate's refusal of a no-retrieval control from another run. None of these start Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reco.config import ConfigError, RecoConfig
from evaluation.evaluate import check_variants, memory_subset_exclusion
from reco.contracts import NeighborsManifest, fusion_model_dir, neighbors_table
from reco.demo import neighbour_splits as synthetic
from reco.fusion import RecoFusion, load_fusion, refine, save_fusion
from tests.conftest import make_config
from training.loop import batch_tensors
from training.train import make_plan, train

D, K, ROWS = 32, 4, 64


def config(workdir: Path, **train_cfg) -> RecoConfig:
    return make_config(workdir, neighbors={"k": K}, train={"batch_size": 16, **train_cfg})


@pytest.fixture
def split() -> dict[str, np.ndarray]:
    """A synthetic split where the last two neighbours of every fourth query are missing."""
    data = synthetic.synthetic_split(ROWS, D, K)
    for ids, tokens in (("nn_text_ids", "nn_text"), ("nn_image_ids", "nn_image")):
        data[ids][::4, 2:] = -1
        data[tokens][::4, 2:] = 0
    return data


def test_batch_tensors_pick_the_tokens_of_fuse_and_mark_missing_slots(split):
    rng = np.random.default_rng(1)
    uni = (rng.standard_normal((ROWS, K, D)).astype(np.float32), rng.standard_normal((ROWS, K, D)).astype(np.float32))
    table = neighbors_table(split["ids"], ["x"] * ROWS, split["image"], split["text"], split["nn_text_ids"],
                            split["nn_text"], split["nn_image_ids"], split["nn_image"], "float32", uni)
    cpu = torch.device("cpu")
    cross, same = batch_tensors(table, K, "cross", cpu), batch_tensors(table, K, "uni", cpu)
    np.testing.assert_array_equal(cross["v_tokens"].numpy(), split["nn_text"])
    np.testing.assert_array_equal(cross["t_tokens"].numpy(), split["nn_image"])
    np.testing.assert_array_equal(same["v_tokens"].numpy(), uni[0])  # the image neighbours' images
    np.testing.assert_array_equal(same["t_tokens"].numpy(), uni[1])
    for x in (cross, same):
        np.testing.assert_array_equal(x["v_missing"].numpy(), split["nn_text_ids"] < 0)
        np.testing.assert_array_equal(x["t_missing"].numpy(), split["nn_image_ids"] < 0)
    assert cross["v_missing"].sum() == ROWS // 4 * 2
    assert batch_tensors(table, 0, "cross", cpu)["v_tokens"].shape == (ROWS, 0, D)


def test_fuse_mean_trains_nothing_and_refines_to_the_mean_of_the_neighbours(tmp_path, split):
    synthetic.write_split(str(tmp_path), split)
    meta = train(config(tmp_path, fuse="mean"))
    assert meta["fuse"] == "mean" and meta["steps"] == 0
    model, _ = load_fusion(str(tmp_path / "train" / "model-mean"))  # a variant: beside RECO's model
    assert model.fuse == "mean" and model.search == "uni"
    got = refine(model.image, split["image"], split["nn_text"], split["nn_text_ids"])
    present = split["nn_text_ids"] >= 0
    mean = (split["nn_text"] * present[..., None]).sum(1) / present.sum(1, keepdims=True)
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    assert train(config(tmp_path, fuse="mean")) == meta  # finished: skipped


@pytest.mark.parametrize("train_cfg, message", [
    ({"fuse": "uni"}, "lacks; re-run `reco neighbors` with train.fuse=uni"),
    ({"fuse": "mean", "retrieval": False}, "with train.retrieval=false there are none"),
])
def test_ablation_needs_what_it_fuses(tmp_path, split, train_cfg, message):
    synthetic.write_split(str(tmp_path), split)
    with pytest.raises(ConfigError, match=message):
        train(config(tmp_path, **train_cfg))


def test_search_and_fuse_enter_the_training_fingerprint(tmp_path):
    manifest = NeighborsManifest(split="train", input="memory", model="m", pretrained=None, d=D, k=K,
                                 dtype="float16", dedup_threshold=0.95, total_rows=ROWS)
    plain = make_plan(config(tmp_path), manifest, [])
    assert plain.neighbors["search"] == "uni" and plain.fingerprint["fuse"] == "cross"
    uni = make_plan(config(tmp_path, fuse="uni"), manifest, [])
    cross = make_plan(config(tmp_path), manifest.model_copy(update={"search": "cross"}), [])
    assert len({str(p.fingerprint) for p in (plain, uni, cross)}) == 3


def test_evaluate_refuses_a_control_from_another_run(tmp_path):
    """The no-retrieval column may differ from RECO in k, retrieval, fuse and search only."""
    cfg = config(tmp_path)
    fingerprint = {"split": "train", "k": K, "search": "uni", "rows": ROWS, "lr": 1e-3, "fuse": "cross",
                   "retrieval": True}
    base = {"d": D, "heads": 8, "mlp_ratio": 4.0}
    save_fusion(RecoFusion(D), {**base, "fingerprint": fingerprint}, fusion_model_dir(str(tmp_path)))
    control = {**fingerprint, "k": 0, "retrieval": False, "search": "cross", "fuse": "uni"}
    control_dir = fusion_model_dir(str(tmp_path), "no_retrieval")
    save_fusion(RecoFusion(D), {**base, "fingerprint": control}, control_dir)
    check_variants(cfg)
    for other in ({"split": "other"}, {"lr": 1e-2}):
        save_fusion(RecoFusion(D), {**base, "fingerprint": {**control, **other}}, control_dir)
        key, value = next(iter(other.items()))
        with pytest.raises(ConfigError, match=f"{key}={value!r} there"):
            check_variants(cfg)



def test_memory_size_ablation_keeps_a_seeded_share_of_the_memory():
    keys = np.array([f"{i:08d}" for i in range(10_000)], dtype=object)
    left_out = memory_subset_exclusion(keys, 0.1, seed=0)
    assert 900 < 10_000 - len(left_out) < 1100 and np.all(np.diff(left_out) > 0)
    np.testing.assert_array_equal(left_out, memory_subset_exclusion(keys, 0.1, seed=0))
    assert not np.array_equal(left_out, memory_subset_exclusion(keys, 0.1, seed=1))
    # Another run's memory holds the same pairs under other ids: the same pairs are kept.
    shuffled = np.random.default_rng(7).permutation(keys)
    assert set(shuffled[memory_subset_exclusion(shuffled, 0.1, seed=0)]) == set(keys[left_out])
