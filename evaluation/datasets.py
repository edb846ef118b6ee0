"""Evaluation sets: checked up front, then written once as webdataset shards.

Whatever the source (an ImageFolder, webdataset shards, a clip_benchmark dataset), an
evaluation set becomes shards the embed stage reads, plus `samples.parquet` (key,
label, captions) and `dataset.json` (class names, templates), written last: its
presence means the set is ready, so a re-run neither rewrites nor re-downloads it.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from reco import storage
from reco.config import ConfigError, EvalDataset, RecoConfig
from reco.tars import TarRecord, TruncatedShard, iter_tar_samples, list_shards, write_shards

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.parquet"
DATASET_FILE = "dataset.json"
SHARD_SIZE = 1000
DEFAULT_TEMPLATE_SET = "imagenet1k"
CLIP_BENCHMARK_PREFIXES = ("tfds/", "vtab/", "wds/")


@dataclass
class EvalSet:
    """A prepared evaluation set: its shards and what each sample is."""
    name: str
    task: str
    shards: list[str]
    keys: list[str]
    labels: np.ndarray
    """(n,) int64 class index per sample (classification); -1 for retrieval."""
    captions: list[list[str]]
    """Per sample, its captions (retrieval); the class name (classification)."""
    classnames: list[str]
    templates: list[str]


def dataset_dir(cfg: RecoConfig, name: str) -> str:
    """`<workdir>/eval/<name>`, the name made safe for a folder (`vtab/cub` -> `vtab_cub`)."""
    return cfg.path("eval", re.sub(r"[^A-Za-z0-9_.-]+", "_", name))


def _where(spec: EvalDataset) -> str:
    return f"evaluate.datasets[{spec.name}]"


@functools.cache
def clip_benchmark_names() -> frozenset[str]:
    """The dataset names clip_benchmark's `build_dataset` accepts.

    clip_benchmark has no list of them, only an if/elif chain; reading the names from its
    source keeps this in step with the installed version without downloading anything.
    """
    from clip_benchmark.datasets import builder

    source = inspect.getsource(builder.build_dataset)
    return frozenset(re.findall(r'dataset_name == ["\']([^"\']+)["\']', source))


def is_clip_benchmark_name(name: str) -> bool:
    return name in clip_benchmark_names() or (
        name.startswith(CLIP_BENCHMARK_PREFIXES) and len(name.split("/", 1)[1]) > 0)


@functools.cache
def bundled_templates() -> dict[str, list[str]]:
    """clip_benchmark's English prompt templates by dataset name (`{c}` = class name)."""
    from clip_benchmark.datasets import builder

    with fsspec.open(storage.join(builder.__file__.rsplit("/", 1)[0],
                                  "en_zeroshot_classification_templates.json")) as f:
        return json.load(f)


def _resolve_templates(spec: EvalDataset) -> list[str] | None:
    """The configured templates, clip_benchmark's for the name, or None (the dataset's own)."""
    t = spec.templates
    if isinstance(t, list):
        if not t or any("{c}" not in x for x in t):
            raise ConfigError(f"{_where(spec)}.templates: every template needs {{c}} for the class "
                              "name, e.g. 'a photo of a {c}.'")
        return t
    if isinstance(t, str):
        if t not in bundled_templates():
            raise ConfigError(f"{_where(spec)}.templates: {t!r} is not a clip_benchmark template set; "
                              f"use one of {sorted(bundled_templates())} or a list of templates")
        return bundled_templates()[t]
    short = spec.name.split("/", 1)[-1]
    for name in (spec.name, short):
        if name in bundled_templates():
            return bundled_templates()[name]
    return None if spec.kind == "clip_benchmark" else bundled_templates()[DEFAULT_TEMPLATE_SET]


def _read_classnames_file(spec: EvalDataset, url: str) -> list[str] | dict[str, str]:
    if not storage.exists(url):
        raise ConfigError(f"{_where(spec)}.classnames: file {url} does not exist")
    with fsspec.open(url, "r") as f:
        text = f.read()
    if url.endswith(".json"):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{_where(spec)}.classnames: {url} is not valid JSON ({err})") from None
        if isinstance(names, dict) and spec.name in names and isinstance(names[spec.name], list):
            names = names[spec.name]  # clip_benchmark's layout: {dataset: [names]}
        if not _are_names(names):
            raise ConfigError(f"{_where(spec)}.classnames: {url} holds {type(names).__name__} {str(names)[:60]}; "
                              "expected a list of strings, or a mapping folder -> name of strings")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def _are_names(names: object) -> bool:
    """A list of class names, or a mapping of strings to names."""
    if isinstance(names, dict):
        return all(isinstance(k, str) and isinstance(v, str) for k, v in names.items())
    return isinstance(names, list) and all(isinstance(n, str) for n in names)


def _class_folders(spec: EvalDataset) -> dict[str, list[str]]:
    """ImageFolder class folder name -> its image files (URLs), both sorted as torchvision does."""
    fs, root = storage.filesystem(spec.path)
    if not fs.isdir(root):
        raise ConfigError(f"{_where(spec)}.path: {spec.path} is not a folder")
    folders = sorted(e["name"] for e in fs.ls(root, detail=True) if e["type"] == "directory")
    if not folders:
        raise ConfigError(f"{_where(spec)}.path: {spec.path} has no class sub-folders "
                          "(expected <path>/<class>/<image>.jpg)")
    out: dict[str, list[str]] = {}
    for folder in folders:
        files = sorted(e["name"] for e in fs.ls(folder, detail=True)
                       if e["type"] == "file" and e["name"].lower().endswith(IMG_EXTENSIONS))
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        if not files:
            raise ConfigError(f"{_where(spec)}.path: class folder {name!r} holds no images "
                              f"({', '.join(IMG_EXTENSIONS)}); remove it or add images")
        out[name] = [storage.full_url(fs, p) for p in files]
    return out


def _imagefolder_classnames(spec: EvalDataset, folders: list[str]) -> list[str]:
    names = spec.classnames
    if isinstance(names, str):
        names = _read_classnames_file(spec, names)
    if names is None:
        return folders
    if isinstance(names, dict):
        missing = [f for f in folders if f not in names]
        unknown = [k for k in names if k not in folders]
        if missing or unknown:
            raise ConfigError(f"{_where(spec)}.classnames: the mapping does not match the class "
                              f"folders: folders without a name {missing[:5]}, names without a "
                              f"folder {unknown[:5]}")
        return [names[f] for f in folders]
    if len(names) != len(folders):
        raise ConfigError(f"{_where(spec)}.classnames: {len(names)} names for {len(folders)} class "
                          f"folders ({', '.join(folders[:5])}...); give one per folder in sorted "
                          "order, or a mapping folder -> name")
    return list(names)


def _explicit_classnames(spec: EvalDataset) -> list[str] | None:
    names = spec.classnames
    if isinstance(names, str):
        names = _read_classnames_file(spec, names)
    if isinstance(names, dict):
        raise ConfigError(f"{_where(spec)}.classnames: a mapping folder -> name is only for "
                          "kind imagefolder; give a list in label order")
    return names


def check_dataset(spec: EvalDataset) -> None:
    """Everything about one dataset that can be checked without reading its images."""
    if spec.kind == "clip_benchmark":
        if not is_clip_benchmark_name(spec.name):
            close = [n for n in sorted(clip_benchmark_names()) if n[:3] == spec.name[:3]]
            raise ConfigError(f"{_where(spec)}.name: {spec.name!r} is not a clip_benchmark dataset"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + "; see clip_benchmark's builder, or use kind imagefolder/webdataset")
    elif spec.path is None:
        raise ConfigError(f"{_where(spec)}.path: required for kind {spec.kind}")
    elif not storage.exists(spec.path) and spec.kind == "imagefolder":
        raise ConfigError(f"{_where(spec)}.path: {spec.path} does not exist")
    if spec.task == "retrieval" and spec.kind == "imagefolder":
        raise ConfigError(f"{_where(spec)}.task: retrieval needs captions; an ImageFolder has only "
                          "class labels (use kind webdataset with .txt captions)")
    if spec.task == "classification":
        _resolve_templates(spec)
    if spec.kind == "imagefolder":
        _imagefolder_classnames(spec, list(_class_folders(spec)))
    elif spec.kind == "webdataset":
        list_shards(spec.path, key=f"{_where(spec)}.path")
        if spec.task == "classification" and _explicit_classnames(spec) is None:
            raise ConfigError(f"{_where(spec)}.classnames: required for webdataset "
                              "classification (a list in label order, or a .txt/.json file)")


# -- writing a set as shards -------------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")  # lossless: the pixels clip_benchmark would see
    return buf.getvalue()


def _write_shards(records: Iterable[tuple[str, bytes, str, int]], out_dir: str) -> list[str]:
    """(key, image file bytes, caption, label) -> img2dataset-style shards.

    The image goes in as the file's own bytes (no re-encoding, so the embed stage decodes
    exactly what torchvision's ImageFolder would); the member is named `.jpg` whatever the
    format, which is harmless because PIL decodes by content, not by name.
    """
    tar_records = (TarRecord(key, image, caption, {"key": key, "caption": caption, "url": f"synthetic://{key}",
                                                   "label": label, "status": "success"})
                   for key, image, caption, label in records)
    return write_shards(tar_records, out_dir, SHARD_SIZE)


def _imagefolder_records(spec: EvalDataset, classnames: list[str], table: dict
                         ) -> Iterator[tuple[str, bytes, str, int]]:
    for label, (folder, files) in enumerate(_class_folders(spec).items()):
        for i, url in enumerate(files):
            with fsspec.open(url, "rb") as f:
                data = f.read()
            key = f"{label:05d}_{i:06d}"
            table["key"].append(key)
            table["label"].append(label)
            table["captions"].append([classnames[label]])
            yield key, data, classnames[label], label


def clean_classname(name: str) -> str:
    """A class name as a prompt should read it, as CLIP's own class lists are written: some
    clip_benchmark sets (`vtab/cub`, from TFDS) name classes by their folder, e.g.
    `001.Black_footed_Albatross` -> `Black footed Albatross`. Clean names pass unchanged."""
    return " ".join(re.sub(r"^\s*\d+\.", "", name).replace("_", " ").split())


def _clip_benchmark_dataset(cfg: RecoConfig, spec: EvalDataset):
    from clip_benchmark.datasets.builder import build_dataset

    root = spec.path or cfg.path("eval", "_downloads")
    task = "zeroshot_classification" if spec.task == "classification" else "zeroshot_retrieval"
    log.info("%s: building with clip_benchmark (downloads into %s if absent)", spec.name, root)
    return build_dataset(spec.name, root=root, transform=None, split=spec.split, download=True,
                         task=task)


def _clip_benchmark_records(ds, spec: EvalDataset, classnames: list[str], table: dict
                            ) -> Iterator[tuple[str, bytes, str, int]]:
    for i in range(len(ds)):
        image, target = ds[i]
        key = f"{i:09d}"
        if spec.task == "retrieval":
            captions, label = [str(c) for c in target], -1
        else:
            label = int(target)
            captions = [classnames[label]]
        table["key"].append(key)
        table["label"].append(label)
        table["captions"].append(captions)
        yield key, _png(image), captions[0], label


def _scan_webdataset(spec: EvalDataset, shards: list[str], classnames: list[str] | None, table: dict) -> None:
    """Keys, labels and captions of existing shards (the images stay where they are)."""
    for url in shards:
        try:
            for sample in iter_tar_samples(url):
                meta = sample.meta
                if spec.task == "classification":
                    label = meta.get("label", sample.files.get("cls", b"").decode() or None)
                    if label is None or not 0 <= int(label) < len(classnames):
                        raise ConfigError(
                            f"{_where(spec)}: sample {sample.key} in {url} has label {label!r}; "
                            f"expected an int in 0..{len(classnames) - 1} in its .json 'label' or .cls")
                    captions = [classnames[int(label)]]
                else:
                    label = -1
                    extra = meta.get("captions")
                    captions = [str(c) for c in extra] if isinstance(extra, list) and extra else [sample.caption or ""]
                table["key"].append(sample.key)
                table["label"].append(int(label))
                table["captions"].append(captions)
        except TruncatedShard as err:
            log.warning("%s: %s; the samples before it are evaluated", url, err)


def prepare_dataset(cfg: RecoConfig, spec: EvalDataset) -> EvalSet:
    """The set as shards + samples.parquet + dataset.json (written once, then reused)."""
    out = dataset_dir(cfg, spec.name)
    info_url = storage.join(out, DATASET_FILE)
    if not storage.exists(info_url):
        _materialise(cfg, spec, out)
    info = storage.read_json(info_url)
    table = storage.read_parquet(storage.join(out, SAMPLES_FILE))
    return EvalSet(name=spec.name, task=spec.task, shards=info["shards"],
                   keys=table["key"].to_pylist(), labels=table["label"].to_numpy().astype(np.int64),
                   captions=table["captions"].to_pylist(), classnames=info["classnames"],
                   templates=info["templates"])


def _materialise(cfg: RecoConfig, spec: EvalDataset, out: str) -> None:
    table: dict[str, list] = {"key": [], "label": [], "captions": []}
    templates = _resolve_templates(spec) if spec.task == "classification" else []
    shard_dir = storage.join(out, "shards")
    if spec.kind == "imagefolder":
        classnames = _imagefolder_classnames(spec, list(_class_folders(spec)))
        shards = _write_shards(_imagefolder_records(spec, classnames, table), shard_dir)
    elif spec.kind == "webdataset":
        classnames = _explicit_classnames(spec) or []
        shards = list_shards(spec.path, key=f"{_where(spec)}.path")
        _scan_webdataset(spec, shards, classnames, table)
    else:
        ds = _clip_benchmark_dataset(cfg, spec)
        classnames = _explicit_classnames(spec) or [clean_classname(c) for c in getattr(ds, "classes", None) or []]
        templates = templates if templates is not None else list(getattr(ds, "templates", []))
        shards = _write_shards(_clip_benchmark_records(ds, spec, classnames, table), shard_dir)
    if spec.task == "classification" and not classnames:
        raise ConfigError(f"{_where(spec)}.classnames: none known for {spec.name}; give them in "
                          "the config (a list, or a .txt/.json file)")
    storage.write_parquet_atomic(storage.join(out, SAMPLES_FILE), pa.table({
        "key": pa.array(table["key"], pa.string()),
        "label": pa.array(table["label"], pa.int64()),
        "captions": pa.array(table["captions"], pa.list_(pa.string())),
    }))
    storage.write_json_atomic(storage.join(out, DATASET_FILE), {
        "name": spec.name, "kind": spec.kind, "task": spec.task, "samples": len(table["key"]),
        "shards": shards, "classnames": classnames, "templates": templates})
