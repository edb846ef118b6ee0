"""`reco serve CONFIG`: the Python API (reco/api.py) as a Ray Serve application, JSON over HTTP.

    POST /embed/text  {"texts": [...]}                       -> {"embeddings": [[...], ...]}
    POST /embed/image {"images": [base64 | http(s) URL, ...]} -> {"embeddings": [[...], ...]}
    POST /classify    {"images": [...], "classnames": [...]}  -> {"labels": [...], "scores": [[...], ...]}

Every body may add `"refine": false` (the frozen CLIP's embeddings); /classify also
takes `"templates"`. A bad request (not JSON, a wrong type, an empty list, too many
items, an oversized body, a non-image, a URL that does not answer) gets a 4xx with
`{"error": message}` and the replica goes on serving.

Each replica calls `reco.load` once and holds its own frozen CLIP and fusion modules. The
memory is the memory service (`reco.search`: one Ray actor per index shard), started once
by `start` and shared by every replica whenever several may run (`shared_memory`); one
replica alone follows `index.service` as the stages do. `Serving.stop` shuts Serve down,
then the shard actors. Limits come from the config's `serve` section.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import ray
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from reco.api import InputError, check_workdir, load
from reco.cluster import init_ray
from reco.config import ConfigError, RecoConfig, ServeConfig
from reco.errors import RecoError
from reco.malloc import keep_freed_memory
from reco.search import MemoryIndex, memory_service

APP_NAME = "reco"


class RequestError(Exception):
    """A request the server refuses: an HTTP status and the message sent back."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# -- request bodies: strict, so a wrong type is an error rather than a silent coercion --

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    refine: bool = True


class TextBody(_Body):
    texts: list[str]


class ImageBody(_Body):
    images: list[str]
    """Each an image file's bytes, base64-encoded, or an http(s) URL of one."""


class ClassifyBody(ImageBody):
    classnames: list[str]
    templates: list[str] | None = None


ROUTES: dict[str, type[_Body]] = {"/embed/text": TextBody, "/embed/image": ImageBody, "/classify": ClassifyBody}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    too_big = RequestError(413, f"request body exceeds serve.max_request_bytes={limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(path: str, raw: bytes, max_items: int) -> _Body:
    """The validated body of a request to `path`; a 4xx naming the problem otherwise."""
    if path not in ROUTES:
        raise RequestError(404, f"no endpoint {path}; POST to one of {', '.join(ROUTES)}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the body is not JSON ({err})") from None
    try:
        body = ROUTES[path].model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
        raise RequestError(400, f"bad request body for {path}: {problems}") from None
    for name in ("texts", "images", "classnames"):
        items = getattr(body, name, None)
        if items is not None and len(items) > max_items:
            raise RequestError(400, f"{name}: {len(items)} items, at most serve.max_items={max_items} "
                                    "per request; split the request")
    return body


def fetch_url(url: str, timeout: float, limit: int) -> bytes:
    """An image's bytes from an http(s) URL, at most `limit` of them, within `timeout` seconds."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than serve.max_request_bytes={limit}")
    return data


def image_bytes(item: str, i: int, limits: ServeConfig) -> bytes:
    """`images[i]` of a request: fetched if an http(s) URL, else base64-decoded."""
    if item.startswith(("http://", "https://")):
        try:
            return fetch_url(item, limits.url_timeout, limits.max_request_bytes)
        except (urllib.error.URLError, OSError, ValueError) as err:  # refused, timeout, 404, too large
            raise RequestError(400, f"images[{i}]: could not fetch {item} ({err})") from None
    try:
        return base64.b64decode(item, validate=True)
    except binascii.Error:
        raise RequestError(400, f"images[{i}]: neither an http(s) URL nor base64-encoded bytes") from None


@serve.deployment(name="reco")
class RecoServer:
    """One replica: the loaded model, answering the three endpoints."""

    def __init__(self, workdir: str, limits: dict, use_gpu: bool, memory: MemoryIndex | None = None):
        # `memory`: the shared service's client (its actor handles); None: open it here.
        keep_freed_memory()
        self.model = load(workdir, use_gpu=use_gpu, memory=memory)
        self.limits = ServeConfig.model_validate(limits)

    def answer(self, body: _Body) -> dict:
        """The response to a validated body (blocking: runs in a thread)."""
        if isinstance(body, TextBody):
            return {"embeddings": self.model.encode_text(body.texts, refine=body.refine).tolist()}
        images = [image_bytes(item, i, self.limits) for i, item in enumerate(body.images)]
        if isinstance(body, ClassifyBody):
            result = self.model.classify(images, body.classnames, body.templates, refine=body.refine)
            return {"labels": result.labels, "scores": result.scores.tolist()}
        return {"embeddings": self.model.encode_image(images, refine=body.refine).tolist()}

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            if request.method != "POST":
                raise RequestError(405, f"{request.method} {request.url.path}: only POST is served")
            raw = await read_body(request, self.limits.max_request_bytes)
            body = parse_body(request.url.path, raw, self.limits.max_items)
            # The forward pass and the search block: a thread keeps the replica's event loop free.
            return JSONResponse(await asyncio.to_thread(self.answer, body))
        except RequestError as err:
            return JSONResponse({"error": err.message}, status_code=err.status)
        except InputError as err:  # the API's own checks: an empty list, a non-image, bad templates
            return JSONResponse({"error": str(err)}, status_code=400)


def check_serve(cfg: RecoConfig) -> None:
    """Everything `reco serve` needs, checked before Ray or a replica starts."""
    s = cfg.serve
    if s.max_replicas is not None and s.max_replicas < s.replicas:
        raise ConfigError(f"serve.max_replicas: {s.max_replicas} is below serve.replicas={s.replicas}")
    check_workdir(cfg.workdir)
    if "RAY_ADDRESS" in os.environ:  # the proxy listens on the cluster's head, not necessarily here
        return
    with socket.socket() as sock:
        try:
            sock.bind((s.host, s.port))
        except OSError as err:
            raise ConfigError(f"serve.port: cannot listen on {s.host}:{s.port} ({err.strerror}); "
                              f"pick a free port, e.g. serve.port={s.port + 1}") from None


def shared_memory(cfg: RecoConfig) -> MemoryIndex | None:
    """The memory service the replicas search through, started here once; None where the one
    replica opens the memory in its own process.

    Where several replicas may run (`serve.replicas` above 1, or `serve.max_replicas` set
    above 1) they share the service unless `index.service` is `never`: otherwise each would
    hold its own copy of the faiss structures. One replica follows `index.service` as the
    stages do (`auto`: the service for several index shards or several nodes, else the
    replica memory-maps the memory itself, a hop less per search). Its actors search on
    `index.use_gpu`'s devices; the replicas' GPUs are their CLIP's."""
    s, index = cfg.serve, cfg.index
    if index.service == "auto" and max(s.replicas, s.max_replicas or 0) > 1:
        index = index.model_copy(update={"service": "always"})
    return memory_service(cfg.workdir, index, use_gpu=index.use_gpu)


def check_room(cfg: RecoConfig, sharing: bool = False) -> None:
    """On a local Ray, that the replicas fit in what is left (beside the memory service's
    actors where `sharing`): Serve would wait for them forever. (A cluster may grow: not
    checked there.)"""
    if "RAY_ADDRESS" in os.environ:
        return
    s, free = cfg.serve, ray.available_resources()
    beside = " beside the memory service's shard actors" if sharing else ""
    for name, each, resource in (("cpus_per_replica", s.cpus_per_replica, "CPU"),
                                 ("gpus_per_replica", s.gpus_per_replica, "GPU")):
        left = free.get(resource, 0.0)
        if s.replicas * each > left + 1e-6:
            raise ConfigError(f"serve.{name}: {s.replicas} replica(s) x {each:g} {resource} do not fit in the "
                              f"{left:g} {resource} free on this machine{beside}; lower serve.{name} or "
                              "serve.replicas")


def build_app(cfg: RecoConfig, memory: MemoryIndex | None = None) -> serve.Application:
    """The Serve application: replicas (fixed, or autoscaled up to max_replicas) of RecoServer,
    all searching through `memory` where given (see `shared_memory`)."""
    s = cfg.serve
    scaling = ({"autoscaling_config": {"min_replicas": s.replicas, "max_replicas": s.max_replicas}}
               if s.max_replicas else {"num_replicas": s.replicas})
    deployment = RecoServer.options(
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica}, **scaling)
    return deployment.bind(cfg.workdir, s.model_dump(), s.gpus_per_replica > 0, memory)


@dataclass
class Serving:
    """A running `reco serve` application."""
    url: str
    memory: MemoryIndex | None
    """The memory service the replicas share (owned here); None where the replica opened its own."""

    def stop(self) -> None:
        """Shut Serve down, then the memory service's shard actors (they also end with this
        process, which owns them)."""
        serve.shutdown()
        if self.memory is not None:
            self.memory.close()
            self.memory = None


def start(cfg: RecoConfig) -> Serving:
    """Start the memory service where shared, deploy the application on this Ray cluster, and
    return once every replica is up."""
    check_serve(cfg)
    init_ray()
    serving = Serving(f"http://{cfg.serve.host}:{cfg.serve.port}", shared_memory(cfg))
    try:
        check_room(cfg, sharing=serving.memory is not None)
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        try:
            serve.run(build_app(cfg, serving.memory), name=APP_NAME, route_prefix="/")
        except RuntimeError:  # Serve gave up on the replicas' constructor (it retries a few times)
            raise ReplicaError(f"serve: the replicas could not start: {replica_failure()}") from None
    except BaseException:
        serving.stop()
        raise
    return serving


class ReplicaError(RecoError):
    """Every replica failed to load the model; Serve stopped retrying."""


def replica_failure() -> str:
    """Why Serve gave up on the replicas: the exception their constructor raised, from the
    deployment's status (the application's says only that it failed), module path dropped."""
    app = serve.status().applications.get(APP_NAME)
    message = "\n".join(d.message for d in app.deployments.values()) if app else ""
    lines = message.strip().splitlines()
    # The traceback's last line naming an exception starts the error's (maybe multi-line) text.
    starts = [i for i, line in enumerate(lines) if re.match(r"[\w.]*(Error|Exception)\w*: ", line)]
    if not starts:
        return lines[-1] if lines else "no reason given (see the Serve controller's log)"
    return re.sub(r"^(\w+\.)+(?=\w+: )", "", "\n".join(lines[starts[-1]:]))


class Terminated(Exception):
    """SIGTERM arrived (`ray job stop`, `kill`, a container stopping): stop as on Ctrl-C."""


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated


def serve_forever(cfg: RecoConfig) -> int:
    """`reco serve`: start, say where it listens, block until Ctrl-C (SIGINT) or SIGTERM (what
    `ray job stop` and `kill` send), then stop Serve and the memory service. Returns the
    conventional exit status of a process ended by that signal: 130, or 143 for SIGTERM."""
    check_serve(cfg)
    init_ray()
    # After ray.init, which installs its own SIGTERM handler (it aborts the process).
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        serving = start(cfg)
        print(f"reco serve: listening on {serving.url} (POST {', '.join(ROUTES)}); Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        finally:
            # A second signal during the stop must not cut it short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                serving.stop()
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
    except KeyboardInterrupt:
        print("reco serve: stopped (SIGINT)", flush=True)
        return 128 + signal.SIGINT
    except Terminated:
        print("reco serve: stopped (SIGTERM)", flush=True)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
