"""Bad input, stage by stage: one table of cases (docs/reliability.md lists it with outcomes).

Each case is either refused, before any work, by the `reco` CLI with a message naming the
input (exit 2, no traceback) while the workdir's earlier output stays byte-identical; or
a bad sample that `reco embed` skips and counts in the memory manifest (or keeps, when
it is only odd) while the good samples beside it are written.

Cases covered elsewhere are not repeated here: a truncated tar, a corrupt or non-image
file, an empty or missing caption (tests/test_embed.py); a URL list without its url or
caption column, or a CSV read as Parquet (tests/test_download.py); NaN and zero vectors
in the memory, a missing or truncated index file opened directly (tests/test_index.py);
neighbour shards with NaN embeddings or another width (tests/test_train.py); a missing
evaluation folder, an empty class folder, class names that do not match the folders
(tests/test_evaluate.py).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from indexing.build import build_index
from pipeline.embed import embed
from reco.cli import main
from reco.contracts import MemoryManifest, embedding_array, memory_schema
from reco.demo import synthetic
from tests.conftest import make_config, start_local_ray, write_memory

D = 64
GOOD_PER_SHARD = 2


@dataclass
class Inputs:
    """Where a case writes its inputs; `work` already holds a finished memory."""
    tmp: Path
    work: Path
    checkpoint: str

    def config(self, text: str = "", workdir: Path | None = None, model: str | None = None) -> str:
        """`run.yaml`: the workdir, the model (default: the tiny checkpoint), then `text`."""
        path = self.tmp / "run.yaml"
        model = model or f"{{pretrained: {self.checkpoint}}}"
        path.write_text(f"workdir: {workdir or self.work}\nmodel: {model}\n{text}")
        return str(path)

    def corpus(self) -> str:
        """A one-shard corpus for `reco embed` to read."""
        synthetic.write_webdataset(synthetic.make_samples(2, seed=1), str(self.tmp / "corpus"))
        return str(self.tmp / "corpus")


@dataclass(frozen=True)
class Refused:
    """The CLI refuses: `argv(inputs)` exits 2 with a message matching `message`."""
    stage: str
    argv: Callable[[Inputs], list[str]]
    message: str


@dataclass(frozen=True)
class Counted:
    """`reco embed` of a shard of good samples with `bad(tar)`'s sample between them, the
    shard's bytes then passed through `damage`: `lost` samples counted under `reason`
    (None: the odd sample kept), of `samples` seen."""
    bad: Callable[[tarfile.TarFile], None]
    reason: str | None
    lost: int = 1
    samples: int = GOOD_PER_SHARD + 1
    damage: Callable[[Path], None] = lambda path: None


# ---- inputs refused before any work ------------------------------------------------------

def _yaml_python_tag(i: Inputs) -> list[str]:
    marker = i.tmp / "marker"
    return ["embed", i.config(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')]


def _yaml_syntax(i: Inputs) -> list[str]:
    return ["embed", i.config("embed: {batch_size: 8\n")]


def _config_not_utf8(i: Inputs) -> list[str]:
    path = Path(i.config())
    path.write_bytes(path.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    return ["embed", str(path)]


def _override_python_tag(i: Inputs) -> list[str]:
    return ["embed", i.config(), "seed=!!python/object/apply:os.getpid []"]


def _workdir_is_a_file(i: Inputs) -> list[str]:
    return ["index", i.config(workdir=i.work / "memory" / "part-00000.parquet" / "run")]


def _url_list(i: Inputs, name: str, data: bytes | pa.Table, fmt: str) -> list[str]:
    path = i.tmp / name
    if isinstance(data, pa.Table):
        pq.write_table(data, path)
    else:
        path.write_bytes(data)
    return ["download", i.config(f"download: {{url_list: {path}, input_format: {fmt}}}\n")]


URLS = ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg"]


def _checkpoint(i: Inputs, save: Callable[[Path], None]) -> list[str]:
    path = i.tmp / "weights.pt"
    save(path)
    return ["embed", i.config(f"embed: {{input: {i.corpus()}}}\n", model=f"{{pretrained: {path}}}")]


class _MarkerPayload:
    """Unpickling this would create the marker file: proof that nothing ran if it is absent."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_payload(i: Inputs) -> list[str]:
    weights = torch.load(i.checkpoint, weights_only=True)
    return _checkpoint(i, lambda p: torch.save({**weights, "extra": _MarkerPayload(i.tmp / "marker")}, p))


def _truncated_checkpoint(i: Inputs) -> list[str]:
    data = Path(i.checkpoint).read_bytes()
    return _checkpoint(i, lambda p: p.write_bytes(data[: len(data) // 2]))


def _model_config_not_json(i: Inputs) -> list[str]:
    (i.tmp / "arch.json").write_text("{embed_dim: 64,")
    model = f"{{name: my-arch, config: {i.tmp / 'arch.json'}}}"
    return ["embed", i.config(f"embed: {{input: {i.corpus()}}}\n", model=model)]


def _weights_not_downloadable(i: Inputs) -> list[str]:
    """A tag open_clip knows, so the driver accepts it; each replica then fails to fetch its
    weights, offline with conftest's empty Hugging Face cache."""
    model = "{name: ViT-B-32, pretrained: openai}"
    return ["embed", i.config(f"embed: {{input: {i.corpus()}}}\n", workdir=i.tmp / "new", model=model)]


def _wrong_width_shard(i: Inputs) -> list[str]:
    n = 50
    narrow = np.ones((n, 32), np.float32) / np.sqrt(32)
    ids = pa.array(np.arange(n), pa.int64())
    names = [str(x) for x in range(n)]
    pq.write_table(pa.table({"id": ids, "key": names, "caption": names, "url": names,
                             "image_embedding": embedding_array(narrow), "text_embedding": embedding_array(narrow)},
                            schema=memory_schema(32)), i.work / "memory" / "part-00000.parquet")
    return ["index", i.config()]


def _truncated_index_file(i: Inputs) -> list[str]:
    index = next((i.work / "index" / "text").glob("shard-*.index"))
    index.write_bytes(index.read_bytes()[:100])
    return ["neighbors", i.config("neighbors: {k: 4}\n")]


def _imagefolder(i: Inputs, dataset: str) -> list[str]:
    return ["evaluate", i.config(f"evaluate: {{datasets: [{dataset}]}}\n")]


def _eval_folder_without_class_folders(i: Inputs) -> list[str]:
    root = i.tmp / "images"
    root.mkdir()
    for s in synthetic.make_samples(3, seed=1):
        (root / f"{s.key}.jpg").write_bytes(s.jpeg)
    return _imagefolder(i, f"{{name: flat, kind: imagefolder, path: {root}}}")


def _eval_classnames_file(i: Inputs, text: str) -> list[str]:
    root = i.tmp / "images"
    for s in synthetic.make_samples(2, seed=1):
        (root / s.key).mkdir(parents=True)
        (root / s.key / "0.jpg").write_bytes(s.jpeg)
    (i.tmp / "names.json").write_text(text)
    return _imagefolder(i, f"{{name: two, kind: imagefolder, path: {root}, classnames: {i.tmp / 'names.json'}}}")


REFUSED = {
    "yaml-python-tag": Refused("config", _yaml_python_tag, r"run\.yaml, line 3 column 7: .*python/object/apply"),
    "yaml-syntax-error": Refused("config", _yaml_syntax, r"run\.yaml, line 4 .*not valid config YAML"),
    "config-not-utf8": Refused("config", _config_not_utf8, r"run\.yaml: not UTF-8 text"),
    "override-python-tag": Refused("config", _override_python_tag, r"override 'seed=!!python.*: not valid"),
    "workdir-is-a-file": Refused("config", _workdir_is_a_file, r"workdir: .*part-00000\.parquet is a file"),
    "url-list-no-columns": Refused("download", lambda i: _url_list(i, "urls.csv", b"a,b\n1,2\n", "csv"),
                                   r"download.url_col: no column 'url' in .*urls\.csv"),
    "url-list-empty-file": Refused("download", lambda i: _url_list(i, "urls.parquet", b"", "parquet"),
                                   r"urls\.parquet is not a readable parquet file"),
    "url-list-no-rows": Refused("download", lambda i: _url_list(i, "urls.csv", b"url,caption\n", "csv"),
                                r"download.url_list: .*urls\.csv has no rows"),
    "url-list-not-utf8": Refused("download", lambda i: _url_list(
        i, "urls.csv", f"url,caption\n{URLS[0]},caf\u00e9\n".encode("latin-1"), "csv"), r"urls\.csv is not UTF-8"),
    "url-list-other-format": Refused("download", lambda i: _url_list(
        i, "urls.tsv", pa.table({"url": URLS, "caption": ["a", "b"]}), "tsv"),
        r"urls\.tsv is a Parquet file, not tsv; set download.input_format=parquet"),
    "url-list-int-captions": Refused("download", lambda i: _url_list(
        i, "urls.parquet", pa.table({"url": URLS, "caption": [1, 2]}), "parquet"),
        r"download.caption_col: column 'caption' in .*urls\.parquet holds int64"),
    "checkpoint-pickle-payload": Refused("model", _pickle_payload,
                                         r"weights\.pt holds more than tensors.*ran none of it.*GLOBAL posix\.system"),
    "checkpoint-truncated": Refused("model", _truncated_checkpoint, r"weights\.pt is not a PyTorch checkpoint"),
    "model-config-not-json": Refused("model", _model_config_not_json, r"model.config: .*arch\.json is not valid JSON"),
    "weights-not-downloadable": Refused("model", _weights_not_downloadable,
                                        r"embed: 1 of 1 actors could not start: could not download the 'openai' "
                                        r"weights of ViT-B-32 .*give a checkpoint instead"),
    "memory-shard-wrong-width": Refused("index", _wrong_width_shard,
                                        r"part-00000\.parquet: image_embedding has width 32.*d=64"),
    "index-file-truncated": Refused("neighbors", _truncated_index_file,
                                    r"index file .*text/.*\.index has 100 bytes.*truncated"),
    "eval-folder-no-class-folders": Refused("evaluate", _eval_folder_without_class_folders,
                                            r"datasets\[flat\]\.path: .*images has no class sub-folders"),
    "eval-classnames-not-json": Refused("evaluate", lambda i: _eval_classnames_file(i, "[a, b"),
                                        r"datasets\[two\]\.classnames: .*names\.json is not valid JSON"),
    "eval-classnames-not-names": Refused("evaluate", lambda i: _eval_classnames_file(i, "[1, 2]"),
                                         r"datasets\[two\]\.classnames: .*names\.json holds .*strings"),
}


# ---- samples skipped and counted (or kept) by `reco embed` ------------------------------------

def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sample(name: str, image: bytes | None = None, caption: bytes = b"a photo of a thing",
            meta: bytes | None = None) -> Callable[[tarfile.TarFile], None]:
    """A bad sample's members: `name`.jpg (a good image unless given), .txt unless None, .json if given."""
    def write(tar: tarfile.TarFile) -> None:
        _member(tar, f"{name}.jpg", image if image is not None else next(synthetic.make_samples(1, seed=9)).jpeg)
        if caption is not None:
            _member(tar, f"{name}.txt", caption)
        if meta is not None:
            _member(tar, f"{name}.json", meta)
    return write


def _bomb() -> bytes:
    """A small PNG whose pixel count exceeds twice PIL's MAX_IMAGE_PIXELS: PIL refuses to open it."""
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 64
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def _corrupt_header(member: str) -> Callable[[Path], None]:
    """Overwrite the tar header of `member` with bytes that are no header."""
    def damage(path: Path) -> None:
        with tarfile.open(path) as tar:
            offset = tar.getmember(member).offset
        data = bytearray(path.read_bytes())
        data[offset:offset + tarfile.BLOCKSIZE] = b"\x07" * tarfile.BLOCKSIZE
        path.write_bytes(bytes(data))
    return damage


def _not_a_tar(path: Path) -> None:
    path.write_bytes(b"\x07" * path.stat().st_size)


COUNTED = {
    "member-path-dotdot": Counted(_sample("../escape"), "unsafe member path"),
    "member-path-absolute": Counted(_sample("/abs/escape"), "unsafe member path"),
    "image-zero-bytes": Counted(_sample("empty", image=b""), "unreadable image (UnidentifiedImageError)"),
    "image-decompression-bomb": Counted(_sample("bomb", image=_bomb()),
                                        "unreadable image (DecompressionBombError)"),
    "caption-1mb": Counted(_sample("long", caption=b"a photo of a thing " * 55_000), None, lost=0),
    "caption-not-utf8": Counted(_sample("latin", caption="caf\u00e9".encode("latin-1")), None, lost=0),
    "caption-number-in-json": Counted(_sample("number", caption=None, meta=b'{"caption": 42}'),
                                      "missing caption"),
    "tar-corrupt-member-header": Counted(_sample("hurt"), "missing image", damage=_corrupt_header("hurt.jpg")),
    "tar-not-a-tar": Counted(_sample("any"), "not a tar file", lost=1, samples=1, damage=_not_a_tar),
}


def _shard(path: Path, case: Counted) -> None:
    """Good samples keyed `<shard>-<n>`, the case's bad sample in the middle, then the damage."""
    first, *rest = synthetic.make_samples(GOOD_PER_SHARD, seed=4, key_prefix=path.stem + "-")
    with tarfile.open(path, "w") as tar:
        for s in (first, None, *rest):
            if s is None:
                case.bad(tar)
                continue
            _member(tar, f"{s.key}.jpg", s.jpeg)
            _member(tar, f"{s.key}.txt", s.caption.encode())
    case.damage(path)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_checkpoint) -> tuple[MemoryManifest, dict[str, str]]:
    """Every Counted case as its own shard, embedded in one run; its manifest and captions by key."""
    start_local_ray()
    root = tmp_path_factory.mktemp("bad-corpus")
    (root / "corpus").mkdir()
    for name, case in COUNTED.items():
        _shard(root / "corpus" / f"{name}.tar", case)
    cfg = make_config(root / "work", model={"pretrained": tiny_checkpoint}, embed={"input": str(root / "corpus")})
    manifest = embed(cfg)
    memory = pa.concat_tables(pq.read_table(u) for u in manifest.shard_urls(cfg.path("memory")))
    return manifest, dict(zip(memory["key"].to_pylist(), memory["caption"].to_pylist()))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    """A workdir with a finished memory and a Flat index (the earlier output a case must not touch)."""
    start_local_ray()
    work = tmp_path_factory.mktemp("indexed") / "work"
    image, text = synthetic.clustered_embeddings(100, D, seed=2)
    write_memory(work, image, text, shard_rows=50)
    build_index(make_config(work, index={"key": "Flat"}))
    return work


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", [*REFUSED, *COUNTED])
def test_bad_input(name, request, tmp_path, tiny_checkpoint, capsys):
    if name in COUNTED:
        _check_counted(name, COUNTED[name], *request.getfixturevalue("embedded"))
        return
    case = REFUSED[name]
    work = tmp_path / "work"
    shutil.copytree(request.getfixturevalue("indexed"), work)
    inputs = Inputs(tmp_path, work, tiny_checkpoint)
    argv = case.argv(inputs)
    before = _tree(work)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("reco: error: ") and "Traceback" not in err
    assert re.search(case.message, err, re.S), err
    assert _tree(work) == before, "earlier output changed"
    assert not (tmp_path / "marker").exists(), "code in the input ran"


def _check_counted(name: str, case: Counted, manifest: MemoryManifest, captions: dict[str, str]) -> None:
    stats = next(s for s in manifest.inputs if s.source.endswith(f"/{name}.tar"))
    assert stats.samples == case.samples
    assert stats.written == case.samples - case.lost
    assert stats.skipped.total == case.lost
    if case.reason is not None:
        assert stats.skipped.by_reason == {case.reason: case.lost}
    # The good samples around the bad one are in the memory, whole, unless the shard is unreadable.
    good = {f"{name}-{s.key}": s.caption for s in synthetic.make_samples(GOOD_PER_SHARD, seed=4)}
    kept = {key: captions[key] for key in good if key in captions}
    assert kept == (good if stats.written else {})
