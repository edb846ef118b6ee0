"""Joining Ray: the cluster named by RAY_ADDRESS (a job, a `ray start` head), else a local one.

Also a quiet console: our stages' progress and results, not Ray's internals (execution
plans, actor start-up warnings, the token-authentication notice, C++ notices streamed from
Ray's processes). `reco -v` (RECO_VERBOSE=1) shows them again. Token authentication itself
stays as Ray sets it; only its log line goes.

Ray is imported only inside functions: the driver's console filter
(RAY_DEDUP_LOGS_SKIP_REGEX) is read when `ray` is first imported, so the CLI must be able to
call quiet_ray_logging before that.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

log = logging.getLogger(__name__)

VERBOSE_ENV = "RECO_VERBOSE"
QUIET_LEVELS = {
    "ray": logging.WARNING,
    "ray.data": logging.WARNING,  # "Starting execution", "Execution plan", progress every 10 s
    "ray.data._internal.progress": logging.ERROR,  # "Progress bars disabled ..."
    "ray.train": logging.WARNING,
    "ray._private.authentication": logging.ERROR,  # "Token authentication is enabled ..."
    # Repeated while the State API has no dashboard to ask (we start Ray without one).
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    # Ray Train V2 names this logger by its file's path, outside the "ray" tree: it logs
    # "Reporting training result ..." at every checkpoint.
    os.path.join(os.path.dirname(importlib.util.find_spec("ray").origin),
                 "train", "v2", "_internal", "execution", "context.py"): logging.WARNING,
    # "Failed to send resource request ... safe to ignore" and a GetTimeoutError traceback,
    # from Ray Train's controller when the machine is too loaded to answer within its timeout.
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": logging.ERROR,
    # "Started Serve", "Application 'reco' is ready" (`reco serve` says where it listens). Serve
    # sets this logger to INFO when imported; init_ray, which runs after, sets it back.
    "ray.serve": logging.WARNING,
    "faiss": logging.WARNING,
    "autofaiss": logging.WARNING,
}
# Serve's controller, proxy and replicas log to their files under the session's logs/serve/
# only: on the console a replica that fails to start was Serve's traceback, repeated per retry.
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_SERVE_LOG_TO_STDERR": "0"}
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Lines that Ray's processes write to their log files and that the driver would print too
# (log_to_driver): the driver skips those matching this regex (Ray reads it once, when `ray`
# is imported; the files under the session's logs/ folder keep every line).
CONSOLE_SKIP_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"
CONSOLE_SKIP = {
    # A core worker's C++ notice, once per Ray Train run (worker-*.err).
    "constructor arguments": r"core_worker\.cc:\d+: Actor with class name: .* has constructor "
                             r"arguments in the object store",
    # The raylet, when workers start faster than it expects (raylet.out).
    "startup concurrency": r"worker processes have been started on node: .* maximum expected "
                           r"startup concurrency",
    # The GCS, killing an actor whose process already went (gcs_server.out, .err).
    "kill actor": r"gcs_actor_scheduler\.cc:\d+: Failed to kill actor",
    # The raylet, when `serve.shutdown` kills Serve's controller during its own graceful shutdown.
    "serve shutdown": r"Task ServeController\.graceful_shutdown failed\. .* killed by `ray\.kill`",
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_ray_logging() -> None:
    """Keep Ray's and faiss's internals off the console unless verbose. Runs in the driver
    (the CLI, before Ray starts, so child processes inherit the environment) and, as the
    worker setup hook, in every Ray worker."""
    if verbose():
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    # A regex of the user's own wins; only the driver's console uses it.
    os.environ.setdefault(CONSOLE_SKIP_ENV, "|".join(f"({r})" for r in CONSOLE_SKIP.values()))
    for name, level in QUIET_LEVELS.items():
        logging.getLogger(name).setLevel(level)


def ray_train_log_level() -> str:
    """Ray Train's own console level (its controller and workers configure their loggers)."""
    return "INFO" if verbose() else "WARNING"


def setup_worker() -> None:
    """Every Ray worker's setup hook: the driver's console settings, and RAY_ADDRESS naming
    this cluster, so that Ray's own State API clients in workers (Ray Train's placement
    group cleaner) do not die of "Found multiple active Ray instances" on a shared machine."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    quiet_ray_logging()


def _worker_runtime_env() -> dict | None:
    """The workers' share of the console settings, less what a submitted job's runtime
    env already sets (Ray refuses to merge two values of one key)."""
    job = json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    wanted = {VERBOSE_ENV: "1"} if verbose() else QUIET_ENV
    env_vars = {k: v for k, v in wanted.items() if k not in (job.get("env_vars") or {})}
    runtime_env = {"env_vars": env_vars} if env_vars else {}
    if "worker_process_setup_hook" not in job:
        runtime_env["worker_process_setup_hook"] = "reco.cluster.setup_worker"
    return runtime_env or None


def init_ray(num_cpus: int | None = None) -> None:
    """Connect once per process; every stage calls this first.

    Inside `ray job submit` RAY_ADDRESS is set and we join that cluster. Otherwise a local
    cluster sized to the machine is started, bound to 127.0.0.1 (the
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 switch makes Ray use the loopback address).
    """
    import ray

    if ray.is_initialized():
        return
    quiet_ray_logging()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, runtime_env=_worker_runtime_env())
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # A Ray of our own on this machine is never preempted: Ray Train's preemption
        # watcher would only add a process to the start of every training (Ray Train passes
        # the setting from the driver to its controller).
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=True, configure_logging=False, runtime_env=_worker_runtime_env())
    if not verbose():
        # Our stages draw their own progress bars; Ray Data's would double them.
        ray.data.DataContext.get_current().enable_progress_bars = False


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def largest_node_cpus() -> int:
    """The CPUs of the alive node that has most: more than this, one actor can never get."""
    import ray

    return int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1))
