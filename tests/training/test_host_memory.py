"""`retain_freed_memory`: once a training-like step's tensors have been allocated and freed a few times, the next
steps fault almost no new pages; with the default policy every step maps its large tensors afresh. Checked in
child processes (the setting is process-wide), by page-fault counts, not timings."""

import os
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import resource, torch
from ernie45.training.host_memory import retain_freed_memory
applied = retain_freed_memory()
SIZES_MB = (16, 48, 64, 8, 100, 24)  # some above glibc's largest mmap threshold (32 MB), some below
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.empty(mb * 2**20 // 4).fill_(1.0) for mb in SIZES_MB]  # a step's activations, freed at its end
    del xs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(int(applied), *[step() for _ in range(6)])
"""

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting"
)


def child_faults(retain: str) -> tuple[int, list[int]]:
    env = {**os.environ, "ERNIE45_RETAIN_HOST_MEMORY": retain}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    applied, *faults = (int(x) for x in out.split())
    return applied, faults


def test_freed_memory_is_reused_without_page_faults():
    applied, faults = child_faults("1")
    assert applied == 1
    step_pages = sum((16, 48, 64, 8, 100, 24)) * 2**20 // 4096  # 66,048 pages if a step mapped everything afresh
    assert faults[0] > step_pages // 2  # the first step maps its memory
    assert sum(faults[3:]) < step_pages // 10  # later steps reuse it (here: 0)


def test_opt_out_keeps_the_default_policy():
    applied, faults = child_faults("0")
    assert applied == 0
    assert min(faults[3:]) > 16_384  # every step maps at least its >32 MB tensors afresh (here: 54-67 k pages)
