"""`reco run CONFIG`: every stage in order, each skipped while its output is up to date.

A stage's output records the config values it depends on and the generation of its
inputs (reco/depends.py). A stage is skipped only when both equal what it would record
now; otherwise it runs, which, as every stage resumes its own finished work, may be
little. A re-made output has a new generation, so a changed key re-runs its stage and
those after it: a changed `neighbors.k` re-runs neighbours, train (replacing the model)
and evaluate, not download, embed or index. Without `download.url_list`, the corpus
comes from `embed.input` and download is skipped. With `evaluate.ablations`, each
variant's neighbours (where they differ) and fusion model are made before the evaluation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Literal

from reco import storage
from reco.cli import STAGES, stage_function
from reco.config import ABLATIONS, ConfigError, RecoConfig, ablation_config
from reco.contracts import EVAL_DIR, MEMORY_DIR, MemoryManifest, neighbors_folder
from reco.depends import REPORT, changes, embed_input, model_settings, recorded_depends, stage_depends

log = logging.getLogger(__name__)

RUN_OPTIONS: dict[str, dict] = {"train": {"replace": True}}
"""`reco run` means "make every output match this config": a model of other settings is replaced."""


@dataclass
class StageRun:
    """What `reco run` did with one stage, and why."""
    stage: str
    """Its name in the run: the stage, or for an ablation e.g. `train (fuse_uni)`."""
    status: Literal["done", "skipped", "would run", "may run"]
    reason: str
    seconds: float = 0.0


def check_run(cfg: RecoConfig) -> None:
    """The errors `reco run` can tell before any work: a new model over an existing memory,
    nothing to evaluate."""
    memory = MemoryManifest.read(cfg.path(MEMORY_DIR))
    if memory is not None:
        before = memory.depends.get("config") or {  # a memory written before depends were recorded
            "model.name": memory.model, "model.pretrained": memory.pretrained, "embed.dtype": memory.dtype}
        now = model_settings(cfg)
        diff = changes(before, {key: now.get(key) for key in before})
        if diff:
            raise ConfigError(
                f"model: the memory in {cfg.path(MEMORY_DIR)} was embedded with other model settings "
                f"({'; '.join(diff)}). A memory holds one embedding space: for a new model use a new "
                "workdir (workdir=...), or restore those settings.")
    from evaluation.evaluate import check_ablations

    check_ablations(cfg)
    if not cfg.evaluate.datasets:
        raise ConfigError("evaluate.datasets: empty, and `reco run` ends with the evaluation; add at least "
                          "one, e.g. {name: flowers, kind: clip_benchmark}")


def stale_reason(cfg: RecoConfig, stage: str) -> str | None:
    """Why `stage` must run, or None when its output records the same config and inputs as now."""
    recorded = recorded_depends(cfg, stage)
    if recorded is None:
        return "no finished output yet"
    now = stage_depends(cfg, stage)
    config = changes(recorded.get("config", {}), now["config"])
    if config:
        return "changed " + "; ".join(config)
    inputs = changes(recorded.get("inputs", {}), now["inputs"])
    return "inputs changed: " + "; ".join(inputs) if inputs else None


def planned_stages(cfg: RecoConfig) -> list[tuple[str, str, RecoConfig]]:
    """(name, stage, config) in order: every stage, and with `evaluate.ablations` each variant's
    neighbours (only where it searches differently) and training before the evaluation."""
    jobs = [(stage, stage, cfg) for stage in STAGES if stage != "evaluate"]
    if cfg.evaluate.ablations:
        ours = neighbors_folder(cfg.workdir, cfg.neighbors.split, cfg.neighbors.search)
        for variant in ABLATIONS:
            other = ablation_config(cfg, variant)
            if neighbors_folder(other.workdir, other.neighbors.split, other.neighbors.search) != ours:
                jobs.append((f"neighbors ({variant})", "neighbors", other))
            jobs.append((f"train ({variant})", "train", other))
    return jobs + [("evaluate", "evaluate", cfg)]


def _run_stage(cfg: RecoConfig, stage: str, label: str) -> StageRun:
    if stage == "download" and cfg.download.url_list is None:
        stage_function(stage)(cfg)  # no work: it checks that the corpus exists elsewhere
        return StageRun(stage, "skipped", f"no download.url_list; embed reads {embed_input(cfg)}")
    reason = stale_reason(cfg, stage)
    if reason is None:
        return StageRun(stage, "skipped", "up to date")
    log.info("%s: running (%s)", label, reason)
    start = time.perf_counter()
    stage_function(stage)(cfg, **RUN_OPTIONS.get(stage, {}))
    return StageRun(stage, "done", reason, time.perf_counter() - start)


def _plan_stage(cfg: RecoConfig, stage: str, earlier: str | None) -> StageRun:
    """A dry run's answer for one stage; `earlier` names a stage before it that would run."""
    if stage == "download" and cfg.download.url_list is None:
        return StageRun(stage, "skipped", f"no download.url_list; embed reads {embed_input(cfg)}")
    reason = stale_reason(cfg, stage)
    if reason is not None:
        return StageRun(stage, "would run", reason)
    if earlier is not None:
        return StageRun(stage, "may run", f"if {earlier} re-makes its output")
    return StageRun(stage, "skipped", "up to date")


def _line(label: str, run: StageRun) -> str:
    if run.status == "done":
        return f"{label}: done in {run.seconds:.0f} s"
    return f"{label}: {run.status} ({run.reason})"


def run_pipeline(cfg: RecoConfig, dry_run: bool = False) -> list[StageRun]:
    """Run (or, with `dry_run`, only tell) every stage in order; one progress line each."""
    check_run(cfg)
    runs: list[StageRun] = []
    jobs = planned_stages(cfg)
    for i, (name, stage, job_cfg) in enumerate(jobs, start=1):
        label = f"[{i}/{len(jobs)}] {name}"
        if dry_run:
            earlier = next((r.stage for r in runs if r.status in ("would run", "may run")), None)
            run = _plan_stage(job_cfg, stage, earlier)
        else:
            run = _run_stage(job_cfg, stage, label)
        run = replace(run, stage=name)
        log.info("%s", _line(label, run))
        runs.append(run)
    if not dry_run:
        log.info("%s", summary(cfg, runs))
    return runs


def summary(cfg: RecoConfig, runs: list[StageRun]) -> str:
    """The report's table and each stage's time."""
    from evaluation.report import markdown_table

    report = storage.read_json(cfg.path(EVAL_DIR, REPORT))
    times = ", ".join(f"{r.stage} {r.seconds:.0f} s" if r.status == "done" else f"{r.stage} skipped" for r in runs)
    return (f"report: {cfg.path(EVAL_DIR)}/report.{{json,md,png}}\n{markdown_table(report['results'])}\n"
            f"time: {times} (total {sum(r.seconds for r in runs):.0f} s)")
