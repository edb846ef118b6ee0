"""The demo's small world: a fine-grained zero-shot task that only a memory can solve.

72 synthetic classes (reco/demo/synthetic.py), each with an invented name. Four disjoint
splits, each drawn with its own seed:

- pre-training (coarse captions, all classes): `reco.demo.pretrain.pretrain_frozen_clip`
  trains reco-tiny briefly on "a photo of a triangle"-style captions and saves a
  checkpoint. THIS IS THE DEMO'S STAND-IN FOR DOWNLOADING PRETRAINED CLIP WEIGHTS (no
  downloads here): like CLIP on Stanford Cars, the frozen model knows the concept but
  not the fine class.
- memory (fine captions, all 72 classes): the only place the invented names occur;
- fusion training pairs (fine captions, 54 classes): phi_image/phi_text learn to *use*
  retrieved pairs, never seeing the 18 held-out classes;
- evaluation (an ImageFolder of the 18 held-out classes): zero-shot on classes whose
  names exist only in the memory's captions. The frozen CLIP is near chance (1/18).
"""

from __future__ import annotations

import random
from pathlib import Path

from reco.demo import synthetic

N_CLASSES = 72
N_HELD_OUT = 18
SPLIT_SEEDS = {"pretrain": 101, "memory": 202, "fusion": 303, "eval": 404, "held_out": 505}
EVAL_TEMPLATES = ["a rendering of a {c}.", "a bright photo of a {c}.", "a close-up photo of a {c}.",
                  "a cropped photo of the {c}.", "a good photo of the {c}."]
"""Prompts from CLIP's ImageNet templates (clip_benchmark's `{c}` form), none of them a
memory caption template (synthetic.FINE_TEMPLATES): a benchmark's prompts are not web
captions, and a prompt the memory holds word for word would make text->text search
return the prompt itself (tests/test_demo_world.py checks that none is a memory caption)."""


DEDUP_THRESHOLD = 0.999
"""The demo's `neighbors.dedup_threshold`. The briefly pre-trained reco-tiny maps distinct
images of one class within cosine 0.99 of each other (median best match 0.997), so the
0.95 calibrated for real CLIP would count the whole memory as copies of the test images
(measured: all 7,200 pairs excluded); at 0.999 only 13 are."""


def held_out_classes(seed: int = SPLIT_SEEDS["held_out"]) -> list[int]:
    """The 18 class ids never seen in fusion training (a seeded draw, sorted)."""
    return sorted(random.Random(seed).sample(range(N_CLASSES), N_HELD_OUT))


def fusion_classes() -> list[int]:
    held = set(held_out_classes())
    return [i for i in range(N_CLASSES) if i not in held]


# -- the data -------------------------------------------------------------------------------

def write_memory_corpus(out_dir: str, n: int = 7200, shard_size: int = 1000) -> list[str]:
    """The memory's corpus: all 72 classes, fine captions (the names live only here)."""
    return synthetic.write_webdataset(
        synthetic.make_samples(n, seed=SPLIT_SEEDS["memory"], granularity="fine", key_prefix="mem"),
        out_dir, shard_size)


def write_fusion_pairs(out_dir: str, n: int = 5400, shard_size: int = 1000) -> list[str]:
    """Fusion-training pairs: the 54 classes not held out, fine captions."""
    return synthetic.write_webdataset(
        synthetic.make_samples(n, seed=SPLIT_SEEDS["fusion"], class_ids=fusion_classes(),
                               granularity="fine", key_prefix="fus"),
        out_dir, shard_size)


def write_eval_imagefolder(out_dir: str, per_class: int = 50) -> str:
    """An ImageFolder of the 18 held-out classes, one folder per invented name."""
    classes = synthetic.classes()
    held = held_out_classes()
    root = Path(out_dir)
    for s in synthetic.make_samples(per_class * len(held), seed=SPLIT_SEEDS["eval"], class_ids=held,
                                    granularity="fine", key_prefix="ev"):
        folder = root / classes[s.label].name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{s.key}.jpg").write_bytes(s.jpeg)
    return str(root)


def eval_dataset(path: str) -> dict:
    """The `evaluate.datasets` entry for the held-out ImageFolder."""
    return {"name": "held-out-fine", "kind": "imagefolder", "path": path,
            "task": "classification", "templates": EVAL_TEMPLATES}


def config_sections(workdir: str, checkpoint: str) -> dict:
    """The demo world's config: the pre-trained checkpoint as the frozen CLIP, neighbours
    of the fusion pairs (`<workdir>/fusion-pairs`, embedded apart from the memory), and
    the held-out ImageFolder (`<workdir>/eval-images`) as the evaluation set."""
    return {"model": {"name": "reco-tiny", "pretrained": checkpoint},
            "index": {"key": "Flat"},
            "neighbors": {"k": 10, "dedup_threshold": DEDUP_THRESHOLD, "input": f"{workdir}/fusion-pairs"},
            "train": {"batch_size": 256, "epochs": 20, "warmup_steps": 20},
            "evaluate": {"datasets": [eval_dataset(f"{workdir}/eval-images")]}}
