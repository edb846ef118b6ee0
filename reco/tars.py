"""Webdataset tar shards (img2dataset's format): listing, reading per sample, and writing.

A sample is the group of consecutive tar members sharing a key (`000123.jpg`,
`000123.txt`, `000123.json`). Readers stream the tar, so memory stays bounded by one
sample, and a truncated tar yields everything before the damage. The writer builds each
shard in memory with webdataset's TarWriter and writes it in one atomic write.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple

import braceexpand
import fsspec
import webdataset

from reco import storage
from reco.config import ConfigError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class TarSample:
    key: str
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def image(self) -> bytes | None:
        return next((self.files[e] for e in IMAGE_EXTENSIONS if e in self.files), None)

    @property
    def caption(self) -> str | None:
        if "txt" in self.files:
            return self.files["txt"].decode("utf-8", errors="replace").strip()
        meta = self.meta
        return meta.get("caption") if isinstance(meta.get("caption"), str) else None

    @property
    def meta(self) -> dict:
        try:
            meta = json.loads(self.files.get("json", b"{}"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return meta if isinstance(meta, dict) else {}

    @property
    def unsafe_path(self) -> bool:
        """Named outside the shard (absolute, or through `..`): img2dataset never writes such
        a name, and a tool that extracts the tar would write outside its folder."""
        return self.key.startswith("/") or ".." in self.key.split("/")

    @property
    def url(self) -> str:
        url = self.meta.get("url")
        return url if isinstance(url, str) else ""


class TruncatedShard(Exception):
    """The tar ended inside a member, or is no tar at all; `partial_key` is the sample it
    cut, if any, and `reason` the skip reason to count."""

    def __init__(self, message: str, partial_key: str | None, reason: str = "truncated tar"):
        super().__init__(message)
        self.partial_key = partial_key
        self.reason = reason


def _check_tar_start(f) -> None:
    """Raise unless the first block is a tar header or end-of-archive zeros. Reading skips
    corrupt headers (`ignore_zeros`), so a file that is no tar would otherwise yield
    nothing, silently."""
    head = f.read(tarfile.BLOCKSIZE)
    f.seek(0)
    if not head.strip(b"\0"):
        return
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as err:
        raise TruncatedShard(f"not a tar file ({err})", None, "not a tar file") from None


def _split_name(name: str) -> tuple[str, str]:
    """`dir/000123.jpg` -> (`dir/000123`, `jpg`): the extension starts at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_samples(url: str) -> Iterator[TarSample]:
    """Samples of one shard, in tar order. Raises TruncatedShard after the last whole sample.

    A corrupt member header is skipped block by block to the next good one, so one damaged
    member costs its own sample (counted by the reader as missing image or caption), not
    every sample after it.
    """
    current: TarSample | None = None
    with fsspec.open(url, "rb") as f:
        _check_tar_start(f)
        try:
            with tarfile.open(fileobj=f, mode="r|", ignore_zeros=True) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_name(member.name)
                    if current is not None and current.key != key:
                        yield current
                    if current is None or current.key != key:
                        current = TarSample(key)
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    current.files[ext] = data
        except (tarfile.ReadError, EOFError) as err:
            # A member cut short loses that sample; the whole ones before it were yielded.
            raise TruncatedShard(f"truncated tar ({err})",
                                 current.key if current is not None else None) from None
    if current is not None:
        yield current


def list_shards(spec: str, key: str = "embed.input") -> list[str]:
    """The .tar shards named by a folder, a glob, a brace pattern or a single file, sorted."""
    urls: list[str] = []
    missing: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        fs, path = storage.filesystem(pattern)
        if any(c in path for c in "*?["):
            urls += [storage.full_url(fs, p) for p in sorted(fs.glob(path)) if p.endswith(".tar")]
        elif fs.isdir(path):
            urls += storage.list_files(pattern, suffix=".tar")
        elif fs.isfile(path):
            urls.append(pattern)
        else:
            missing.append(pattern)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"{key}: {shown} does not exist")
    if not urls:
        raise ConfigError(f"{key}: no .tar shards found at {spec}")
    return sorted(dict.fromkeys(urls))


class TarRecord(NamedTuple):
    """One sample to write: its key, image file bytes, caption and .json metadata."""

    key: str
    image: bytes
    caption: str
    meta: dict


def _shard_bytes(records: list[TarRecord]) -> bytes:
    buf = io.BytesIO()
    # encoder=False: every member is given as bytes; mtime fixed so a shard's bytes
    # depend only on its samples.
    with webdataset.TarWriter(buf, encoder=False, mtime=0) as writer:
        for r in records:
            writer.write({"__key__": r.key, "jpg": r.image, "txt": r.caption.encode(),
                          "json": json.dumps(r.meta).encode()})
    return buf.getvalue()


def write_shards(records: Iterable[TarRecord], out_dir: str, samples_per_shard: int = 1000) -> list[str]:
    """img2dataset-style shards `{out_dir}/{i:05d}.tar`, each sample `.jpg` `.txt` `.json`.

    The image is stored as given, named `.jpg` whatever its format. Each shard is written
    atomically; returns the shards' URLs in order.
    """
    shards: list[str] = []
    batch: list[TarRecord] = []

    def flush() -> None:
        url = storage.join(out_dir, f"{len(shards):05d}.tar")
        storage.write_bytes_atomic(url, _shard_bytes(batch))
        shards.append(url)
        batch.clear()

    for record in records:
        batch.append(record)
        if len(batch) == samples_per_shard:
            flush()
    if batch:
        flush()
    return shards
