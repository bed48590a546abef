"""runtime.allocator: large maps allocated and freed image after image are reused, not faulted in afresh.

Checked from the OS (minor page faults, getrusage), in a child started with glibc forced into the bad regime
(every allocation above 64 KiB mmapped): the child must fault on every map without the fix and not with it."""
import subprocess
import sys

import pytest

CHILD = """
import resource, sys
import numpy as np
if sys.argv[1] == "fixed":
    from runtime.allocator import keep_freed_maps
    assert keep_freed_maps()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # warm up
    np.ones(3 * 2**20 // 8).sum()
before = faults()
for _ in range(40):  # a conv output's worth (3 MB), touched whole, then freed
    np.ones(3 * 2**20 // 8).sum()
print((faults() - before) / 40)
"""


def _faults_per_map(mode: str) -> float:
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_maps_are_reused_instead_of_faulted_in_again():
    assert _faults_per_map("default") > 500  # 768 pages of 4 KiB per 3 MB map: each faults in afresh
    assert _faults_per_map("fixed") < 20
