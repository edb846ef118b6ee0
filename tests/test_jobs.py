"""`reco run` as a Ray job: a real `ray start --head` on 127.0.0.1, `JobSubmissionClient`, the repo
shipped as the job's working_dir, as docs/cluster.md describes for a cluster.

The head runs as a subprocess with its own temp dir, ports and token; the test process never
calls `ray.init`, so the session's local Ray (conftest.start_local_ray) is left alone. Teardown
stops exactly the processes this head started (by pid): `ray stop` would stop every Ray process
of the machine, other clusters included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the job does not need; Ray also leaves out what .gitignore lists.
EXCLUDES = [".git", "**/__pycache__", ".pytest_cache", "*.egg-info", "reco-demo", "benchmarks/out*"]
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 420


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port_range(size: int) -> int:
    """The first port of `size` consecutive ports free on 127.0.0.1 (for Ray's worker ports)."""
    rng = secrets.SystemRandom()
    for _ in range(50):
        first = rng.randrange(20000, 30000 - size)
        try:
            with ExitStack() as stack:
                for port in range(first, first + size):
                    stack.enter_context(closing(socket.socket())).bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports in 20000-30000")


def ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def _http_get(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _stop(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the head and every process it started, SIGKILL what is left after a grace period."""
    try:
        started = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        started = [proc.pid]

    def signal_all(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the head's own session (start_new_session below)
        except ProcessLookupError:
            pass
        for pid in started:  # workers and job drivers run in process groups of their own
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    signal_all(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    gone, alive = psutil.wait_procs([p for p in map(_process, started) if p], timeout=10)
    if alive or proc.poll() is None:
        signal_all(signal.SIGKILL)
        proc.wait(timeout=10)
        psutil.wait_procs(alive, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[tuple[str, str]]:
    """A `ray start --head --block` on 127.0.0.1 with token auth; yields (dashboard URL, token)."""
    # Short: the raylet's and plasma's Unix socket paths live under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    token = secrets.token_hex(32)
    (gcs, dashboard, client, node_manager, object_manager, agent, agent_grpc, runtime_env_agent,
     metrics) = free_ports(9)
    worker_ports = free_port_range(64)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0",
               # The job's `reco` is this interpreter's, also from an unactivated virtualenv.
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    cmd = [ray_executable(), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
           f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
           f"--metrics-export-port={metrics}", f"--min-worker-port={worker_ports}",
           f"--max-worker-port={worker_ports + 63}", f"--num-cpus={num_cpus}",
           "--object-store-memory=300000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if _http_get(f"{url}/api/version", token) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the dashboard at {url} did not answer in {START_TIMEOUT_S}s:\n"
                            f"{log_path.read_text()}")
            time.sleep(1)
        yield url, token
    finally:
        _stop(proc, temp_dir)


def write_run_config(path: Path, workdir: Path, checkpoint: str, corpus: str, images: str) -> None:
    """The smallest `reco run`: no url_list (download skips), reco-tiny, one epoch."""
    config = {
        "workdir": str(workdir),
        "model": {"name": "reco-tiny", "pretrained": checkpoint},
        "embed": {"input": corpus, "batch_size": 16},
        "index": {"key": "Flat"},
        # An untrained reco-tiny maps these images close together: only copies pass 0.999.
        "neighbors": {"k": 4, "dedup_threshold": 0.999, "batch_size": 64},
        "train": {"num_workers": 1, "batch_size": 16, "epochs": 1, "warmup_steps": 1,
                  "checkpoint_every": 1000, "precision": "fp32", "shuffle": False},
        "evaluate": {"datasets": [{"name": "shapes", "kind": "imagefolder", "path": images,
                                   "templates": ["a photo of a {c}."]}]},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def wait_for_job(client, job_id: str, timeout_s: float):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            return status
        time.sleep(2)


@pytest.mark.timeout(600)
def test_reco_run_as_a_ray_job(tmp_path, tiny_checkpoint, corpus_dir, eval_imagefolder):
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = tmp_path / "run.yaml"
    workdir = tmp_path / "work"
    write_run_config(config, workdir, tiny_checkpoint, corpus_dir, eval_imagefolder)
    with ray_head() as (url, token):
        # Token auth is on: a request without the token is refused.
        assert _http_get(f"{url}/api/version", None) == 401
        client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
        job_id = client.submit_job(
            entrypoint=f"reco run {config}",
            runtime_env={"working_dir": str(REPO_ROOT), "excludes": EXCLUDES,
                         "env_vars": {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
                                      "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
        status = wait_for_job(client, job_id, JOB_TIMEOUT_S)
        logs = client.get_job_logs(job_id)
        print(logs)  # shown by pytest when the test fails (or with -s)
        if status != JobStatus.SUCCEEDED:
            pytest.fail(f"job {job_id} ended {status} (waited up to {JOB_TIMEOUT_S}s); logs above")
    for done in ("memory/_manifest.json", "index/image/_manifest.json", "index/text/_manifest.json",
                 "neighbors/train", "train/model"):
        assert (workdir / done).exists(), f"{done} missing after the job; its logs:\n{logs}"
    report = json.loads((workdir / "eval" / "report.json").read_text())
    rows = [r for r in report["results"] if r["dataset"] == "shapes"]
    assert "top1" in [r["metric"] for r in rows]  # (no top5 with 4 classes)
    assert all(0 <= r[s] <= 100 for r in rows for s in ("baseline", "reco"))
    assert not (workdir / "corpus").exists()  # no url_list: download had nothing to do
