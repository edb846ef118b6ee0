"""Joining Ray: the cluster named by RAY_ADDRESS (a job, a `ray start` head), else a local one."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Connect once per process; every stage calls this first.

    Inside `ray job submit` RAY_ADDRESS is set and we join that cluster. Otherwise a local
    cluster sized to the machine is started, bound to 127.0.0.1 (the
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 switch makes Ray use the loopback address).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             log_to_driver=True, configure_logging=False)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))
