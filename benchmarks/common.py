"""What the benchmark scripts share: the offline environment, the repository on sys.path,
interleaved timing, the machine's load next to every figure, medians and ratios.

Import it first (`from common import ...`, with benchmarks/ as the script's folder): it
sets the environment before Ray, torch or open_clip are imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no weights can be downloaded: fail, never wait
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parser(doc: str, repeats: int = 3) -> argparse.ArgumentParser:
    """An argument parser described by the script's docstring, with --repeats."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repeats", type=int, default=repeats, help="interleaved repeats; medians are reported")
    return p


def load() -> str:
    """The machine's load, to print next to a figure: timings on a shared machine are noisy."""
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} (1/5 min) on {os.cpu_count()} CPUs"


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn()` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run per repeat, the runs alternating (and their order rotating every
    repeat) so that a change of load hits all of them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds[name].append(timed(runs[name]))
            print(f"  repeat {r} {name}: {seconds[name][-1]:.2f} s ({load()})", flush=True)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)
