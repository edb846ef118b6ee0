"""Storage on any fsspec URL (local path, s3://, gs://), with atomic writes.

A reader never sees a partial file: on filesystems with rename we write a temporary
name and rename it; on object stores (no rename, s3fs `mv` copies) an object appears
whole when its upload completes, so we write the final key directly.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

# Filesystems where one PUT makes an object appear atomically and rename is a copy.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or local path."""
    return url_to_fs(url)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL that `filesystem()` maps back to (fs, path)."""
    return fs.unstrip_protocol(path) if not _is_local(fs) else path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool(OBJECT_STORES.intersection(protocols))


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` to `url` so that readers see either nothing or the whole file."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not _is_object_store(fs):
        fs.makedirs(parent, exist_ok=True)
    if _is_object_store(fs):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        if _is_local(fs):
            os.replace(tmp, path)
        else:
            fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, sort_keys=False).encode())


def read_json(url: str) -> Any:
    with fsspec.open(url, "rb") as f:
        return json.load(f)


def write_parquet_atomic(url: str, table: pa.Table, **kwargs: Any) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    write_bytes_atomic(url, buf.getvalue())


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file read through fsspec, so every read sees the same credentials and
    endpoints whatever the filesystem."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def parquet_schema(url: str) -> pa.Schema:
    """A Parquet file's schema with its key-value metadata, reading only the footer."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Full URLs of the files directly under folder `url` whose names end with `suffix`."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    entries = fs.ls(path, detail=True)
    names = sorted(e["name"] for e in entries if e["type"] == "file" and e["name"].endswith(suffix))
    return [full_url(fs, p) for p in names]
