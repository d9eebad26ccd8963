"""`retain_freed_memory`: after it, a training-sized tensor freed and allocated again faults no new pages (checked in
a child process: the setting is process-wide)."""

import os
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys, torch
from ernie45.training.host_memory import retain_freed_memory
applied = retain_freed_memory()
def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MB: above glibc's largest mmap threshold
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_step()
faults_of_a_step()  # steady state from the third step (the first free leaves the block below later ones)
print(int(applied), faults_of_a_step())
"""

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting"
)


def child_faults(retain: str) -> tuple[int, int]:
    env = {**os.environ, "ERNIE45_RETAIN_HOST_MEMORY": retain}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return int(applied), int(faults)


def test_freed_memory_is_reused_without_page_faults():
    applied, faults = child_faults("1")
    assert applied == 1
    assert faults < 100  # 64 MB of fresh pages would be 16,384 faults


def test_opt_out_keeps_the_default_policy():
    applied, faults = child_faults("0")
    assert applied == 0
    assert faults > 10_000  # the default malloc maps the 64 MB afresh
