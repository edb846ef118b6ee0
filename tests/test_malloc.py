"""reco/malloc.py: with glibc's mmap off and its trim threshold raised, a repeated step
reuses the memory it freed instead of faulting it in again. Each case runs in its own
process: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import mmap
import statistics
import subprocess
import sys

import pytest

TENSOR_PAGES = 48 * 2**20 // mmap.PAGESIZE
STEPS = """
import json, resource, sys, torch
from reco.malloc import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "kept" else None
def step():  # as a forward pass does: tensors allocated, then all freed
    activations = [torch.ones(12 * 2**20) for _ in range(4)]  # 4 x 48 MB
    del activations
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
per_step = []
for _ in range(12):
    before = faults()
    step()
    per_step.append(faults() - before)
print(json.dumps({"kept": kept, "per_step": per_step}))
"""


def page_faults(mode: str) -> tuple[bool | None, list[int]]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    return result["kept"], result["per_step"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_repeated_steps_reuse_freed_memory():
    _, default = page_faults("default")
    kept, faults = page_faults("kept")
    assert kept is True
    # 48 MB is above glibc's largest mmap threshold (32 MB), so by default every tensor is
    # mapped and unmapped, and every step faults all of its pages in again.
    assert min(default) >= 4 * TENSOR_PAGES * 0.9, default
    # Kept, the heap grows over the first steps (here 1 to 3 of them, in whole tensors' pages)
    # until it holds a step's peak; from then on it serves the tensors again without a fault.
    assert statistics.median(faults) < 100, (faults, default)
    assert max(faults[-4:]) < 100, (faults, default)
