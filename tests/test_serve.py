"""`reco serve`: the API over real HTTP on 127.0.0.1 (Ray Serve), its answers and its 4xx."""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from ray._private import state

import reco
from reco.config import ConfigError, dump_config
from reco.contracts import IndexManifest, index_folder
from reco.serve import check_room, check_serve, start
from tests.conftest import API_TEMPLATES

ROOT = Path(__file__).resolve().parents[1]
MAX_ITEMS = 4
MAX_BYTES = 100_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict | bytes, method: str = "POST") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def images(api_world) -> list[Path]:
    root = Path(api_world.evaluate.datasets[0].path)
    return sorted(p for folder in sorted(root.iterdir()) for p in sorted(folder.iterdir()))


@pytest.fixture(scope="module")
def image_server(images):
    """A local HTTP server of the set's image files: http://127.0.0.1:PORT/<class>/<file>."""
    root = images[0].parents[1]
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def wait_listening(proc: subprocess.Popen, port: int) -> None:
    """Read a `reco serve` process's output until it says it listens on `port`."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "reco serve: listening on" in line:
            break
    assert f"listening on http://127.0.0.1:{port}" in "".join(lines), "".join(lines[-20:])


def live_actors(class_prefix: str) -> list[dict]:
    """The GCS's record (ActorID, Pid, ...) of the live actors whose class name starts so. Read
    from the GCS: the state API (ray.util.state) needs the dashboard, which the tests leave off."""
    return [a for a in state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"].startswith(class_prefix)]


@pytest.fixture(scope="module")
def serving(api_world):
    """A running `reco serve` application of two replicas, which share the memory service."""
    cfg = api_world.model_copy(update={"serve": api_world.serve.model_copy(update={
        # 2 x 0.25 CPU fits beside the shard actor's 1 on the tests' 2-CPU Ray.
        "port": free_port(), "replicas": 2, "cpus_per_replica": 0.25, "max_items": MAX_ITEMS,
        "max_request_bytes": MAX_BYTES, "url_timeout": 2.0})})
    serving = start(cfg)
    yield serving
    serving.stop()
    # Stopping serving stops the memory service's actors (ray.kill is asynchronous).
    deadline = time.monotonic() + 30
    while live_actors("ShardServer") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_actors("ShardServer"), "the memory service outlived `reco serve`"


@pytest.fixture(scope="module")
def served(serving, api_world):
    """(base URL of the running application, the in-process API on the same workdir)."""
    model = reco.load(api_world.workdir)
    yield serving.url, model
    model.close()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_embed_text_answers_the_apis_embeddings(served):
    url, model = served
    texts = ["a photo of a ronlo.", "a red triangle"]
    status, body = post(f"{url}/embed/text", {"texts": texts})
    assert status == 200
    np.testing.assert_allclose(np.array(body["embeddings"], np.float32), model.encode_text(texts), atol=1e-5)
    status, body = post(f"{url}/embed/text", {"texts": texts, "refine": False})
    assert status == 200
    np.testing.assert_allclose(np.array(body["embeddings"], np.float32), model.encode_text(texts, refine=False),
                               atol=1e-5)


def test_embed_image_by_base64_and_url(served, images, image_server):
    url, model = served
    base, root = image_server
    items = [b64(images[0]), f"{base}/{images[1].relative_to(root)}"]
    status, body = post(f"{url}/embed/image", {"images": items})
    assert status == 200
    np.testing.assert_allclose(np.array(body["embeddings"], np.float32), model.encode_image(images[:2]),
                               atol=1e-5)
    status, body = post(f"{url}/embed/image", {"images": items, "refine": False})
    np.testing.assert_allclose(np.array(body["embeddings"], np.float32),
                               model.encode_image(images[:2], refine=False), atol=1e-5)


def test_classify(served, images):
    url, model = served
    classnames = ["ronlo", "pelka", "mistu"]
    status, body = post(f"{url}/classify", {"images": [b64(p) for p in images[:3]], "classnames": classnames,
                                            "templates": API_TEMPLATES})
    assert status == 200
    expected = model.classify(images[:3], classnames, API_TEMPLATES)
    assert body["labels"] == expected.labels
    np.testing.assert_allclose(np.array(body["scores"], np.float32), expected.scores, atol=1e-5)


def memory_files(pid: int, workdir: str) -> set[str]:
    """The memory's files a process has mapped: the workdir's index and embedding files, or
    a shard actor's local copies of them."""
    with open(f"/proc/{pid}/maps") as maps:
        paths = {line.split(maxsplit=5)[-1].strip() for line in maps if line.count(" ") >= 5}
    index = os.path.join(os.path.realpath(workdir), "index")
    return {p for p in paths if p.startswith(index) or "/reco-memory/" in p}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads what processes map from /proc")
def test_replicas_share_one_memory_service(serving, served, api_world):
    """One shard actor per index shard, not per replica; the replicas map none of the memory."""
    url, model = served
    shards = len(IndexManifest.read(index_folder(api_world.workdir, "image")).shards)
    shard_actors, replicas = live_actors("ShardServer"), live_actors("ServeReplica")
    assert len(replicas) == 2
    assert len(shard_actors) == shards == len(serving.memory._servers)
    assert {a["ActorID"] for a in shard_actors} == {s._actor_id.hex() for s in serving.memory._servers}
    # This process's in-process API maps the workdir's files: the check sees a memory where one is.
    assert memory_files(os.getpid(), api_world.workdir)
    assert all(memory_files(a["Pid"], api_world.workdir) for a in shard_actors)
    assert not any(memory_files(r["Pid"], api_world.workdir) for r in replicas)
    # Serve routes each request to either replica: the answers are the in-process API's.
    texts = ["a photo of a ronlo."]
    for _ in range(6):
        status, body = post(f"{url}/embed/text", {"texts": texts})
        assert status == 200
        np.testing.assert_allclose(np.array(body["embeddings"], np.float32), model.encode_text(texts), atol=1e-5)


def test_load_searches_a_given_memory_and_leaves_it_open(serving, served, api_world):
    """`reco.load(..., memory=)` (what each replica does) answers as the in-process API, and
    its close leaves the service to its opener."""
    _, model = served
    shared = reco.load(api_world.workdir, memory=serving.memory)
    texts = ["a photo of a pelka.", "a blue square"]
    np.testing.assert_allclose(shared.encode_text(texts), model.encode_text(texts), atol=1e-5)
    shared.close()
    assert len(live_actors("ShardServer")) == len(serving.memory._servers)
    assert serving.memory.search(model.encode_text(texts, refine=False), 2, "text")[1].shape == (2, 2)


CLOSED_PORT = free_port()  # bound and released: nothing listens there


@pytest.mark.parametrize("path, body, status, message", [
    ("/embed/text", b"{not json", 400, "the body is not JSON"),
    ("/embed/text", {"texts": []}, 400, "texts: the list is empty"),
    ("/embed/text", {"texts": "a photo"}, 400, "texts: Input should be a valid list"),
    ("/embed/text", {"texts": ["a", 3]}, 400, "texts.1: Input should be a valid string"),
    ("/embed/text", {"texts": ["a"], "refine": "no"}, 400, "refine: Input should be a valid boolean"),
    ("/embed/text", {"text": ["a"]}, 400, "text: Extra inputs are not permitted"),
    ("/embed/text", {"texts": ["a"] * (MAX_ITEMS + 1)}, 400, f"at most serve.max_items={MAX_ITEMS}"),
    ("/embed/text", {"texts": ["a" * MAX_BYTES]}, 413, f"serve.max_request_bytes={MAX_BYTES}"),
    ("/embed/image", {"images": [base64.b64encode(b"no image").decode()]}, 400, "images[0]: not an image"),
    ("/embed/image", {"images": ["not base64!"]}, 400, "images[0]: neither an http(s) URL nor base64"),
    ("/embed/image", {"images": [f"http://127.0.0.1:{CLOSED_PORT}/a.jpg"]}, 400, "images[0]: could not fetch"),
    ("/classify", {"images": ["x"]}, 400, "classnames: Field required"),
    ("/embed/video", {"videos": []}, 404, "no endpoint /embed/video"),
], ids=["not-json", "empty", "str-not-list", "int-in-list", "bad-refine", "unknown-key", "too-many",
        "oversized", "not-an-image", "not-base64", "closed-port", "missing-field", "unknown-path"])
def test_bad_request_gets_4xx_and_the_server_stays_up(served, path, body, status, message):
    url, _ = served
    got, answer = post(f"{url}{path}", body)
    assert got == status and message in answer["error"], answer
    assert post(f"{url}/embed/text", {"texts": ["still up"]})[0] == 200


def test_get_is_refused(served):
    url, _ = served
    status, answer = post(f"{url}/embed/text", b"", method="GET")
    assert status == 405 and "only POST" in answer["error"]


def test_bad_serve_config_is_named_before_start(api_world, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = api_world.model_copy(update={"serve": api_world.serve.model_copy(update={"port": port})})
        with pytest.raises(ConfigError, match=rf"serve.port: cannot listen on 127.0.0.1:{port}"):
            check_serve(cfg)
    shrinking = api_world.model_copy(update={"serve": api_world.serve.model_copy(
        update={"replicas": 2, "max_replicas": 1})})
    with pytest.raises(ConfigError, match="serve.max_replicas: 1 is below serve.replicas=2"):
        check_serve(shrinking)
    with pytest.raises(ConfigError, match="no trained fusion model"):
        check_serve(api_world.model_copy(update={"workdir": str(tmp_path)}))
    # More replicas than the tests' 2-CPU Ray can place: said, rather than waited for forever.
    crowded = api_world.model_copy(update={"serve": api_world.serve.model_copy(update={"replicas": 3})})
    with pytest.raises(ConfigError, match=r"serve.cpus_per_replica: 3 replica\(s\) x 1 CPU do not fit"):
        check_room(crowded)


@pytest.mark.slow
def test_reco_serve_listens_until_ctrl_c(api_world, tmp_path):
    """The CLI in a process of its own (its own local Ray): it says where it listens, answers,
    and on SIGINT shuts down with status 130."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(dump_config(api_world))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "reco.cli", "serve", str(config), f"serve.port={port}", "serve.cpus_per_replica=0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
        # A shell's background job ignores SIGINT, and children inherit that: restore Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_listening(proc, port)
        status, body = post(f"http://127.0.0.1:{port}/embed/text", {"texts": ["a photo"], "refine": False})
        assert status == 200 and len(body["embeddings"][0]) == 64
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=300)[0]
        assert proc.returncode == 130 and "reco serve: stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
