"""Shard jobs on Ray: the finished-shard scan, a queue of shards over a pool of actors, resources, one progress bar.

`reco embed` and `reco neighbors` both turn input shards into output files, one shard per
unit of work, on actors that hold something expensive (a model replica, the searchable
memory). A finished output file carries its own record in its Parquet footer, so a re-run
finds the finished work with one listing and parallel footer reads, and redoes only the rest.

The pool is a plain `ray.util.ActorPool`, not Ray Data's actor-pool executor: a job is one
shard name in and one small record out, so Ray Data's blocks, operator graph and executor
start-up buy nothing here and cost seconds per run (docs/performance.md).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import ray
from pydantic import BaseModel
from ray.util import ActorPool
from tqdm import tqdm

from reco import storage
from reco.cluster import cluster_cpus, cluster_gpus, largest_node_cpus
from reco.errors import RecoError, raised_in_task, shards_failed_message

log = logging.getLogger(__name__)

Record = TypeVar("Record")
Result = TypeVar("Result", bound=BaseModel)

CLOSE_TIMEOUT_S = 30


def find_finished(folder: str, names: list[str], record: Callable[[str], Record | None]) -> dict[str, Record | None]:
    """name -> `record(url)` for the Parquet files of `folder` among `names`, None for the
    others: one listing (not one request per name, which matters at 100k shards on S3),
    then the records read in parallel."""
    present = {url.rsplit("/", 1)[-1] for url in storage.list_files(folder, ".parquet")}
    found = [name for name in names if name in present]
    with ThreadPoolExecutor(16) as pool:
        records = pool.map(lambda name: record(storage.join(folder, name)), found)
        return {**dict.fromkeys(names), **dict(zip(found, records))}


@dataclass(frozen=True)
class ActorResources:
    actors: int
    cpus: float
    """CPUs each actor reserves."""
    gpus: float
    """GPUs each actor reserves."""


def actor_resources(jobs: int, *, num_actors: int | None = None, cpus_per_actor: float | None = None,
                    gpus_per_actor: float | None = None, cpus_per_cpu_actor: int | None = None,
                    max_cpus: float | None = None) -> ActorResources:
    """How many actors, and what each reserves, for `jobs` shards on this cluster.

    Defaults: one GPU per actor and one actor per GPU where the cluster has GPUs, else
    one actor per `cpus_per_cpu_actor` CPUs (one in all if None); never more actors than jobs; the cluster's
    CPUs shared among the actors (at most `max_cpus` each, and never more than one node has, or
    the actor could not be placed) unless `cpus_per_actor` is set.
    """
    gpus = cluster_gpus()
    gpus_each = gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpus_each:
        default = max(1, int(gpus // gpus_each))
    else:
        default = max(1, cluster_cpus() // cpus_per_cpu_actor) if cpus_per_cpu_actor else 1
    actors = max(1, min(num_actors or default, jobs))
    cpus = cpus_per_actor or max(1.0, min(max_cpus or float("inf"), largest_node_cpus(), cluster_cpus() / actors))
    return ActorResources(actors, cpus, gpus_each)


class ActorStartFailed(RecoError):
    """An actor's `start` raised a `RecoError`: raised by each of its calls instead."""


class ShardActor:
    """Base of the actors a shard job runs: `start(...)` loads what the actor holds (a
    model, the memory), `process(**job)` turns one job into its record."""

    def __init__(self, *args, **kwargs):
        # A RecoError while starting (weights this node cannot download, say) is kept and
        # raised by `check_started`: raised here, Ray would report an ActorDiedError carrying
        # only the error's traceback as text, and the driver could not show the user's message.
        self.start_error: RecoError | None = None
        try:
            self.start(*args, **kwargs)
        except RecoError as err:
            self.start_error = err

    def start(self, *args, **kwargs) -> None:
        """Load what the actor holds, once, when Ray creates (or restarts) it."""

    def process(self, **job: str) -> BaseModel:
        raise NotImplementedError

    def check_started(self) -> None:
        """Raise what `start` raised, if anything: the driver calls it before sending jobs."""
        if self.start_error is not None:
            raise ActorStartFailed(str(self.start_error))

    def run(self, job: dict[str, str]) -> str:
        """One job's record as JSON: the driver validates it into its record type."""
        self.check_started()  # an actor restarted on another node starts again
        return self.process(**job).model_dump_json()

    def close(self) -> None:
        """Release what the actor started (child processes, say) before it is killed."""


class ShardJobsFailed(RecoError):
    """Some jobs failed with an error the user can act on; the others finished and are kept."""


def check_started(actors: list, desc: str) -> None:
    """Wait for every actor's start; raise the first `RecoError` a start raised, with how
    many actors could not start. Every actor's answer is read, so that Ray reports none of
    them as an unhandled error."""
    errors = []
    for started in [a.check_started.remote() for a in actors]:
        try:
            ray.get(started)
        except ActorStartFailed as err:
            errors.append(str(raised_in_task(err)))
    if errors:
        raise RecoError(f"{desc}: {len(errors)} of {len(actors)} actors could not start: {errors[0]}")


def run_shard_jobs(jobs: list[dict[str, str]], actor: type[ShardActor], actor_kwargs: dict,
                   resources: ActorResources, record_type: type[Result], *, desc: str, unit: str = "shard",
                   total: int | None = None, size: Callable[[Result], int] = lambda record: 1) -> Iterator[Result]:
    """Each job's record, as the actors finish them (in any order), with one progress bar
    advanced by `size(record)` out of `total` (default: one per job).

    An actor lost with its node is restarted and its job retried, as Ray Data's pool did.
    A job that raises a `RecoError` (a shard's decoding process killed, say) fails alone:
    the other jobs go on, and `ShardJobsFailed` names the failed ones at the end, so a
    re-run, which skips finished shards, has only those left to do. Jobs are sent once
    every actor has started: one whose start raised a `RecoError` ends the run before any
    job, with that error's message, as each of its jobs would fail the same way. Any other
    error stops the run at once, with its traceback: it is a bug, not the input.
    """
    remote = ray.remote(num_cpus=resources.cpus, num_gpus=resources.gpus, max_restarts=-1,
                        max_task_retries=-1, scheduling_strategy="SPREAD")(actor)
    actors = [remote.remote(**actor_kwargs) for _ in range(resources.actors)]
    failures: list[str] = []
    try:
        check_started(actors, desc)
        pool = ActorPool(actors)
        for job in jobs:
            pool.submit(lambda a, job: a.run.remote(job), job)
        with tqdm(total=len(jobs) if total is None else total, unit=unit, desc=desc, disable=None) as bar:
            while pool.has_next():
                try:
                    record_json = pool.get_next_unordered()
                except RecoError as err:
                    failures.append(str(raised_in_task(err)))
                    log.warning("%s: %s", desc, failures[-1])
                    continue
                record = record_type.model_validate_json(record_json)
                bar.update(size(record))
                yield record
    finally:
        # Free their CPUs/GPUs for the next stage now, not at garbage collection; an actor
        # that does not close in time (its node lost, say) is killed all the same.
        ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=CLOSE_TIMEOUT_S)
        for a in actors:
            ray.kill(a)
    if failures:
        raise ShardJobsFailed(shards_failed_message(desc, failures, len(jobs)))
