"""`reco serve` under SIGTERM (what `ray job stop` sends): the same clean stop as Ctrl-C; and
with replicas that cannot load the model: their own error, and nothing left running.

A module of its own: the CLI joins the tests' Ray cluster (RAY_ADDRESS), where Serve is one
per cluster, so it must not run beside tests/test_serve.py's application.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray import serve

from reco.config import dump_config
from reco.contracts import FUSION_WEIGHTS, fusion_model_dir
from tests.conftest import start_local_ray
from tests.test_serve import free_port, live_actors, post, wait_listening

ROOT = Path(__file__).resolve().parents[1]
SERVE_ACTORS = ("ServeController", "ServeReplica", "ProxyActor")


def gone(prefixes: tuple[str, ...], seconds: float = 30) -> list[str]:
    """The class names of the actors still alive after up to `seconds` (ray.kill is asynchronous)."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [a["ActorClassName"] for p in prefixes for a in live_actors(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def test_reco_serve_stops_cleanly_on_sigterm(api_world, tmp_path):
    """Two replicas sharing the memory service, in the tests' cluster: after SIGTERM the CLI
    exits 143 having shut Serve down (its controller is detached: it would outlive a killed
    driver and keep the port) and stopped the shard actors."""
    start_local_ray()
    assert not gone(SERVE_ACTORS + ("ShardServer",), seconds=0), "leftover actors from another test"
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(dump_config(api_world))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "reco.cli", "serve", str(config), f"serve.port={port}", "serve.replicas=2",
         "serve.cpus_per_replica=0.25"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        wait_listening(proc, port)
        status, body = post(f"http://127.0.0.1:{port}/embed/text", {"texts": ["a photo"]})
        assert status == 200 and len(body["embeddings"][0]) == 64
        assert len(live_actors("ShardServer")) == 1 and live_actors("ServeController")
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 128 + signal.SIGTERM, rest[-2000:]
        assert "reco serve: stopped (SIGTERM)" in rest
        assert not gone(SERVE_ACTORS + ("ShardServer",)), "Serve or the memory service outlived `reco serve`"
        with socket.socket() as sock:  # nothing listens on the port any more
            assert sock.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if live_actors("ServeController"):  # a failed run must not leave Serve to the next module
            serve.shutdown()


def test_replicas_that_cannot_load_the_model_are_a_clear_error(api_world, tmp_path):
    """Fusion weights damaged after training pass the driver's checks, so every replica fails
    in its constructor and Serve gives up after its retries: the CLI exits 2 with the
    replica's own error, no traceback, and neither Serve nor the memory service stays up."""
    start_local_ray()
    workdir = tmp_path / "workdir"
    shutil.copytree(api_world.workdir, workdir)
    weights = Path(fusion_model_dir(str(workdir))) / FUSION_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    config = tmp_path / "serve.yaml"
    config.write_text(dump_config(api_world.model_copy(update={"workdir": str(workdir)})))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "reco.cli", "serve", str(config), f"serve.port={free_port()}",
             "serve.replicas=2", "serve.cpus_per_replica=0.25"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1] == (
            f"reco: error: serve: the replicas could not start: ConfigError: {weights}: the fusion weights are "
            f"not a readable PyTorch checkpoint (cut short, or another file); remove {weights.parent} and re-run "
            "`reco train` to write them again")
        assert "Traceback" not in proc.stdout + proc.stderr, "Serve's log of the failure reached the console"
        assert not gone(SERVE_ACTORS + ("ShardServer",)), "Serve or the memory service outlived `reco serve`"
    finally:
        if live_actors("ServeController"):
            serve.shutdown()
