"""The demo's small world: disjoint splits, held-out classes only in memory and evaluation."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import torch

from reco.config import ModelConfig
from reco.demo import synthetic, world
from reco.demo.pretrain import pretrain_frozen_clip
from reco.models import load_clip


def labels_of(shards: list[str]) -> set[int]:
    out = set()
    for url in shards:
        with tarfile.open(url) as tar:
            out |= {json.load(tar.extractfile(m))["label"] for m in tar if m.name.endswith(".json")}
    return out


def test_splits_hold_out_classes_from_fusion_training(tmp_path):
    held = world.held_out_classes()
    assert len(held) == world.N_HELD_OUT == 18 and held == world.held_out_classes()
    assert set(held).isdisjoint(world.fusion_classes())
    assert len(world.fusion_classes()) == 54

    memory = world.write_memory_corpus(str(tmp_path / "memory"), n=144, shard_size=100)
    fusion = world.write_fusion_pairs(str(tmp_path / "fusion"), n=108, shard_size=100)
    assert labels_of(memory) == set(range(72))
    assert labels_of(fusion) == set(world.fusion_classes())

    root = tmp_path / "eval"
    world.write_eval_imagefolder(str(root), per_class=2)
    names = {synthetic.classes()[i].name for i in held}
    assert {p.name for p in root.iterdir()} == names
    assert all(len(list(p.iterdir())) == 2 for p in root.iterdir())
    assert world.eval_dataset(str(root))["templates"] == world.EVAL_TEMPLATES


def test_evaluation_prompts_are_not_memory_captions():
    """Text->text search over the memory must not find the prompt itself, word for word."""
    classes = synthetic.classes()
    captions = {t.format(name=c.name, shape=c.shape)
                for c in classes for t in synthetic.FINE_TEMPLATES + synthetic.COARSE_TEMPLATES}
    assert len(captions) == 72 * 6 + 4 * 6  # every caption the memory (and pre-training) can hold
    prompts = {t.format(c=c.name) for c in classes for t in world.eval_dataset("x")["templates"]}
    assert len(prompts) == 72 * len(world.EVAL_TEMPLATES)
    assert not prompts & captions, sorted(prompts & captions)[:5]


def test_pretrained_checkpoint_loads_as_the_frozen_clip(tmp_path):
    out = tmp_path / "frozen.pt"
    stats = pretrain_frozen_clip(str(out), n_images=64, steps=3, batch_size=16)
    assert stats["steps"] == 3 and np.isfinite(stats["final_loss"])
    clip = load_clip(ModelConfig(name="reco-tiny", pretrained=str(out)))
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert torch.equal(clip.model.state_dict()["logit_scale"], saved["logit_scale"])
    assert not any(p.requires_grad for p in clip.model.parameters())  # frozen
