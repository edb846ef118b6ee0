"""The synthetic corpus served over HTTP on 127.0.0.1, so img2dataset runs its real download path offline.

Besides the images, the server has endpoints that fail the ways the web does: a 404, a
response slower than any sane timeout, a redirect loop, an HTML page instead of an
image, and a JPEG cut short. `write_url_list` writes the URL list (Parquet with url and
caption columns) that `reco download` reads, with a chosen share of broken and empty rows.

    with CorpusServer(1000) as server:
        write_url_list("urls.parquet", server, broken_share=0.1)
        ...  # reco download with download.url_list=urls.parquet

`python -m reco.demo.corpus_server --samples 1000 --url-list urls.parquet` serves until
interrupted, for runs by hand.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa

from reco import storage
from reco.demo import synthetic

BROKEN_KINDS = ("404", "slow", "loop", "text", "truncated")
"""The ways a URL of the server fails; each maps to a failure reason in img2dataset's stats."""
EMPTY_KINDS = ("null url", "empty url", "empty caption")

_PATH = re.compile(r"^/(?:images|broken/(?P<kind>[a-z0-9]+))/(?P<index>\d+)\.jpg$")


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        corpus = self.server.corpus
        corpus.log(self.path)
        match = _PATH.match(self.path)
        if match is None or int(match["index"]) >= len(corpus.samples):
            return self._send(404, b"not found", "text/plain")
        jpeg = corpus.samples[int(match["index"])].jpeg
        kind = match["kind"]
        if kind is None:
            return self._send(200, jpeg, "image/jpeg")
        if kind == "slow":
            # Waits out the client's timeout; stop() wakes it so shutdown is prompt.
            if corpus.stopping.wait(corpus.slow_seconds):
                return None
            return self._send(200, jpeg, "image/jpeg")
        if kind == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if kind == "text":
            return self._send(200, b"<html><body>not an image</body></html>", "image/jpeg")
        if kind == "truncated":
            return self._send(200, jpeg[: len(jpeg) // 2], "image/jpeg")
        return self._send(404, b"not found", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        """Silent: the request log is `CorpusServer.requests`."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a slow handler must not hold up stop()
    request_queue_size = 256  # img2dataset opens many connections at once
    corpus: "CorpusServer"

    def handle_error(self, request, client_address) -> None:
        """A client that gave up (its timeout) closes the socket mid-reply: not an error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class CorpusServer:
    """`n` synthetic samples at `{url}/images/{i}.jpg`, served from a background thread.

    `requests` is the log of paths asked for, in order (tests use it to check that a
    resumed download does not fetch finished shards again).
    """

    def __init__(self, n: int, *, seed: int = 0, image_size: int = 64,
                 granularity: synthetic.Granularity = "fine", slow_seconds: float = 5.0,
                 port: int = 0):
        self.samples = list(synthetic.make_samples(n, seed=seed, image_size=image_size,
                                                   granularity=granularity))
        self.slow_seconds = slow_seconds
        self.requests: list[str] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("CorpusServer is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def image_url(self, index: int) -> str:
        return f"{self.url}/images/{index}.jpg"

    def broken_url(self, kind: str, index: int) -> str:
        if kind not in BROKEN_KINDS:
            raise ValueError(f"unknown broken kind {kind!r}; one of {BROKEN_KINDS}")
        return f"{self.url}/broken/{kind}/{index}.jpg"

    def log(self, path: str) -> None:
        with self._lock:
            self.requests.append(path)

    def start(self) -> "CorpusServer":
        self.stopping.clear()
        self._server = _Server(("127.0.0.1", self._port), _Handler)
        self._server.corpus = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="corpus-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> "CorpusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class UrlList:
    """What was written: the path, the row count, and how many rows of each kind."""
    path: str
    rows: int
    kinds: Counter = field(default_factory=Counter)
    """`ok` (a working URL with its caption), each of BROKEN_KINDS, each of EMPTY_KINDS."""

    @property
    def downloadable(self) -> int:
        """Rows whose image downloads (`ok` and `empty caption`)."""
        return self.kinds["ok"] + self.kinds["empty caption"]


def write_url_list(path: str, server: CorpusServer, *, broken_share: float = 0.0,
                   empty_rows: int = 0, seed: int = 0, n: int | None = None) -> UrlList:
    """Parquet `path` with url, caption and label columns: one row per sample (the first `n`).

    A `broken_share` of the rows point at the broken endpoints (the kinds in turn);
    `empty_rows` rows have a null url, an empty url or an empty caption (in turn).
    """
    n = len(server.samples) if n is None else n
    rng = random.Random(seed)
    rows = list(range(n))
    rng.shuffle(rows)
    n_broken = round(broken_share * n)
    broken = {i: BROKEN_KINDS[j % len(BROKEN_KINDS)] for j, i in enumerate(rows[:n_broken])}
    empty = {i: EMPTY_KINDS[j % len(EMPTY_KINDS)] for j, i in enumerate(rows[n_broken:n_broken + empty_rows])}
    urls, captions, kinds = [], [], Counter()
    for i, sample in enumerate(server.samples[:n]):
        kind = broken.get(i) or empty.get(i) or "ok"
        kinds[kind] += 1
        urls.append(None if kind == "null url" else "" if kind == "empty url"
                    else server.broken_url(kind, i) if kind in BROKEN_KINDS else server.image_url(i))
        captions.append("" if kind == "empty caption" else sample.caption)
    table = pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string()),
                      "label": pa.array([s.label for s in server.samples[:n]], pa.int32())})
    storage.write_parquet_atomic(path, table)
    return UrlList(path, n, kinds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="default: any free port")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--url-list", help="also write this URL list (Parquet)")
    parser.add_argument("--broken-share", type=float, default=0.0)
    args = parser.parse_args(argv)
    with CorpusServer(args.samples, seed=args.seed, image_size=args.image_size, port=args.port) as server:
        if args.url_list:
            write_url_list(args.url_list, server, broken_share=args.broken_share, seed=args.seed)
        print(server.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
