"""`reco run`: a stage is skipped only while its recorded config values and input
generations match; a changed key re-runs that stage and those after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reco.config import ConfigError, RecoConfig, config_from_dict
from reco.demo import synthetic
from reco.run import run_pipeline
from tests.test_evaluate import folder_dataset, write_imagefolder

STAGES = ["download", "embed", "index", "neighbors", "train", "evaluate"]


def world_config(base: Path, checkpoint: str, **overrides: dict) -> RecoConfig:
    """A tiny world starting from shards the user already has (embed.input, no url_list)."""
    data = {"workdir": str(base / "work"), "model": {"name": "reco-tiny", "pretrained": checkpoint},
            "embed": {"input": str(base / "corpus"), "batch_size": 16}, "index": {"key": "Flat"},
            "neighbors": {"k": 3, "dedup_threshold": 0.999},
            "train": {"batch_size": 16, "epochs": 1, "warmup_steps": 0, "checkpoint_every": 100},
            "evaluate": {"datasets": [folder_dataset(base / "images")]}}
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


def statuses(runs) -> dict[str, str]:
    return {r.stage: r.status for r in runs}


def mtimes(workdir: Path) -> dict[str, int]:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint):
    """The tiny world after one full `reco run` (48 memory pairs in 2 shards, 16 eval images)."""
    from tests.conftest import start_local_ray

    start_local_ray()
    base = tmp_path_factory.mktemp("run")
    synthetic.write_webdataset(synthetic.make_samples(48, seed=11, class_ids=range(4)), str(base / "corpus"),
                               samples_per_shard=24)
    write_imagefolder(base / "images", n_classes=4, per_class=4)
    first = run_pipeline(world_config(base, tiny_checkpoint))
    return base, tiny_checkpoint, first


def test_first_run_runs_every_stage_but_download(world):
    _, _, first = world
    assert statuses(first) == {"download": "skipped", **{s: "done" for s in STAGES[1:]}}
    assert "no download.url_list" in first[0].reason


def test_second_run_does_no_work(world):
    base, checkpoint, _ = world
    before = mtimes(base / "work")
    again = run_pipeline(world_config(base, checkpoint))
    assert statuses(again) == dict.fromkeys(STAGES, "skipped")
    assert mtimes(base / "work") == before
    # runtime settings change no output, so they re-run nothing either
    runtime = world_config(base, checkpoint, neighbors={"batch_size": 7}, train={"log_every": 3})
    assert set(statuses(run_pipeline(runtime, dry_run=True)).values()) == {"skipped"}


def test_changed_k_reruns_neighbors_train_and_evaluate(world):
    base, checkpoint, _ = world
    cfg = world_config(base, checkpoint, neighbors={"k": 4})
    planned = run_pipeline(cfg, dry_run=True)
    assert statuses(planned) == {"download": "skipped", "embed": "skipped", "index": "skipped",
                                 "neighbors": "would run", "train": "may run", "evaluate": "may run"}
    assert "neighbors.k: 3 -> 4" in planned[3].reason
    runs = run_pipeline(cfg)
    assert statuses(runs) == {"download": "skipped", "embed": "skipped", "index": "skipped",
                              "neighbors": "done", "train": "done", "evaluate": "done"}
    assert "neighbors.generation" in runs[4].reason
    assert statuses(run_pipeline(cfg, dry_run=True)) == dict.fromkeys(STAGES, "skipped")
    assert json.loads((base / "work" / "train" / "model" / "config.json").read_text())["k"] == 4


def test_changed_model_over_an_existing_memory_is_an_error(world):
    base, checkpoint, _ = world
    before = mtimes(base / "work")
    with pytest.raises(ConfigError, match=r"model\.pretrained: .* -> None.*new workdir"):
        run_pipeline(world_config(base, checkpoint, model={"pretrained": None}))
    assert mtimes(base / "work") == before


def test_no_url_list_and_no_shards_is_an_error(tmp_path, tiny_checkpoint):
    cfg = world_config(tmp_path, tiny_checkpoint)
    cfg.embed.input = None
    with pytest.raises(ConfigError, match="download.url_list: required"):
        run_pipeline(cfg)
    assert not (tmp_path / "work").exists()


def test_quiet_console_settings(monkeypatch, caplog):
    """Ray's loggers are quieted, ours are not; a submitted job's own settings are kept."""
    import logging
    import os
    import re

    from reco import cluster

    caplog.set_level(logging.INFO)  # as the CLI sets it

    for name in (cluster.VERBOSE_ENV, cluster.JOB_CONFIG_ENV, cluster.CONSOLE_SKIP_ENV,
                 *cluster.QUIET_ENV):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores them after quiet_ray_logging
        monkeypatch.delenv(name)
    from ray import serve  # noqa: F401  (importing Serve sets its logger to INFO)

    levels = {name: logging.getLogger(name).level for name in cluster.QUIET_LEVELS}
    try:
        cluster.quiet_ray_logging()
        assert not logging.getLogger("ray.serve").isEnabledFor(logging.INFO)  # "Started Serve ..."
        auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
        assert not auth.isEnabledFor(logging.WARNING)
        assert not logging.getLogger("ray.data").isEnabledFor(logging.INFO)
        from ray.train.v2._internal.execution import context  # "Reporting training result ..."
        assert not context.logger.isEnabledFor(logging.INFO)
        from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client
        assert not client.logger.isEnabledFor(logging.WARNING)  # "Failed to send resource request"
        skip = re.compile(os.environ[cluster.CONSOLE_SKIP_ENV])  # the driver's console skips these
        assert skip.search("core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: 'ab'"
                           " has constructor arguments in the object store and max_restarts > 0.")
        assert skip.search("WARNING: 8 PYTHON worker processes have been started on node: ab with address:"
                           " 192.0.2.2, which is 4x the maximum expected startup concurrency (2).")
        assert skip.search("(gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor ab, return status")
        assert skip.search("(raylet) Task ServeController.graceful_shutdown failed. There are infinite retries "
                           "remaining, so the task will be retried. Error: The actor is dead because it was killed "
                           "by `ray.kill`.")
        assert not skip.search("reco: embedded 48 rows")
        assert logging.getLogger("training.loop").isEnabledFor(logging.INFO)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    hook = {"worker_process_setup_hook": "reco.cluster.setup_worker"}
    quiet = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_SERVE_LOG_TO_STDERR": "0"}
    assert cluster._worker_runtime_env() == {"env_vars": quiet, **hook}
    # A submitted job's own values win: only what it leaves unset is added.
    job = {"env_vars": {"RAY_DATA_LOG_LEVEL": "INFO"}, "worker_process_setup_hook": "theirs.hook"}
    monkeypatch.setenv(cluster.JOB_CONFIG_ENV, json.dumps({"runtime_env": job}))
    assert cluster._worker_runtime_env() == {"env_vars": {"RAY_SERVE_LOG_TO_STDERR": "0"}}
    job["env_vars"]["RAY_SERVE_LOG_TO_STDERR"] = "1"
    monkeypatch.setenv(cluster.JOB_CONFIG_ENV, json.dumps({"runtime_env": job}))
    assert cluster._worker_runtime_env() is None
    monkeypatch.delenv(cluster.JOB_CONFIG_ENV)
    monkeypatch.setenv(cluster.VERBOSE_ENV, "1")
    assert cluster._worker_runtime_env() == {"env_vars": {cluster.VERBOSE_ENV: "1"}, **hook}


# A tiny driver: its worker writes, to its stderr (a log file under the session's logs/),
# one line like each notice the quiet console skips, a Ray Train warning it quiets and a line
# of ours; Ray's driver streams worker output to the console (log_to_driver).
CONSOLE_SCRIPT = r"""
import logging, os, sys, time
from reco.cli import _setup_logging
_setup_logging(os.environ.get("RECO_VERBOSE") == "1")
from reco.cluster import init_ray
import ray
init_ray(num_cpus=1)

@ray.remote
def notices():
    for line in [
        "[2026-11-26 15:29:32,970 E 3405 3496] core_worker.cc:2465: Actor with class name: "
        "'PreemptionWatcher' and ID: 'ab12' has constructor arguments in the object store and "
        "max_restarts > 0.",
        "WARNING: 8 PYTHON worker processes have been started on node: ab12 with address: "
        "192.0.2.2. This is 4x the maximum expected startup concurrency (2).",
        "[2026-11-26 15:29:32,970 E 1 1] (gcs_server) gcs_actor_scheduler.cc:538: Failed to "
        "kill actor ab12, return status: Invalid",
        "reco-console-marker: ours",
    ]:
        print(line, file=sys.stderr, flush=True)
    logging.getLogger("ray.train.v2._internal.execution.scaling_policy."
                      "autoscaling_coordinator_client").warning("Failed to send resource request")
    sys.stderr.flush()
    return os.readlink("/proc/self/fd/2")

err_file = ray.get(notices.remote())
time.sleep(3)  # the log monitor polls the files
print("ERR_FILE", err_file, flush=True)
ray.shutdown()
"""
NOTICES = ["has constructor arguments", "maximum expected startup concurrency",
           "Failed to kill actor", "Failed to send resource request"]


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_console_skips_rays_notices(tmp_path, verbose):
    """Without -v, Ray's notices stay off the console (and in the log files); with -v they show."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RECO_VERBOSE", "RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    if verbose:
        env["RECO_VERBOSE"] = "1"
    done = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console
    assert "reco-console-marker: ours" in console
    shown = [n for n in NOTICES if n in console]
    assert shown == (NOTICES if verbose else []), console
    err_file = console.split("ERR_FILE ", 1)[1].split()[0]
    kept = Path(err_file).read_text()
    # The C++ notices the console skips stay in the worker's log file.
    assert all(n in kept for n in NOTICES[:3])


def test_ablations_train_each_variant_and_report_a_column_each(world):
    """`evaluate.ablations`: the variants' neighbours and models are made before the evaluation,
    each in its own folder, and the report has a column for each; a second run does nothing."""
    base, checkpoint, _ = world
    # Four trainings in Ray Train's local mode (a runtime setting: no stage re-runs for it),
    # each saving Ray Train's start; the first run trained with a worker.
    cfg = world_config(base, checkpoint, neighbors={"k": 4}, train={"num_workers": 0}, evaluate={"ablations": True})
    runs = run_pipeline(cfg)
    assert [r.stage for r in runs] == [*STAGES[:-1], "neighbors (search_cross)", "train (search_cross)",
                                       "train (fuse_uni)", "train (no_retrieval)", "evaluate"]
    # the shared split now also holds the same-modality columns uni-modal fusion reads
    assert statuses(runs)["neighbors"] == "done" and "neighbors.uni_columns: False -> True" in runs[3].reason
    work = base / "work"
    cross = json.loads((work / "neighbors" / "train-searchcross" / "_manifest.json").read_text())
    assert cross["search"] == "cross" and cross["total_rows"] == 48
    metas = {v: json.loads((work / "train" / f"model-{v}" / "config.json").read_text())
             for v in ("searchcross", "fuseuni", "noretrieval")}
    assert metas["searchcross"]["neighbors"]["search"] == "cross" and metas["fuseuni"]["fuse"] == "uni"
    assert metas["noretrieval"]["k"] == 0
    report = json.loads((work / "eval" / "report.json").read_text())
    columns = {"baseline", "reco", "mean", "search_cross", "fuse_uni", "no_retrieval", "memory_0.1"}
    assert all(columns <= r.keys() for r in report["results"])
    assert report["config"]["memory_fraction"] == 0.1
    assert "RECO, 10% of memory" in (work / "eval" / "report.md").read_text()
    assert set(statuses(run_pipeline(cfg, dry_run=True)).values()) == {"skipped"}


def test_ablations_are_variants_of_reco_itself(world):
    base, checkpoint, _ = world
    with pytest.raises(ConfigError, match="evaluate.ablations: .* trains the variant search_cross"):
        run_pipeline(world_config(base, checkpoint, neighbors={"search": "cross"}, evaluate={"ablations": True}))


@pytest.mark.parametrize("ablations", [False, True])
def test_evaluate_depends_only_on_the_models_it_reports(tmp_path, ablations):
    """A variant trained by hand beside a run without ablations is no column of its report,
    so it must not make `reco run` re-run evaluate."""
    from reco.depends import stage_depends

    cfg = config_from_dict({"workdir": str(tmp_path), "evaluate": {"ablations": ablations}})
    inputs = stage_depends(cfg, "evaluate")["inputs"]
    variants = {key.split(".")[0] for key in inputs if key.endswith(".generation")} - {"memory", "index", "model"}
    assert variants == ({"search_cross", "fuse_uni", "no_retrieval"} if ablations else {"no_retrieval"})
