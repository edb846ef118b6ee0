"""`<workdir>/eval/report.json`, `report.md` and `report.png` (DESIGN.md section 4).

report.json: {"results": [{"task", "dataset", "metric", "n", "baseline", "reco", "mean",
and, where evaluated, "no_retrieval", "search_cross", "fuse_uni", "memory_<fraction>"}],
"datasets": [...], "config": {...}}; numbers are percentages.
report.md is the same as a table with RECO's difference to the baseline; report.png a
grouped bar chart, one group per dataset and metric.
"""

from __future__ import annotations

import io
from typing import Any

from reco import storage

SYSTEMS = (("baseline", "frozen CLIP", "#9e9e9e"), ("reco", "RECO", "#1f77b4"),
           ("mean", "mean of neighbours", "#17becf"), ("search_cross", "cross-modal search", "#9467bd"),
           ("fuse_uni", "uni-modal fusion", "#8c564b"), ("no_retrieval", "fusion without retrieval", "#ff7f0e"))
MEMORY_COLOUR = "#2ca02c"
"""The memory-size ablation's column, `memory_<fraction>`."""
REPORT_FILES = ("report.json", "report.md", "report.png")


def _present(results: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    systems = [s for s in SYSTEMS if any(s[0] in r for r in results)]
    subsets = sorted({key for r in results for key in r if key.startswith("memory_")})
    return systems + [(key, f"RECO, {float(key.removeprefix('memory_')):.0%} of memory", MEMORY_COLOUR)
                      for key in subsets]


def markdown_table(results: list[dict[str, Any]]) -> str:
    systems = _present(results)
    head = ["task", "dataset", "metric", *[label for _, label, _ in systems], "RECO - baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(systems) + 1)]
    for r in results:
        cells = [r["task"], r["dataset"], r["metric"],
                 *[f"{r[key]:.1f}" if key in r else "" for key, _, _ in systems],
                 f"{r['reco'] - r['baseline']:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    parts = ["# RECO evaluation", "", "Percentages; the baseline is the frozen CLIP, RECO the same "
             "CLIP refined with the memory; the mean of neighbours is the parameter-free reference "
             "RECO's fusion must beat (docs/evaluation.md names every column).", "",
             markdown_table(report["results"]), ""]
    for d in report["datasets"]:
        parts.append(f"- {d['dataset']}: {d['samples']} samples evaluated ({d['skipped']} unreadable, "
                     f"skipped); {d['memory_excluded']} memory pairs excluded as near-duplicates of "
                     "its images")
    return "\n".join(parts) + "\n"


def _plot(results: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    systems = _present(results)
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6.0, (0.25 * len(systems) + 0.5) * len(results) + 1.5), 4.6))
    for i, (key, label, colour) in enumerate(systems):
        xs = [j + (i - (len(systems) - 1) / 2) * width for j, r in enumerate(results) if key in r]
        ys = [r[key] for r in results if key in r]
        bars = ax.bar(xs, ys, width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=1)
    ax.set_xticks(range(len(results)),
                  [f"{r['dataset']}\n{r['metric']}" for r in results], fontsize=9)
    ax.set_ylabel("%")
    top = max(r[k] for r in results for k, _, _ in systems if k in r)
    ax.set_ylim(0, top * 1.1 + 2)  # room for the value labels above the tallest bar
    ax.set_yticks([t for t in ax.get_yticks() if t <= 100])
    ax.set_title("Zero-shot results: frozen CLIP vs RECO")
    # At most four legend entries a row: seven ablation columns in one row are wider than the plot.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(len(systems), 4), fontsize=9,
              frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")  # the legend sits below the axes
    plt.close(fig)
    return buf.getvalue()


def write_report(out_dir: str, results: list[dict[str, Any]], datasets: list[dict[str, Any]],
                 config: dict[str, Any]) -> dict[str, Any]:
    """Write the three report files (JSON last: its presence means the report is complete)."""
    report = {"results": results, "datasets": datasets, "config": config}
    storage.write_bytes_atomic(storage.join(out_dir, "report.md"), _markdown(report).encode())
    storage.write_bytes_atomic(storage.join(out_dir, "report.png"), _plot(results))
    storage.write_json_atomic(storage.join(out_dir, "report.json"), report)
    return report
