"""The demo's synthetic data: drawn image-text pairs of fine-grained classes, and clustered embeddings.

72 classes = 4 shapes x 6 colours x 3 fills, each with an invented proper name (like
a car model or a bird species). Captions come at two granularities:

- coarse: the generic concept only ("a photo of a triangle");
- fine: the class's own name ("a photo of a ronlo"), never its attributes.

A CLIP pre-trained on coarse captions knows the concept but not the class: the name
can only be learned from data, which is what a retrieval memory holds.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reco import tars

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (205, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200),
    "yellow": (225, 200, 30), "purple": (140, 50, 170), "orange": (235, 130, 20),
}
FILLS = ("solid", "striped", "dotted")

COARSE_TEMPLATES = ("a photo of a {shape}.", "a {shape}.", "a picture of a {shape}.",
                    "an image of a {shape}.", "a drawing of a {shape}.", "a small {shape}.")
FINE_TEMPLATES = ("a photo of a {name}.", "a {name}.", "a picture of a {name}.",
                  "an image of a {name}.", "my {name}.", "a photo of a {name}, a type of {shape}.")

Granularity = Literal["fine", "coarse"]


@dataclass(frozen=True)
class SyntheticClass:
    index: int
    shape: str
    colour: str
    fill: str
    name: str


@dataclass(frozen=True)
class Sample:
    key: str
    jpeg: bytes
    caption: str
    label: int


def _invented_names(n: int, seed: int = 7) -> list[str]:
    """n distinct pronounceable words of two or three syllables, e.g. 'ronlo'."""
    rng = random.Random(seed)
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "", "n", "l", "r", "s"]
    names: list[str] = []
    while len(names) < n:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(rng.choice((2, 2, 3))))
        if word not in names and not any(word in s for s in (*SHAPES, *COLOURS, *FILLS)):
            names.append(word)
    return names


def classes() -> list[SyntheticClass]:
    combos = [(s, c, f) for s in SHAPES for c in COLOURS for f in FILLS]
    names = _invented_names(len(combos))
    return [SyntheticClass(i, s, c, f, names[i]) for i, (s, c, f) in enumerate(combos)]


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a in corners]
    if shape == "triangle":
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    # star: 5 outer and 5 inner vertices
    return [(cx + (r if k % 2 == 0 else r * 0.45) * math.cos(angle - math.pi / 2 + k * math.pi / 5),
             cy + (r if k % 2 == 0 else r * 0.45) * math.sin(angle - math.pi / 2 + k * math.pi / 5))
            for k in range(10)]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)


def draw(cls: SyntheticClass, rng: random.Random, size: int = 64) -> Image.Image:
    """One image of `cls`: position, scale, rotation, shades and background vary."""
    bg = _jitter((225, 225, 220), rng, 25)
    img = Image.new("RGB", (size, size), bg)
    colour = _jitter(COLOURS[cls.colour], rng, 18)
    pattern = Image.new("RGB", (size, size), colour)
    pd = ImageDraw.Draw(pattern)
    light = tuple(min(255, v + 150) for v in colour)
    if cls.fill == "striped":
        step, tilt = max(3, size // 10), rng.uniform(-1, 1) * size
        for x in range(-size, 2 * size, step * 2):
            pd.polygon([(x, 0), (x + step, 0), (x + step + tilt, size), (x + tilt, size)], fill=light)
    elif cls.fill == "dotted":
        step = max(4, size // 8)
        off = rng.randint(0, step)
        dot = max(1, step // 4)
        for y in range(off - step, size, step):
            for x in range(off - step, size, step):
                pd.ellipse([x - dot, y - dot, x + dot, y + dot], fill=light)
    mask = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(mask)
    r = size * rng.uniform(0.28, 0.4)
    cx, cy = (size / 2 + rng.uniform(-0.12, 0.12) * size for _ in range(2))
    if cls.shape == "circle":
        md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        md.polygon(_shape_points(cls.shape, cx, cy, r, rng.uniform(-0.4, 0.4)), fill=255)
    img.paste(pattern, (0, 0), mask)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))


def caption(cls: SyntheticClass, rng: random.Random, granularity: Granularity) -> str:
    templates = FINE_TEMPLATES if granularity == "fine" else COARSE_TEMPLATES
    return rng.choice(templates).format(shape=cls.shape, name=cls.name)


def make_samples(n: int, *, seed: int = 0, class_ids: Iterable[int] | None = None,
                 granularity: Granularity = "fine", image_size: int = 64,
                 key_prefix: str = "") -> Iterator[Sample]:
    """n samples cycling over `class_ids` (default all 72); deterministic in `seed`."""
    all_classes = classes()
    pool = [all_classes[i] for i in (class_ids if class_ids is not None else range(len(all_classes)))]
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        cls = pool[i % len(pool)]
        buf = io.BytesIO()
        draw(cls, rng, image_size).save(buf, format="JPEG", quality=90)
        yield Sample(f"{key_prefix}{i:09d}", buf.getvalue(), caption(cls, rng, granularity), cls.index)


def sample_meta(s: Sample) -> dict:
    """The .json written with a sample, as img2dataset writes it (status success)."""
    return {"key": s.key, "caption": s.caption, "url": f"synthetic://{s.key}",
            "label": s.label, "status": "success"}


def write_webdataset(samples: Iterable[Sample], out_dir: str, samples_per_shard: int = 1000) -> list[str]:
    """img2dataset-style shards `{out_dir}/{i:05d}.tar`, each sample `.jpg` `.txt` `.json`."""
    return tars.write_shards((tars.TarRecord(s.key, s.jpeg, s.caption, sample_meta(s)) for s in samples),
                             out_dir, samples_per_shard)


def clustered_embeddings(n: int, d: int, seed: int, clusters: int = 40, spread: float = 0.35,
                         text_spread: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embedding-like (image, text) pairs: unit vectors around shared class centres, each
    text near its image (default `spread / 2` away). For index and neighbour tests and
    benchmarks, where real CLIP embeddings would cost a model."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((clusters, d))
    image = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))
    text = image + (spread / 2 if text_spread is None else text_spread) * rng.standard_normal((n, d))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(image), unit(text)
