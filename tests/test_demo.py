"""`reco demo --quick`: the whole pipeline end to end, as the README's first command runs it."""

from __future__ import annotations

import json

import pytest

from reco.cli import main


@pytest.mark.timeout(900)
def test_quick_demo_runs_every_stage_and_reports(tmp_path, ray_local, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--quick", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    for stage in ("download:", "embed:", "index:", "neighbors:", "train:", "evaluate:"):
        assert f"== {stage}" in out
    assert "| held-out-fine |" in out or "held-out-fine" in out
    report = json.loads((workdir / "eval" / "report.json").read_text())
    rows = [r for r in report["results"] if r["metric"] == "top1"]
    columns = {"baseline", "reco", "mean", "search_cross", "fuse_uni", "no_retrieval", "memory_0.1"}
    assert rows and all(columns <= r.keys() for r in rows)  # the paper's ablations, beside RECO
    assert (workdir / "eval" / "report.png").stat().st_size > 0
    for part in ("corpus/_manifest.json", "memory/_manifest.json", "index/image/_manifest.json",
                 "train/model", "train/model-noretrieval", "train/model-searchcross", "train/model-fuseuni",
                 "neighbors/train-searchcross/_manifest.json", "demo.yaml"):
        assert (workdir / part).exists(), part
    # A second run finds every stage finished.
    assert main(["demo", "--quick", "--workdir", str(workdir)]) == 0
    assert json.loads((workdir / "eval" / "report.json").read_text())["results"] == report["results"]
